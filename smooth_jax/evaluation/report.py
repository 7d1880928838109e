"""What an evaluation run leaves in its ``--out`` folder, and how a rerun picks it up.

    DIR/run_config.json   the resolved config, written when the run starts; a rerun whose config
                          differs in any field is refused with that field's name
    DIR/partial.jsonl     one JSON line per finished (model, item), appended (and fsynced) as each
                          completes: everything the final numbers need
    DIR/arrays/*.npz      images of the first few items (the grids are drawn from them)
    DIR/features/*.npy    per-item feature vectors (FID), when FID is on
    DIR/results.json      config, versions, per-model metrics (mean, std, n) and per-item values
    DIR/results.md        the paper-style table(s)
    DIR/grids/*.png       image grids

Resuming: a rerun of the same command skips the (model, item) pairs already in partial.jsonl and
computes the rest in the same aligned blocks, so every per-item value is what an uninterrupted
run computes. The final numbers are always aggregated from partial.jsonl, in item order: a
resumed run reproduces an uninterrupted run's results.json numbers exactly (JSON floats
round-trip float64 exactly).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from smooth_jax.fileio import atomic_write

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
STD_NOTE = "mean ± std over items (population std, ddof=0)"


class ConfigMismatchError(ValueError):
    """``--out`` holds a run made with another config; the message names the first differing field."""


# --- small helpers ----------------------------------------------------------------------------


def text_sha256(items: Sequence[str]) -> str:
    """Hash of a list of strings (prompts, captions): detects an edited prompt file on resume."""
    return hashlib.sha256(json.dumps(list(items), ensure_ascii=False).encode()).hexdigest()


def normalize(obj: Any) -> Any:
    """``obj`` as plain JSON types (tuples -> lists, numpy scalars -> Python), for storing and comparing."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def strict_json(obj: Any) -> Any:
    """Non-finite floats as strings ("inf", "-inf", "nan"), so results.json is standard JSON
    (PSNR is inf for identical images)."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def first_difference(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first (dotted path, old value, new value) where two JSON-like values differ, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                return sub, old.get(key, "<absent>"), new.get(key, "<absent>")
            diff = first_difference(old[key], new[key], sub)
            if diff:
                return diff
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            diff = first_difference(a, b, f"{path}[{i}]")
            if diff:
                return diff
        return None
    return None if old == new else (path or "<root>", old, new)


def summarize(values: Iterable[float]) -> dict:
    """``{"mean", "std", "n"}`` of per-item values in float64, in the given order; std is the
    population std (ddof=0), 0 when all values are equal (also for inf, e.g. PSNR of identical
    images), nan when inf and finite values mix."""
    v = np.asarray(list(values), np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    if np.all(v == v[0]):
        std = 0.0
    elif np.isfinite(v).all():
        std = float(v.std(ddof=0))
    else:
        std = float("nan")  # inf mixed with finite values (PSNR of some identical pairs)
    return {"mean": float(v.mean()), "std": std, "n": int(v.size)}


def fmt(summary: Mapping | float | None, digits: int = 4) -> str:
    """``"12.3400 ± 0.5600"`` for a summary, the number alone for a float, "–" for None."""
    if summary is None:
        return "–"
    if isinstance(summary, Mapping):
        if summary.get("n", 1) == 0:
            return "–"
        return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"
    return f"{summary:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def versions() -> dict:
    """Versions of what computed the numbers, and the devices."""
    import importlib.metadata as md

    import jax

    out = {"python": platform.python_version()}
    for pkg in ("smooth-jax", "jax", "jaxlib", "flax", "diffusers", "transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if out["smooth-jax"] is None:
        from smooth_jax import __version__

        out["smooth-jax"] = __version__
    devices = jax.devices()
    out["backend"] = jax.default_backend()
    out["devices"] = f"{len(devices)} x {devices[0].device_kind}"
    return out


def unit_images(images) -> np.ndarray:
    """Decoder output ``[N, 3, H, W]`` in about [-1, 1] -> float32 [0, 1]: ``(x + 1) / 2`` clipped,
    as diffusers' postprocessing (not quantised to uint8). Every metric here sees this."""
    x = np.asarray(images, np.float32)
    return np.clip((x + 1.0) / 2.0, 0.0, 1.0)


def unit_to_uint8(images01) -> np.ndarray:
    """``[N, 3, H, W]`` in [0, 1] -> uint8 ``[N, H, W, 3]`` (rounded), for grids."""
    x = np.clip(np.asarray(images01, np.float32), 0.0, 1.0)
    return np.round(x * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def progress(total: int, initial: int, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


# --- the output folder ------------------------------------------------------------------------


class RunDir:
    """The ``--out`` folder of one evaluation run (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, config: Mapping):
        self.path = Path(out)
        self.config = normalize(dict(config))
        self.partial = self.path / "partial.jsonl"

    def check(self) -> bool:
        """Compare this run's config with the folder's run_config.json, writing nothing. Returns
        True when the folder holds this run already (a resume). Raises ``ConfigMismatchError``
        naming the first differing field."""
        cfg_file = self.path / "run_config.json"
        if not cfg_file.exists():
            return False
        old = json.loads(cfg_file.read_text())
        diff = first_difference(old, self.config)
        if diff:
            field, was, now = diff
            raise ConfigMismatchError(
                f"{self.path} holds a run with a different config: field {field!r} is {was!r} there and "
                f"{now!r} now (see {cfg_file}). Rerun with the same arguments to resume it, or use another --out."
            )
        return True

    def start(self) -> bool:
        """``check``, then write run_config.json for a new run. Returns True when resuming. A
        partial.jsonl whose last line was cut by a crash is truncated to its last complete line.

        Runs call ``check`` first, load the model and metric networks, then ``start``: a run that
        fails to load (a wrong path) leaves no config behind to block the corrected command.
        """
        if self.check():
            self._repair_partial()
            return True
        self.path.mkdir(parents=True, exist_ok=True)
        cfg_file = self.path / "run_config.json"
        atomic_write(cfg_file, (json.dumps(self.config, indent=2, ensure_ascii=False) + "\n").encode())
        return False

    def _repair_partial(self) -> None:
        if not self.partial.exists():
            return
        data = self.partial.read_bytes()
        if data and not data.endswith(b"\n"):
            atomic_write(self.partial, data[: data.rfind(b"\n") + 1])

    def records(self) -> dict[tuple[str, int], dict]:
        """``{(model, item): record}`` from partial.jsonl (first occurrence wins)."""
        out: dict[tuple[str, int], dict] = {}
        if not self.partial.exists():
            return out
        with open(self.partial, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash; its item is recomputed
                out.setdefault((rec["model"], int(rec["item"])), rec)
        return out

    def append(self, record: Mapping) -> None:
        """One finished (model, item), durable before this returns."""
        line = json.dumps(normalize(dict(record)), ensure_ascii=False) + "\n"
        with open(self.partial, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def by_model(self, models: Sequence[str], num_items: int) -> dict[str, list[dict]]:
        """Every model's records in item order; an error if any is missing."""
        recs = self.records()
        missing = [(m, i) for m in models for i in range(num_items) if (m, i) not in recs]
        if missing:
            raise RuntimeError(f"{len(missing)} results missing from {self.partial}, e.g. {missing[:3]}")
        return {m: [recs[(m, i)] for i in range(num_items)] for m in models}

    # arrays / features: written atomically before the record that refers to them

    def array_file(self, item: int, model: str) -> Path:
        return self.path / "arrays" / f"{item:05d}_{model}.npz"

    def save_arrays(self, item: int, model: str, **arrays) -> Path:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        path = self.array_file(item, model)
        atomic_write(path, buf.getvalue())
        return path

    def load_arrays(self, item: int, model: str) -> dict[str, np.ndarray]:
        with np.load(self.array_file(item, model)) as z:
            return {k: z[k] for k in z.files}

    def feature_file(self, name: str) -> Path:
        return self.path / "features" / f"{name}.npy"

    def save_features(self, name: str, features) -> None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(features, np.float32))
        atomic_write(self.feature_file(name), buf.getvalue())

    def load_features(self, name: str) -> np.ndarray:
        return np.load(self.feature_file(name))

    def grid_file(self, name: str) -> Path:
        return self.path / "grids" / name

    def write_results(self, results: Mapping, markdown: str) -> tuple[Path, Path]:
        rj, rm = self.path / "results.json", self.path / "results.md"
        text = json.dumps(strict_json(normalize(dict(results))), indent=2, ensure_ascii=False)
        atomic_write(rj, (text + "\n").encode())
        atomic_write(rm, (markdown.rstrip() + "\n").encode())
        return rj, rm


def skipped_lines(skipped: Mapping[str, str]) -> list[str]:
    """One printable line per metric left out for missing weights (empty when none)."""
    return [f"skipped {name}: {why}" for name, why in skipped.items()]
