"""Meshes, partition rules, global batches and multi-host start-up.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallel too, but the
frozen base weights may also be split along it). The batch is split over both. The LoRA and its
optimizer state are small (1.6M params for SD-1.5) and are replicated.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Sequence

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


_BARRIER_COUNTS: dict[str, int] = {}


def sync_hosts(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process reaches this point (no-op in a single process).

    Uses the coordination service, not a collective: on CPU the gloo rendezvous that opens each
    new set of devices gives up after a fixed 30 s, so processes that drift apart by more (one
    compiles or loads more slowly on a busy machine) must meet here first. Every process must
    call it with the same names in the same order.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:  # multi-process without jax.distributed (e.g. a TPU runtime): nothing to wait on
        return
    n = _BARRIER_COUNTS[name] = _BARRIER_COUNTS.get(name, 0) + 1
    try:
        client.wait_at_barrier(f"smooth_jax:{name}:{n}", int(timeout_s * 1000))
    except Exception as e:
        raise RuntimeError(f"process {jax.process_index()} waited {timeout_s:.0f} s at '{name}' for the other "
                           f"{jax.process_count() - 1} process(es); one of them has died or is stuck: {e}") from e


class SyncedFirstCall:
    """A jitted function that, on its first call, compiles, waits for all processes, then runs.

    Processes compile at different speeds; meeting after the compile keeps the first run's new
    collectives inside gloo's 30 s rendezvous window. Later calls reuse the executable, so their
    arguments must keep the first call's shapes and shardings (true of a train step).
    """

    def __init__(self, jitted: Callable, name: str):
        self.jitted, self.name = jitted, name
        self._compiled = None

    def __call__(self, *args):
        if jax.process_count() == 1:
            return self.jitted(*args)
        if self._compiled is None:
            self._compiled = self.jitted.lower(*args).compile()
            sync_hosts(f"compiled {self.name}")
        return self._compiled(*args)


def pin_gloo_transport(hostname: str = "", interface: str = "") -> bool:
    """Make CPU collectives (gloo over TCP) use this address or network interface.

    Left alone, gloo binds the address the machine's hostname resolves to, which on a cluster is
    often the slow management NIC (name the fast one, e.g. ib0) and in a container may not be
    one the processes can reach each other on. Processes on one machine should use 127.0.0.1.
    Must run before jax.distributed.initialize. Returns True if anything was pinned.
    """
    if not hostname and not interface:
        return False
    import functools

    from jax._src import xla_bridge
    from jax._src.lib import _jax

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("SMOOTH_JAX_GLOO_HOSTNAME / SMOOTH_JAX_GLOO_INTERFACE must be applied before jax "
                           "creates its devices (before jax.distributed.initialize).")
    make = getattr(_jax, "make_gloo_tcp_collectives", None)
    if make is None:
        raise RuntimeError(f"SMOOTH_JAX_GLOO_HOSTNAME / SMOOTH_JAX_GLOO_INTERFACE: this jaxlib ({jax.__version__}) "
                           "has no gloo TCP collectives to configure; unset them.")
    make = getattr(make, "func", make)  # pinning twice replaces, never stacks
    kwargs = {k: v for k, v in (("hostname", hostname), ("interface", interface)) if v}
    _jax.make_gloo_tcp_collectives = functools.partial(make, **kwargs)
    return True


def maybe_initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
    """Start jax.distributed when more than one process is asked for.

    Arguments win; otherwise SMOOTH_JAX_COORDINATOR / SMOOTH_JAX_NUM_PROCESSES / SMOOTH_JAX_PROCESS_ID
    (our localhost and SLURM launchers set these). On TPU pods and under SLURM, jax can detect
    everything itself: set SMOOTH_JAX_DISTRIBUTED=auto. CPU collectives follow
    SMOOTH_JAX_GLOO_HOSTNAME / SMOOTH_JAX_GLOO_INTERFACE (see ``pin_gloo_transport``).
    Returns True if it initialised.
    """
    coordinator = coordinator or os.environ.get("SMOOTH_JAX_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("SMOOTH_JAX_NUM_PROCESSES", "0"))
    process_id = process_id if process_id >= 0 else int(os.environ.get("SMOOTH_JAX_PROCESS_ID", "-1"))
    pin = lambda: pin_gloo_transport(os.environ.get("SMOOTH_JAX_GLOO_HOSTNAME", ""),  # noqa: E731
                                     os.environ.get("SMOOTH_JAX_GLOO_INTERFACE", ""))
    if os.environ.get("SMOOTH_JAX_DISTRIBUTED") == "auto":
        pin()
        jax.distributed.initialize()
        return True
    if num_processes > 1:
        if not coordinator or process_id < 0:
            raise ValueError("Multi-process run: set the coordinator address and this process's id "
                             "(SMOOTH_JAX_COORDINATOR, SMOOTH_JAX_PROCESS_ID).")
        pin()
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        return True
    return False
