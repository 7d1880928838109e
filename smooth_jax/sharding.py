"""Meshes, partition rules, global batches and multi-host start-up.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallel too, but the
frozen base weights may also be split along it). The batch is split over both. The LoRA and its
optimizer state are small (1.6M params for SD-1.5) and are replicated.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from smooth_jax import lora as lora_lib

BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: Mapping[str, int], devices: Sequence[Any] | None = None, num_devices: int = 0) -> Mesh:
    """Mesh over ``devices`` (default all, or the first ``num_devices``) with axes ('data', 'fsdp');
    one size may be -1 (the rest).

    shape: e.g. {"data": -1, "fsdp": 1}. Devices are laid out so that the fsdp axis is innermost
    (neighbouring devices, the fastest links on TPU slices and NVLink islands).
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"mesh.num_devices={num_devices} but only {len(devices)} devices exist.")
        devices = devices[:num_devices]
    sizes = {name: int(shape.get(name, 1)) for name in BATCH_AXES}
    unknown = set(shape) - set(BATCH_AXES)
    if unknown:
        raise ValueError(f"mesh.shape has unknown axes {sorted(unknown)}; the axes are {BATCH_AXES}.")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh.shape {dict(shape)}: at most one axis may be -1.")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if free:
        if len(devices) % fixed:
            raise ValueError(f"mesh.shape {dict(shape)} does not divide {len(devices)} devices.")
        sizes[free[0]] = len(devices) // fixed
    if int(np.prod(list(sizes.values()))) != len(devices):
        raise ValueError(f"mesh.shape {sizes} needs {int(np.prod(list(sizes.values())))} devices; there are {len(devices)}.")
    grid = np.asarray(devices, dtype=object).reshape(sizes["data"], sizes["fsdp"])
    return Mesh(grid, BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Split dim ``leading`` (the batch dim, after ``leading`` unsplit dims) over data x fsdp."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def _fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Split the largest dim that n divides over 'fsdp'; replicate tensors too small to gain."""
    if n == 1 or int(np.prod(shape)) < 2**14:
        return P()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % n == 0:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(tree: Any, rules: Sequence[tuple[str, str]], mesh: Mesh) -> Any:
    """NamedShardings for a param tree (arrays or shapes) from (regex, kind) rules.

    kind: 'replicate' or 'fsdp' (largest divisible dim over the fsdp axis). The first rule whose
    regex matches the '/'-joined param path wins; unmatched params are replicated.
    """
    compiled = [(re.compile(pattern), kind) for pattern, kind in rules]
    for _, kind in compiled:
        if kind not in ("replicate", "fsdp"):
            raise ValueError(f"Partition rule kind {kind!r} is not 'replicate' or 'fsdp'.")
    n = mesh.shape["fsdp"]
    flat = lora_lib.flatten(tree)
    out = {}
    for path, leaf in flat.items():
        kind = next((k for c, k in compiled if c.search(path)), "replicate")
        spec = _fsdp_spec(tuple(leaf.shape), n) if kind == "fsdp" else P()
        out[path] = NamedSharding(mesh, spec)
    return lora_lib.unflatten(out)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, leading: int = 0) -> dict[str, jax.Array]:
    """Per-host numpy batch -> global jax arrays split over data x fsdp along dim ``leading``.

    Each host passes only its own slice; the global batch is the concatenation over hosts.
    """
    sharding = batch_sharding(mesh, leading)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def maybe_initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
    """Start jax.distributed when more than one process is asked for.

    Arguments win; otherwise SMOOTH_JAX_COORDINATOR / SMOOTH_JAX_NUM_PROCESSES / SMOOTH_JAX_PROCESS_ID
    (our localhost and SLURM launchers set these). On TPU pods and under SLURM, jax can detect
    everything itself: set SMOOTH_JAX_DISTRIBUTED=auto. Returns True if it initialised.
    """
    coordinator = coordinator or os.environ.get("SMOOTH_JAX_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("SMOOTH_JAX_NUM_PROCESSES", "0"))
    process_id = process_id if process_id >= 0 else int(os.environ.get("SMOOTH_JAX_PROCESS_ID", "-1"))
    if os.environ.get("SMOOTH_JAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        return True
    if num_processes > 1:
        if not coordinator or process_id < 0:
            raise ValueError("Multi-process run: set the coordinator address and this process's id "
                             "(SMOOTH_JAX_COORDINATOR, SMOOTH_JAX_PROCESS_ID).")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        return True
    return False
