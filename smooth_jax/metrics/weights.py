"""Finding metric-network weights on disk: clear errors when a file is missing or torch is absent.

No metric network ships with smooth-jax and none is downloaded: every weight file is passed as a
local path. ``MissingWeightsError`` says what the file is, where to get it, and how to pass it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np


class MissingWeightsError(FileNotFoundError):
    """A metric network's weights are not at the given path; the message names the file, what it
    is, where to get it, and which argument takes it."""


def require_path(path: str | os.PathLike | None, *, what: str, get: str, how: str, is_dir: bool = False) -> Path:
    """``path`` as a Path if it exists (a folder when ``is_dir``), else ``MissingWeightsError``.

    what: what the weights are ("LPIPS AlexNet heads alex.pth from the lpips package");
    get: where to obtain them; how: the argument or call that takes the path.
    """
    kind = "folder" if is_dir else "file"
    if path is None or str(path) == "":
        raise MissingWeightsError(f"No path given for the {what}. Get it from {get}; pass it as {how}.")
    p = Path(path).expanduser()
    ok = p.is_dir() if is_dir else p.is_file()
    if not ok:
        found = " (it exists but is not a folder)" if is_dir and p.exists() else ""
        found = found or (" (it is a folder, a file is needed)" if not is_dir and p.is_dir() else "")
        raise MissingWeightsError(
            f"{what}: {kind} {str(p)!r} not found{found}. Get it from {get}; pass its local path as {how}. "
            "smooth-jax never downloads metric weights."
        )
    return p


def load_torch_state_dict(path: Path, *, what: str) -> dict[str, np.ndarray]:
    """A PyTorch ``.pth``/``.pt`` state dict as float32 numpy arrays (needs torch; reads with
    ``weights_only=True``, so no code in the file runs)."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"Reading {path} ({what}) needs PyTorch, which is not installed: "
            "`pip install torch` (CPU wheel is enough; it is in requirements-dev.txt)."
        ) from None
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} ({what}) is not a state dict (got {type(state).__name__}).")
    return {k.removeprefix("module."): v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}
