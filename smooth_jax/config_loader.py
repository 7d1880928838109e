"""Config files (``configs/*.py`` defining ``get_config()``) and ``--config.a.b=value`` overrides."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

import ml_collections


def load_config(path: str | Path) -> ml_collections.ConfigDict:
    """Import ``path`` and return its ``get_config()``.

    The folder above the config's folder goes on sys.path first, so a variant config can
    ``from configs import sd15_smooth_lora`` and change a few fields.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
    root = str(path.resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_smooth_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"Config file {str(path)!r} defines no get_config().")
    return module.get_config()


def _parse(text: str, current, key: str):
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--config.{key}={text!r}: expected true or false.")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ValueError(f"--config.{key}={text!r} is not a valid {type(current).__name__}.") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        value = type(current)(value)
    if current is not None and not isinstance(value, type(current)) and not isinstance(current, ml_collections.ConfigDict):
        raise ValueError(f"--config.{key}={text!r} is a {type(value).__name__}; the field is a {type(current).__name__}.")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply ``--config.a.b=value`` (or ``--config.a.b value``) arguments; unknown keys are errors."""
    items = list(overrides)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--config."):
            raise ValueError(f"Unexpected argument {arg!r}; overrides look like --config.train.lr=1e-4.")
        if "=" in arg:
            key, text = arg[len("--config."):].split("=", 1)
        else:
            if i + 1 >= len(items):
                raise ValueError(f"{arg} needs a value.")
            key, text = arg[len("--config."):], items[i + 1]
            i += 1
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ValueError(f"--config.{key}: {part!r} is not a config section.")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"--config.{key}: no such field (fields here: {sorted(node.keys())}).")
        node[leaf] = _parse(text, node[leaf], key)
        i += 1
    return config
