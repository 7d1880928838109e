"""PyTorch state dicts <-> Flax param trees, driven by the target tree's shapes.

The rules are the ones diffusers' and transformers' Flax ports imply: ``ModuleList`` indices
become ``_N`` suffixes (diffusers) or path components (transformers CLIP), Linear weights are
transposed to (in, out), Conv weights go from (O, I, kh, kw) to (kh, kw, I, O), norm weights
become ``scale`` and embedding weights ``embedding``. Instead of hard-coding which naming applies
where, every PyTorch key is matched against the paths that actually exist in the target tree,
so one converter serves the UNet, the VAE and the text encoder, and any key that fits nothing is
reported by name.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Mapping, Sequence

import numpy as np

from smooth_jax import lora as lora_lib

# diffusers' PyTorch VAE names its attention projections to_q/to_k/to_v/to_out.0; the Flax VAE
# kept the older query/key/value/proj_attn names.
VAE_RENAMES: tuple[tuple[str, str], ...] = (
    (r"\.to_q\.", ".query."),
    (r"\.to_k\.", ".key."),
    (r"\.to_v\.", ".value."),
    (r"\.to_out\.0\.", ".proj_attn."),
)

# Buffers that PyTorch keeps in the state dict but that are not parameters.
IGNORED = (r".*\.position_ids$", r".*num_batches_tracked$")


def _module_candidates(module: str) -> list[str]:
    """Every Flax path a dotted PyTorch module name may correspond to (index joined with ``_`` or
    kept as its own path component)."""
    parts = module.split(".")
    slots: list[list[str]] = []
    for i, part in enumerate(parts):
        if i == 0:
            slots.append([part])
        elif part.isdigit():
            slots.append(["_" + part, "/" + part])
        else:
            slots.append(["/" + part])
    return ["".join(choice) for choice in itertools.product(*slots)]


_LEAF_NAMES = {"weight": ("kernel", "scale", "embedding"), "bias": ("bias",)}


def _to_flax_layout(value: np.ndarray, target_shape: tuple[int, ...], leaf: str) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 4 and len(target_shape) == 4:
            return np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):
            # Old VAE checkpoints store attention projections as 1x1 convs.
            value = value[:, :, 0, 0]
        if value.ndim == 2:
            return value.T
    return value


def _match(key: str, flat_target: Mapping[str, Any], renames, source: str) -> str:
    """The one Flax param path that PyTorch ``key`` names, or a ValueError naming the key."""
    renamed = key
    for pattern, repl in renames:
        renamed = re.sub(pattern, repl, renamed)
    module, _, leaf_pt = renamed.rpartition(".")
    matches = [
        f"{m}/{leaf}"
        for m in _module_candidates(module)
        for leaf in _LEAF_NAMES.get(leaf_pt, ())
        if f"{m}/{leaf}" in flat_target
    ]
    if not matches:
        raise ValueError(f"{source}: key {key!r} matches no parameter of the Flax model (unexpected key).")
    if len(matches) > 1:
        raise ValueError(f"{source}: key {key!r} is ambiguous between Flax params {matches}.")
    return matches[0]


def is_buffer(key: str) -> bool:
    return any(re.match(p, key) for p in IGNORED)


def torch_to_flax(
    state: Mapping[str, np.ndarray],
    target: Mapping[str, Any],
    *,
    renames: Sequence[tuple[str, str]] = (),
    source: str = "state dict",
) -> dict[str, Any]:
    """Convert a PyTorch state dict (numpy arrays) to a Flax param tree shaped like ``target``.

    target: nested dict of arrays or ShapeDtypeStructs (e.g. from ``jax.eval_shape(init)``).
    Raises ValueError naming ``source`` and the key for: a key that fits no target param, a shape
    that disagrees after layout conversion, and target params that no key provides.
    """
    flat_target = lora_lib.flatten(target)
    out: dict[str, np.ndarray] = {}
    for key in sorted(state):
        if is_buffer(key):
            continue
        path = _match(key, flat_target, renames, source)
        shape = tuple(flat_target[path].shape)
        value = _to_flax_layout(np.asarray(state[key]), shape, path.rsplit("/", 1)[1])
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{source}: key {key!r} has shape {tuple(np.shape(state[key]))}, which does not fit Flax "
                f"param {path!r} of shape {shape}: the weights are for a different architecture."
            )
        if path in out:
            raise ValueError(f"{source}: Flax param {path!r} is provided twice (second time by {key!r}).")
        dtype = getattr(flat_target[path], "dtype", value.dtype)
        out[path] = np.ascontiguousarray(value.astype(dtype, copy=False))
    missing = sorted(set(flat_target) - set(out))
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"{source}: {len(missing)} Flax params have no weights in the file: {shown}")
    return lora_lib.unflatten(out)


def flax_to_torch(
    params: Mapping[str, Any],
    torch_shapes: Mapping[str, Sequence[int]],
    *,
    renames: Sequence[tuple[str, str]] = (),
    source: str = "Flax params",
) -> dict[str, np.ndarray]:
    """The inverse: a PyTorch state dict (numpy) for a model whose state-dict keys and shapes are
    ``torch_shapes`` (e.g. ``{k: v.shape for k, v in module.state_dict().items()}``). Buffers such
    as ``position_ids`` are left out; every Flax param must be used exactly once."""
    flat = lora_lib.flatten(params)
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for key, shape in sorted(torch_shapes.items()):
        if is_buffer(key):
            continue
        path = _match(key, flat, renames, source)
        value = np.asarray(flat[path])
        if path.endswith("/kernel"):
            if value.ndim == 4:
                value = np.transpose(value, (3, 2, 0, 1))
            elif value.ndim == 2:
                value = value.T
                if len(shape) == 4:
                    value = value[:, :, None, None]
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{source}: param {path!r} becomes shape {value.shape}, but {key!r} needs {tuple(shape)}.")
        out[key] = np.ascontiguousarray(value)
        used.add(path)
    unused = sorted(set(flat) - used)
    if unused:
        raise ValueError(f"{source}: {len(unused)} Flax params have no PyTorch key: {unused[:8]}")
    return out
