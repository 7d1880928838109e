"""Capacity planning: compile the real regularized train step for a pod you don't have.

``smooth-jax plan`` lowers and compiles ``train.make_train_step`` (the Smooth Diffusion step:
UNet forward, the vjp for ||J^T u||, and the second-order parameter gradient) ahead of time for
TPU topologies and GPU nodes, on this CPU, with ShapeDtypeStruct inputs that carry the same
NamedShardings as ``smooth-jax train``. Nothing is allocated and no weights are needed.

- TPU (v4-8, v5e-16, v5p-8, v6e-8): the PyPI ``libtpu`` wheel compiles for
  ``jax.experimental.topologies.get_topology_desc(platform="tpu", ...)`` devices. The compile
  gives memory per chip (an HBM overflow is a compile error) and bytes accessed.
- GPU (8xA100-80GB, 8xH100): ``jax-cuda12-plugin`` + ``jax-cuda12-pjrt`` compile for a
  GpuTargetConfig text proto (``launch/gpu_targets/*.txtpb``) with no GPU and no CUDA runtime.
  That compile gives memory only: bytes accessed are estimated (marked as such).

FLOPs, on every target, are the step's matmuls and convolutions counted from its jaxpr at
per-device shapes (XLA's TPU cost analysis counts a loop body once).

Predicted step time per device is the roofline ``max(flops / peak, bytes / bandwidth)``: a lower
bound that real steps reach at 100% utilisation only. Install with ``pip install -e .[plan]`` or
``bash launch/install.sh --plan``.

    smooth-jax plan                                   # sd15, every target, batch 1 per device, 512 px
    smooth-jax plan --model sd15 --targets v5e-16 --batch 1
    smooth-jax plan --targets v5p-8 8xa100 --search --remat none full --dtype float32 bfloat16 --out plan_out
    smooth-jax plan --merge run_a/plan.json run_b/plan.json --out plan_all   # join runs, no compile
    smooth-jax plan --targets v4-8 --search --reuse plan_all/plan.json --out v4   # resume: reuse those compiles

Full SD-1.5 compiles take minutes each on a small CPU (DESIGN.md §4: ~7 min for batch 1 on
2 cores); ``--model tiny`` checks the machinery in seconds.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

GiB = 1024**3
_REPO = Path(__file__).resolve().parent.parent
GPU_TARGET_DIR = _REPO / "launch" / "gpu_targets"
BASE_CONFIG = _REPO / "configs" / "sd15_smooth_lora.py"
INSTALL_HINT = "pip install -e '.[plan]' (or: bash launch/install.sh --plan)"


class PlanError(ValueError):
    """Something needed for a plan is missing; the message says what to install or pass (a
    ValueError, so the CLI prints it as a one-line error)."""


# --- targets ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """One pod or node: how to make its devices, and the per-device numbers of its chip.

    peak_flops: dense bf16 FLOP/s per device. peak_flops_f32: what an fp32 matmul runs at with
    JAX's default precision (TPU: one bf16 MXU pass, so the bf16 peak; Ampere/Hopper: TF32).
    """

    name: str
    platform: str  # "tpu" | "cuda"
    chip: str
    devices: int
    hbm_bytes: int  # what a program may use: TPU, the HBM libtpu's compiler allows; GPU, the target config's
    peak_flops: float
    peak_flops_f32: float
    hbm_bandwidth: float  # bytes/s
    topology: dict  # TPU: get_topology_desc kwargs; GPU: {"target_config": file name}
    source: str  # where the chip numbers come from


# HBM per chip that libtpu's compiler lets one program use (GiB), a little under the datasheet's
# (32 / 16 / 95 / 32 GiB): what its "exceeds available HBM (X G)" error names. Checked by
# tests/test_plan.py::test_tpu_hbm_is_what_libtpu_allows, which compiles an oversized program.
TPU_AVAILABLE_HBM_GIB = {"v4-8": 30.75, "v5e-16": 15.75, "v5p-8": 95.74, "v6e-8": 31.25}


def _tpu(name, chip, topology_name, bounds, devices, flops, bw, source, chip_config="default"):
    topo = dict(topology_name=topology_name, chip_config_name=chip_config, chips_per_host_bounds=bounds,
                num_slices=1, wrap=(False, False, False))
    hbm = int(TPU_AVAILABLE_HBM_GIB[name] * GiB)
    return Target(name, "tpu", chip, devices, hbm, flops, flops, bw, topo, source)


TARGETS: dict[str, Target] = {t.name: t for t in [
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s per chip. v4-8 = 4 chips
    # on one host; each chip's two TensorCores run as one megacore device.
    _tpu("v4-8", "TPU v4", "v4:2x2x1", (2, 2, 1), 4, 275e12, 1200e9,
         "cloud.google.com/tpu/docs/v4", chip_config="megacore"),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s. v5e-16 = 4x4 chips, 4 hosts of 2x2.
    _tpu("v5e-16", "TPU v5e", "v5e:4x4", (2, 2, 1), 16, 197e12, 819e9, "cloud.google.com/tpu/docs/v5e"),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e, 2765 GB/s. v5p-8 = 4 chips (megacore).
    _tpu("v5p-8", "TPU v5p", "v5p:2x2x1", (2, 2, 1), 4, 459e12, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GiB HBM, 1638 GB/s. v6e-8 = 2x4 chips on one host.
    _tpu("v6e-8", "TPU v6e", "v6e:2x4", (2, 4, 1), 8, 918e12, 1638e9, "cloud.google.com/tpu/docs/v6e"),
    # NVIDIA A100 datasheet: bf16 tensor core 312 TFLOP/s dense (624 sparse), TF32 156 dense,
    # 80 GB HBM2e at 2039 GB/s (SXM4). HBM size as the target config reports it.
    Target("8xa100", "cuda", "A100-SXM4-80GB", 8, 85_100_068_864, 312e12, 156e12, 2039e9,
           {"target_config": "a100_sxm_80gb.txtpb"}, "NVIDIA A100 datasheet"),
    # NVIDIA H100 datasheet (SXM5): bf16 989 TFLOP/s dense (1979 sparse), TF32 495 dense, 80 GB HBM3 at 3.35 TB/s.
    Target("8xh100", "cuda", "H100-SXM5-80GB", 8, 84_978_434_048, 989e12, 495e12, 3350e9,
           {"target_config": "h100_sxm_80gb.txtpb"}, "NVIDIA H100 datasheet"),
]}


def devices_for(target: Target) -> list:
    """Compile-only device objects of the target's topology (no hardware needed)."""
    if target.platform == "tpu":
        return _tpu_devices(target)
    if target.platform == "cuda":
        return _gpu_devices(target)
    raise ValueError(f"target {target.name}: unknown platform {target.platform!r}")


def _tpu_devices(target: Target) -> list:
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise PlanError(f"target {target.name}: TPU compiles need the libtpu wheel; {INSTALL_HINT}.") from e
    # Any other jax process on this machine has loaded libtpu too (it holds /tmp/libtpu_lockfile);
    # a compile-only topology needs no exclusive access to chips.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = topologies.get_topology_desc(platform="tpu", **target.topology).devices
    if len(devices) != target.devices:
        raise PlanError(f"target {target.name}: topology {target.topology} gave {len(devices)} devices, "
                        f"expected {target.devices}.")
    return list(devices)


def gpu_target_config(target: Target) -> str:
    path = GPU_TARGET_DIR / target.topology["target_config"]
    if not path.is_file():
        raise PlanError(f"target {target.name}: GPU target config {path} is missing.")
    return path.read_text()


def prepare_gpu_plugin() -> None:
    """Let jax register the CUDA plugin on a machine without CUDA: its start-up check of the CUDA
    runtime version would otherwise refuse to register it. Only effective before jax starts its
    backends; ``_gpu_devices`` loads the plugin itself when it was not registered."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def _gpu_devices(target: Target) -> list:
    from jax._src import xla_bridge as xb
    from jax._src.lib import xla_client

    config = gpu_target_config(target)
    topology = f"1 x 1 x {target.devices}"  # slices x hosts x devices per host
    xb.backends()  # discovers plugins (the cuda one registers if prepare_gpu_plugin ran first)
    if "cuda" in xb._topology_factories:
        topo = xb.make_pjrt_topology("cuda", "", topology=topology, target_config=config)
    else:
        try:
            from jax_plugins import xla_cuda12
        except ImportError as e:
            raise PlanError(f"target {target.name}: GPU compiles need jax-cuda12-plugin and jax-cuda12-pjrt; "
                            f"{INSTALL_HINT}.") from e
        path = xla_cuda12._get_library_path()
        if path is None:
            raise PlanError(f"target {target.name}: jax-cuda12-pjrt's plugin library is missing; {INSTALL_HINT}.")
        c_api = xla_client.load_pjrt_plugin_dynamically("cuda", str(path))
        topo = xla_client.make_c_api_device_topology(c_api, "", topology=topology, target_config=config)
    return list(topo._make_compile_only_devices())


# --- one compile --------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    target: str
    model: str
    resolution: int
    inputs: str  # "images" (VAE + text encoder in the step) | "latents" (cached encodings)
    regularized: bool
    remat: str
    compute_dtype: str
    batch_per_device: int
    devices: int
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    total_bytes: int = 0  # arguments + outputs - aliased (donated) + temporaries + code
    hbm_bytes: int = 0
    fits: bool = False
    attention: str = ""  # the attention kernel compiled ("xla" | "chunked")
    flops: float = 0.0  # per device per step: matmuls + convolutions counted from the jaxpr
    flops_source: str = ""  # "counted"
    compile_flops: float = 0.0  # XLA's cost analysis (TPU only): all ops, but loop bodies once
    bytes_accessed: float = 0.0
    bytes_source: str = ""  # "compile" | "estimate"
    t_compute_s: float = 0.0
    t_memory_s: float = 0.0
    step_time_s: float = 0.0
    images_per_s: float = 0.0  # whole pod, at the predicted step time
    compile_s: float = 0.0
    error: str = ""  # compile error (e.g. the HBM overflow on TPU)
    compiler_options: str = ""  # XLA options compiled with (--xla-option, GPU_RETRY's retry); "" for XLA's defaults
    config_digest: str = ""  # config_digest() of the compiled config; "" in files from before it was recorded
    compile_rss_bytes: int = 0  # peak host RAM of the compiling process (its own child process unless in-process)


def total_memory(mem) -> int:
    """Per-device bytes the executable needs: arguments + outputs - aliased + temporaries + code."""
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
               + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)


def predicted_step_time(flops: float, bytes_accessed: float, peak_flops: float, bandwidth: float) -> tuple[float, float, float]:
    """Roofline per device: (compute time, memory time, max of the two) in seconds."""
    t_c = flops / peak_flops if peak_flops > 0 else 0.0
    t_m = bytes_accessed / bandwidth if bandwidth > 0 else 0.0
    return t_c, t_m, max(t_c, t_m)


# XLA:GPU's Triton GEMM emitter has no tiling for some dot shapes (seen: the text encoder's
# [7*77, 768] projections at batch 7 per GPU, "Couldn't find output tile sizes"); such a compile is
# retried with cuBLAS GEMMs, as a user on that node would have to, and the row says so.
GPU_RETRY = ("Couldn't find output tile sizes", {"xla_gpu_enable_triton_gemm": False})


def _options_text(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


def compile_for(target: Target, lowered, options: dict | None = None) -> tuple[Any, str]:
    """(executable, the XLA options it was compiled with or ""), bypassing the persistent cache
    (topology executables cannot be loaded back from it). ``options``: the user's (``--xla-option``);
    a GPU compile that hits XLA's Triton tiling error is retried with GPU_RETRY's added."""
    from smooth_jax import runtime

    options = dict(options or {})
    try:
        return runtime.compile_uncached(lowered, options or None), _options_text(options)
    except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error types
        if target.platform != "cuda" or GPU_RETRY[0] not in str(e) or GPU_RETRY[1].items() <= options.items():
            raise
    options.update(GPU_RETRY[1])
    return runtime.compile_uncached(lowered, options), _options_text(options)


# Compile options that jax sets on XLA's build options rather than its debug options.
BUILD_OPTIONS = ("exec_time_optimization_effort", "memory_fitting_effort", "optimization_level", "memory_fitting_level")
# The *_level options take XLA's effort levels, whose numbers are not their names.
EFFORT_LEVELS = {"o0": 9, "o1": 19, "o2": 29, "o3": 39}


def parse_xla_options(items: Sequence[str]) -> dict:
    """``["xla_gpu_enable_triton_gemm=false", ...]`` -> {name: bool | int | float | str}."""
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not (name.startswith("xla_") or name in BUILD_OPTIONS):
            raise PlanError(f"--xla-option {item!r}: expected NAME=VALUE with an XLA option name (xla_...) "
                            f"or one of {', '.join(BUILD_OPTIONS)}.")
        low = text.strip().lower()
        if name.endswith("_level") and name in BUILD_OPTIONS and low in EFFORT_LEVELS:
            out[name] = EFFORT_LEVELS[low]
            continue
        if low in ("true", "false"):
            out[name] = low == "true"
            continue
        for kind in (int, float):
            try:
                out[name] = kind(text)
                break
            except ValueError:
                pass
        else:
            out[name] = text
    return out


def _is_oom(err: Exception) -> bool:
    text = str(err)
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Ran out of memory", "exceeds the memory", "out of memory",
                                   "Exceeded hbm capacity", "hbm capacity"))


def _config(base_config, model: str, remat: str, dtype: str, resolution: int, platform: str = "tpu"):
    import ml_collections

    from smooth_jax import attention

    c = ml_collections.ConfigDict(base_config.to_dict())
    # "auto" means the target's choice, not this CPU's.
    c.train.attention = attention.resolve(c.train.get("attention", "auto"), platform)
    c.model = model
    c.train.remat = remat
    c.train.compute_dtype = dtype
    c.train.grad_accum = 1
    c.data.resolution = resolution
    return c


def config_digest(config, xla_options: dict | None = None) -> str:
    """Short hash of the config a step was compiled from (and the ``--xla-option``s, when any):
    ``--reuse`` takes an earlier compile only for the same config (the remat/dtype/resolution/
    attention it was built with included) and options."""
    import hashlib

    payload = config.to_dict() if not xla_options else {"config": config.to_dict(), "xla": dict(xla_options)}
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _model(model: str, dtype: str):
    from smooth_jax import train
    from smooth_jax.models import load_architecture

    return load_architecture(model, dtype=train._dtype(dtype, "train.compute_dtype"))


def _abstract_inputs(sd, config, batch_global: int, inputs: str, unet_shapes=None):
    """(state, frozen, batch) as ShapeDtypeStructs, unsharded; batch with grad-accum axis 1."""
    import jax
    import jax.numpy as jnp

    from smooth_jax import lora, train

    shapes = sd.param_shapes() if unet_shapes is None else unet_shapes
    frozen_dtype = train._dtype(config.train.frozen_dtype, "train.frozen_dtype")
    frozen = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, frozen_dtype if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype),
        {c: shapes[c] for c in ("unet", "vae", "text_encoder")})
    spec = lora.LoraSpec(rank=int(config.lora.rank), alpha=float(config.lora.alpha), targets=tuple(config.lora.targets))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    lora_shapes = jax.eval_shape(lambda k: lora.init(k, shapes["unet"], spec), key)
    tx = train.make_optimizer(config.train)
    state = jax.eval_shape(lambda t, k: train.create_train_state(t, tx, k), lora_shapes, key)
    res, f = int(config.data.resolution), sd.vae_scale_factor
    if res % (8 * f):
        raise ValueError(f"--resolution {res} must be a multiple of {8 * f} for this model.")
    b = batch_global
    if inputs == "images":
        batch = {"images": jax.ShapeDtypeStruct((1, b, 3, res, res), jnp.float32),
                 "input_ids": jax.ShapeDtypeStruct((1, b, sd.max_length), jnp.int32)}
    elif inputs == "latents":
        h = res // f
        batch = {"latents": jax.ShapeDtypeStruct((1, b, sd.latent_channels, h, h), jnp.float32),
                 "context": jax.ShapeDtypeStruct((1, b, sd.max_length, sd.context_dim), jnp.float32)}
    else:
        raise ValueError(f"--inputs {inputs!r}: choose 'images' or 'latents'.")
    return state, frozen, batch


def tree_bytes(tree) -> int:
    import jax
    import numpy as np

    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


# --- counted FLOPs (every target: the compilers' own counts miss loops or are absent) ------


def _dot_flops(eqn) -> float:
    import numpy as np

    (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    contract = int(np.prod([lhs.shape[d] for d in lc])) if lc else 1
    return 2.0 * float(np.prod(out.shape)) * contract


def _conv_flops(eqn) -> float:
    import numpy as np

    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]
    # rhs spec: (out feature dim, in feature dim, spatial dims...)
    rhs_spec = dn.rhs_spec
    kernel_in = rhs.shape[rhs_spec[1]]
    kernel_spatial = int(np.prod([rhs.shape[d] for d in rhs_spec[2:]]))
    return 2.0 * float(np.prod(out.shape)) * kernel_in * kernel_spatial


def count_flops(jaxpr) -> float:
    """Matmul and convolution FLOPs (2 per multiply-add) of a closed jaxpr, scan bodies times
    their length. Elementwise work is left out: the count is a lower bound of what a compiler's
    cost analysis reports."""
    return sum(count_flops_by_kind(jaxpr).values())


def count_flops_by_kind(jaxpr) -> dict[str, float]:
    """``count_flops`` split into {"dot": matmuls (attention, projections), "conv": convolutions}."""
    import jax

    def walk(jx) -> dict[str, float]:
        total = {"dot": 0.0, "conv": 0.0}
        for eqn in jx.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                total["dot"] += _dot_flops(eqn)
            elif name == "conv_general_dilated":
                total["conv"] += _conv_flops(eqn) / max(1, int(eqn.params.get("batch_group_count", 1)))
            sub = {"dot": 0.0, "conv": 0.0}
            for p in eqn.params.values():
                for j in (p if isinstance(p, (list, tuple)) else [p]):
                    inner = j.jaxpr if isinstance(j, jax.extend.core.ClosedJaxpr) else j
                    if isinstance(inner, jax.extend.core.Jaxpr):
                        sub = {k: sub[k] + v for k, v in walk(inner).items()}
            if name == "scan":
                factor = int(eqn.params["length"])
            elif name == "while":
                factor = 0  # unknown trip count; the train step has none
            elif name == "cond":
                factor = 1 / max(1, len(eqn.params["branches"]))  # average of the branches
            else:
                factor = 1
            total = {k: total[k] + factor * sub[k] for k in total}
        return total

    return walk(jaxpr.jaxpr)


def counted_step_flops(step: Callable, state, frozen, batch_per_device) -> float:
    """FLOPs of one step at per-device shapes, counted from its jaxpr (no compile)."""
    import jax

    return count_flops(jax.make_jaxpr(step)(state, frozen, batch_per_device))


# --- the planner --------------------------------------------------------------------------


class Planner:
    """Compiles the train step for targets; caches per (target, remat, dtype, batch, regularized)."""

    def __init__(self, model: str = "sd15", resolution: int = 512, inputs: str = "images", base_config=None,
                 hbm_override: int | None = None, on_compile: Callable[[str], None] | None = None,
                 xla_options: dict | None = None, isolate: bool = False):
        """``isolate``: compile each step in a child process of its own. An SD-1.5 compile holds
        many GB of host RAM that a long-lived process does not give back (a TPU search with remat
        grew to ~39 GB by its fifth compile, although every executable was dropped); a child that
        exits does, so a search needs one compile's RAM. Costs a jax start-up (seconds) per compile."""
        from smooth_jax import config_loader

        prepare_gpu_plugin()
        self.model, self.resolution, self.inputs = model, int(resolution), inputs
        self.base_config = base_config if base_config is not None else config_loader.load_config(BASE_CONFIG)
        self.hbm_override = hbm_override  # bytes per device, instead of the chip's HBM
        self.on_compile = on_compile
        self.xla_options = dict(xla_options or {})  # passed to every compile, recorded in each Result
        self.isolate = bool(isolate)
        self._devices: dict[str, list] = {}
        self._models: dict[str, Any] = {}
        self._shapes = None
        self.cache: dict[tuple, Result] = {}

    def digest(self, target: Target | str, remat: str, dtype: str) -> str:
        target = TARGETS[target] if isinstance(target, str) else target
        return config_digest(_config(self.base_config, self.model, remat, dtype, self.resolution, target.platform),
                             self.xla_options)

    def reuse(self, results: Sequence[Result], default_config: bool) -> list[Result]:
        """Take earlier compiles (e.g. from ``merge_outputs``) as if compiled here, so that a
        search resumes where a stopped run left off. A result is taken when its model, resolution
        and inputs are this planner's and its config digest is the one this planner would compile
        (results saved before digests were recorded: only when ``default_config``, the base config
        with no overrides, which is what those runs used). The digest covers the config, not the
        code: a compile made before a change to the step is taken as it is. Returns the results taken."""
        taken = []
        for r in results:
            if (r.model, r.resolution, r.inputs) != (self.model, self.resolution, self.inputs) or r.target not in TARGETS:
                continue
            want = self.digest(r.target, r.remat, r.compute_dtype)
            if r.config_digest != want and not (not r.config_digest and default_config):
                continue
            key = self._key(r.target, r.batch_per_device, r.remat, r.compute_dtype, r.regularized)
            self.cache[key] = dataclasses.replace(r, config_digest=want)
            taken.append(r)
        return taken

    @staticmethod
    def _key(target: str, batch: int, remat: str, dtype: str, regularized: bool) -> tuple:
        return target, int(batch), remat, dtype, bool(regularized)

    def compiled_batches(self, target: str, remat: str, dtype: str) -> list[int]:
        """Batches of the regularized step already compiled (or reused) for this combination."""
        return sorted(k[1] for k in self.cache if k == self._key(target, k[1], remat, dtype, True))

    def devices(self, target: Target) -> list:
        if target.name not in self._devices:
            self._devices[target.name] = devices_for(target)
        return self._devices[target.name]

    def sd(self, dtype: str):
        if dtype not in self._models:
            self._models[dtype] = _model(self.model, dtype)
        return self._models[dtype]

    def unet_shapes(self, sd):
        if self._shapes is None:
            self._shapes = sd.param_shapes()
        return self._shapes

    def per_device_inputs(self, batch: int, remat: str = "none", dtype: str = "bfloat16"):
        """(state, frozen, batch) ShapeDtypeStructs of one device's share: what its arguments hold."""
        config = _config(self.base_config, self.model, remat, dtype, self.resolution)
        sd = self.sd(dtype)
        return _abstract_inputs(sd, config, batch, self.inputs, self.unet_shapes(sd))

    def step(self, remat: str = "none", dtype: str = "bfloat16", regularized: bool = True,
             platform: str = "tpu") -> Callable:
        from smooth_jax import train

        config = _config(self.base_config, self.model, remat, dtype, self.resolution, platform)
        return train.make_train_step(self.sd(dtype), config, regularize=regularized)

    def lower(self, target: Target, batch: int, remat: str, dtype: str, regularized: bool = True):
        """(lowered, step, (state, frozen, batch_per_device) ShapeDtypeStructs, config)."""
        import jax

        from smooth_jax import sharding, train

        config = _config(self.base_config, self.model, remat, dtype, self.resolution, target.platform)
        sd = self.sd(dtype)
        devices = self.devices(target)
        fsdp = int(dict(config.mesh.shape).get("fsdp", 1))
        mesh = sharding.make_mesh({"data": -1, "fsdp": fsdp}, devices=devices)
        state, frozen, batch_g = _abstract_inputs(sd, config, batch * len(devices), self.inputs, self.unet_shapes(sd))
        rep = sharding.replicated(mesh)
        state_sh = jax.tree_util.tree_map(lambda _: rep, state)
        frozen_sh = sharding.param_shardings(frozen, [tuple(r) for r in config.mesh.rules], mesh)
        batch_sh = sharding.batch_sharding(mesh, leading=1)
        attach = lambda tree, sh: jax.tree_util.tree_map(  # noqa: E731
            lambda s, x: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=x), tree, sh)
        args = (attach(state, state_sh), attach(frozen, frozen_sh),
                jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sh), batch_g))
        step = train.make_train_step(sd, config, regularize=regularized)
        jitted = jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, rep),
                         donate_argnums=0)
        _, _, batch_d = _abstract_inputs(sd, config, batch, self.inputs, self.unet_shapes(sd))
        return jitted.lower(*args), step, (state, frozen, batch_d), config

    def compile(self, target: Target | str, batch: int, remat: str = "none", dtype: str = "bfloat16",
                regularized: bool = True, hbm_bytes: int | None = None) -> Result:
        """Compile (or reuse) one step; ``fits`` is judged against ``hbm_bytes`` (default: the
        planner's ``hbm_override`` or the chip's HBM)."""
        target = TARGETS[target] if isinstance(target, str) else target
        hbm = int(hbm_bytes or self.hbm_override or target.hbm_bytes)
        key = self._key(target.name, batch, remat, dtype, regularized)
        if key not in self.cache:
            if self.isolate:
                self.cache[key] = self._compile_in_child(target, int(batch), remat, dtype, bool(regularized))
            else:
                self.cache[key] = self._compile(target, int(batch), remat, dtype, bool(regularized))
        r = dataclasses.replace(self.cache[key], hbm_bytes=hbm)
        r.fits = not r.error and r.total_bytes <= hbm
        return r

    @staticmethod
    def _describe(target: Target, batch: int, remat: str, dtype: str, regularized: bool) -> str:
        return f"{target.name} {'reg' if regularized else 'plain'} remat={remat} {dtype} b={batch}"

    def _compile_in_child(self, target: Target, batch: int, remat: str, dtype: str, regularized: bool) -> Result:
        what = self._describe(target, batch, remat, dtype, regularized)
        if self.on_compile:
            self.on_compile(what)
        spec = dict(model=self.model, resolution=self.resolution, inputs=self.inputs, base_config=self.base_config,
                    xla_options=self.xla_options)
        return run_in_child(_compile_child, (spec, jax_flags(), target.name, batch, remat, dtype, regularized),
                            what=f"compile of {what}")

    def _compile(self, target: Target, batch: int, remat: str, dtype: str, regularized: bool) -> Result:
        import jax

        if self.on_compile:
            self.on_compile(self._describe(target, batch, remat, dtype, regularized))
        r = Result(target=target.name, model=self.model, resolution=self.resolution, inputs=self.inputs,
                   regularized=regularized, remat=remat, compute_dtype=dtype, batch_per_device=batch,
                   devices=target.devices)
        t0 = time.perf_counter()
        lowered, step, per_device, config = self.lower(target, batch, remat, dtype, regularized)
        r.attention = str(config.train.attention)
        r.config_digest = config_digest(config, self.xla_options)
        try:
            compiled, r.compiler_options = compile_for(target, lowered, self.xla_options)
        except Exception as e:  # noqa: BLE001 - an HBM overflow is a compile error on TPU
            if not _is_oom(e):
                raise
            r.compile_s = time.perf_counter() - t0
            r.error = str(e).strip().splitlines()[0][:300]
            r.compile_rss_bytes = _peak_rss_bytes()
            del lowered
            jax.clear_caches()
            gc.collect()
            return r
        r.compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        r.argument_bytes, r.output_bytes = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
        r.alias_bytes, r.temp_bytes = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
        r.code_bytes = int(mem.generated_code_size_in_bytes)
        r.total_bytes = total_memory(mem)
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else None
        # XLA's cost analysis counts a loop body once (the chunked attention is a loop over heads
        # and query blocks): the jaxpr count multiplies scans by their length, on every platform.
        r.compile_flops = float(cost.get("flops", 0.0)) if cost else 0.0
        r.flops, r.flops_source = counted_step_flops(step, *per_device), "counted"
        if cost and cost.get("bytes accessed", 0) > 0:
            r.bytes_accessed, r.bytes_source = float(cost["bytes accessed"]), "compile"
        else:
            # No cost model: every argument read once, every temporary written and read once.
            r.bytes_accessed, r.bytes_source = float(r.argument_bytes + r.output_bytes + 2 * r.temp_bytes), "estimate"
        # Free the executable and JAX's trace/lowering caches before the next compile: an SD-1.5
        # program holds GBs, and a plan over every target grew one process past 24 GB without this.
        del compiled, lowered
        jax.clear_caches()
        gc.collect()
        r.compile_rss_bytes = _peak_rss_bytes()
        peak = target.peak_flops if dtype == "bfloat16" else target.peak_flops_f32
        r.t_compute_s, r.t_memory_s, r.step_time_s = predicted_step_time(r.flops, r.bytes_accessed, peak,
                                                                         target.hbm_bandwidth)
        r.images_per_s = batch * target.devices / r.step_time_s if r.step_time_s > 0 else 0.0
        return r


def _peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux VmHWM, which starts afresh at exec (a spawned
    child's ru_maxrss would carry its parent's peak over the fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, others KiB


def jax_flags() -> dict:
    """The jax config values of this process (``jax.config.update`` calls do not reach a child)."""
    import jax

    return dict(jax.config.values)


def _apply_jax_flags(flags: dict) -> None:
    import jax

    current = jax.config.values
    for name, value in flags.items():
        if name in current and current[name] != value:
            try:
                jax.config.update(name, value)
            except Exception:  # noqa: BLE001 - a flag that cannot change after start-up keeps its value
                pass


def _compile_child(spec: dict, flags: dict, target: str, batch: int, remat: str, dtype: str,
                   regularized: bool) -> Result:
    """One compile in a fresh process (``Planner(isolate=True)``), under the parent's jax flags
    (e.g. jax_default_matmul_precision changes the program)."""
    from smooth_jax import runtime

    runtime.setup(compilation_cache=False)
    _apply_jax_flags(flags)
    return Planner(**spec)._compile(TARGETS[target], batch, remat, dtype, regularized)


def _child_main(conn, fn: Callable, args: tuple) -> None:
    try:
        reply = ("ok", fn(*args))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
        reply = ("error", e, traceback.format_exc())
    try:
        conn.send(reply)
    except Exception:  # noqa: BLE001 - an exception that does not pickle: send its text
        conn.send(("error", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}"), reply[2]))
    conn.close()


def run_in_child(fn: Callable, args: tuple, what: str = "child process"):
    """``fn(*args)`` in a spawned process (fresh interpreter, nothing of this one's memory), its
    return value or exception handed back; ``fn`` and ``args`` must pickle. A child that dies
    without answering (killed for memory, a crash in native code) is a PlanError naming ``what``
    and how it ended."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # fork would copy this process's heap and jax's threads
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(send, fn, args), daemon=True)
    proc.start()
    send.close()  # the parent's copy: recv then sees EOF when the child ends without answering
    try:
        reply = recv.recv()
    except EOFError:
        reply = None
    except BaseException:  # interrupted: do not leave a compile running
        proc.kill()
        raise
    finally:
        recv.close()
        proc.join()
    if reply is None:
        from smooth_jax.runtime import describe_exit

        how = describe_exit(proc.exitcode)
        if proc.exitcode == -signal.SIGKILL:
            how += "; the compile needs more host RAM (add swap, or close other programs)"
        raise PlanError(f"{what}: the child process ended without a result ({how}).")
    if reply[0] == "error":
        err, tb = reply[1], reply[2]
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise err
        if isinstance(err, Exception):
            if hasattr(err, "add_note"):  # Python 3.11+
                err.add_note(f"(raised in the child process running the {what}; its traceback:)\n{tb}")
            raise err
        raise PlanError(f"{what}: {err!r}\n{tb}")
    return reply[1]


def search_batch(measure: Callable[[int], tuple[bool, int]], hbm_bytes: int, max_batch: int = 256,
                 refine: bool = True, known: dict[int, tuple[bool, int]] | None = None,
                 start: int | None = None) -> tuple[int, list[int]]:
    """Largest per-device batch b <= max_batch that fits, with few compiles.

    ``measure(b)`` compiles batch b and returns (fits, total bytes; 0 when the compile itself
    overflowed). A step's memory is close to affine in the batch (weights + b x activations), so
    after batches 1 and 2 the line through the two largest measured batches predicts the largest
    fitting batch, and the next compile tests it (then b+1, to prove it is the largest). Where the
    prediction is off (XLA's scheduling is not exactly linear) the bracket [largest fit, smallest
    non-fit] shrinks with each compile, bisecting when the line says nothing useful. An exact
    prediction costs 4 compiles (1, 2, b, b+1) where doubling + bisection costs ~2 log2(b).
    ``refine=False``: powers of two only. ``known``: batch -> (fits, total bytes) from earlier
    compiles (``plan --reuse``): they set the bracket and the line, and are listed first in the
    batches tried, but are not compiled again. ``start``: a guess at the answer (``plan
    --search-start``, e.g. the result of a target with as much HBM): it is compiled first, then
    start + 1 if it fits or start - 1 if not, so a right guess costs two compiles; batches 1 and 2
    are compiled only if the bracket is still open and the line lacks points. Near-limit compiles
    are the slow ones on TPU (libtpu works to fit them), and a guess skips the two small ones.
    Returns (largest fitting batch or 0, batches tried)."""
    tried: list[int] = sorted(known or {})
    mem: dict[int, int] = {b: int(t) for b, (_, t) in (known or {}).items() if t}  # batch -> total bytes
    fit = [b for b, (ok, _) in (known or {}).items() if ok]
    over = [b for b, (ok, _) in (known or {}).items() if not ok]
    # lo fits (0: nothing yet); hi does not (max_batch + 1: none seen). Memory need not be monotone
    # in the batch (GPU compiles): a batch that fits above the smallest failure is not counted.
    hi = min(over + [max_batch + 1])
    lo = max([b for b in fit if b < hi], default=0)

    def probe(b: int) -> bool:
        nonlocal lo, hi
        tried.append(b)
        ok, total = measure(b)
        if total:
            mem[b] = int(total)
        if ok:
            lo = b
        else:
            hi = b
        return ok

    if start is not None and not 1 <= start <= max_batch:
        raise ValueError(f"search start batch {start} is outside 1..{max_batch} (--search-start, --max-batch).")
    if start is not None and not refine:
        raise ValueError("a search start batch (--search-start) needs the refined search: drop --no-refine.")
    if not refine:
        b = 1
        while b <= max_batch and b < hi and (b in tried or probe(b)):
            b *= 2
        return lo, tried
    if start is not None:
        if start not in tried and lo < start < hi:
            probe(start)
        nxt = start + 1 if lo >= start else start - 1
        if nxt not in tried and lo < nxt < hi:
            probe(nxt)
    for b in (1, 2):  # two points for the memory line
        if len(mem) >= 2 or b in tried or hi - lo <= 1:
            continue
        if b >= hi or b > max_batch or not probe(b):
            return lo, tried
    # Here the line has two points: once 1 and 2 are both tried, either one failed (the bracket is
    # closed) or both fit, and a fitting compile always reports its memory.
    while hi - lo > 1:
        (b0, m0), (b1, m1) = sorted(mem.items())[-2:]
        slope = (m1 - m0) / (b1 - b0)
        guess = b1 + int((hbm_bytes - m1) // slope) if slope > 0 else 2 * lo
        if guess >= hi:  # the line overshoots a known failure: bisect; past max_batch: try it
            guess = max_batch if hi > max_batch else (lo + hi) // 2
        probe(min(max(guess, lo + 1), hi - 1))
    return lo, tried


# --- report -------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _ms(x: float) -> str:
    return f"{x * 1e3:.0f}" if x >= 0.01 else f"{x * 1e3:.2f}"


def markdown_table(results: Sequence[Result]) -> str:
    head = ("| target | step | attention | remat | compute | batch/dev | args GiB | temp GiB | total GiB | HBM GiB | fits "
            "| TFLOP/step/dev (matmul+conv) | GB accessed/dev | t_flops ms | t_hbm ms | predicted step ms | img/s (pod) | compile s "
            "| compile RAM GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if r.error:
            lines.append(f"| {r.target} | {'reg' if r.regularized else 'plain'} | {r.attention} | {r.remat} | {r.compute_dtype} "
                         f"| {r.batch_per_device} | | | | {_gib(r.hbm_bytes)} | no (compile: HBM overflow) "
                         f"| | | | | | | {r.compile_s:.0f} | {_rss(r)} |")
            continue
        fl = f"{r.flops / 1e12:.3g}"
        by = f"{r.bytes_accessed / 1e9:.3g}" + ("" if r.bytes_source == "compile" else " (est.)")
        lines.append(
            f"| {r.target} | {'reg' if r.regularized else 'plain'} | {r.attention} | {r.remat} | {r.compute_dtype} | {r.batch_per_device} "
            f"| {_gib(r.argument_bytes)} | {_gib(r.temp_bytes)} | {_gib(r.total_bytes)} | {_gib(r.hbm_bytes)} "
            f"| {'yes' if r.fits else 'no'} | {fl} | {by} | {_ms(r.t_compute_s)} | {_ms(r.t_memory_s)} "
            f"| {_ms(r.step_time_s)} | {r.images_per_s:.3g} | {r.compile_s:.0f}"
            + (f" ({r.compiler_options})" if r.compiler_options else "") + f" | {_rss(r)} |")
    return "\n".join(lines)


def _rss(r: Result) -> str:
    return _gib(r.compile_rss_bytes) if r.compile_rss_bytes else ""  # not recorded before it was measured


def search_table(rows: Sequence[dict]) -> str:
    lines = ["| target | remat | compute | largest batch/dev that fits | total GiB there | predicted step ms | img/s (pod) | batches compiled |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row.get("best")
        xla = f" ({row['xla_options']})" if row.get("xla_options") else ""
        lines.append(f"| {row['target']} | {row['remat']} | {row['compute_dtype']}{xla} | {row['max_batch']} "
                     f"| {_gib(r['total_bytes']) if r else ''} | {_ms(r['step_time_s']) if r else ''} "
                     f"| {format(r['images_per_s'], '.3g') if r else ''} | {', '.join(map(str, row['tried']))}"
                     + (f" ({row['note']})" if row.get("note") else "") + " |")
    return "\n".join(lines)


NOTES = """Per device. `total` = arguments + outputs - donated (aliased) + temporaries + code; `fits`
compares it with `HBM`: on TPU the HBM libtpu's compiler lets a program use (a little under the
datasheet's; a larger overflow is a compile error), on GPU the whole HBM (JAX preallocates 75% of it
by default: set XLA_PYTHON_CLIENT_MEM_FRACTION=.95 to use it). FLOPs are the step's matmuls and
convolutions counted from its jaxpr, loops times their trip count (elementwise work left out: a lower
bound; XLA's own count, in plan.json as compile_flops, counts a loop body once). Bytes accessed come from
the TPU compile's cost analysis (loop bodies once, so low where the chunked attention dominates); GPU
compiles report none, so there they are estimated as arguments + outputs + 2 x temporaries.
Predicted step = max(FLOPs / peak, bytes / HBM bandwidth) at the chip's peak (bf16, or TF32 on GPU for
fp32 compute): a roofline lower bound. One step here is one micro-batch (grad_accum = 1). Compile RAM:
the peak host memory of the process that compiled it (a child process per compile, unless --in-process)."""


def report_markdown(results: Sequence[Result], search_rows: Sequence[dict] = ()) -> str:
    parts = []
    if results:
        r0 = results[0]
        parts.append(f"# smooth-jax plan: {r0.model} at {r0.resolution} px, inputs = {r0.inputs}\n")
        parts.append(markdown_table(results))
    if search_rows:
        parts.append("\n## Largest per-device batch that fits (by compiling)\n")
        parts.append(search_table(search_rows))
    parts.append("\n" + NOTES)
    srcs = sorted({(t.name, t.source) for t in TARGETS.values() if any(r.target == t.name for r in results)})
    if srcs:
        parts.append("\nChip numbers: " + "; ".join(f"{n}: {s}" for n, s in srcs) + ".")
    return "\n".join(parts) + "\n"


# --- command ------------------------------------------------------------------------------


def run(args, overrides: Sequence[str] = (), planner: Planner | None = None) -> tuple[list[Result], list[dict]]:
    """The plan command's work: compiles for every target x remat x dtype (x batch with --search)."""
    from smooth_jax import config_loader

    if getattr(args, "search_start", None) is not None and not args.search:
        raise ValueError("--search-start B only applies to --search (without it, --batch sets the batch).")
    names = list(TARGETS) if not args.targets or args.targets == ["all"] else args.targets
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)} (or 'all').")
    base = config_loader.apply_overrides(config_loader.load_config(args.config or BASE_CONFIG), list(overrides))
    from tqdm.auto import tqdm

    bar = tqdm(desc="compiles", unit="compile", disable=args.no_progress)
    on_compile = lambda what: bar.set_postfix_str(what, refresh=True)  # noqa: E731
    if planner is None:
        planner = Planner(model=args.model, resolution=args.resolution, inputs=args.inputs, base_config=base,
                          on_compile=on_compile, xla_options=parse_xla_options(getattr(args, "xla_option", None) or []),
                          isolate=not getattr(args, "in_process", False))
    elif (planner.model, planner.resolution, planner.inputs) != (args.model, args.resolution, args.inputs):
        raise ValueError("run(): the planner was made for another model, resolution or inputs.")
    hbm = int(args.hbm_gib * GiB) if args.hbm_gib else None
    taken = []
    if getattr(args, "reuse", None):
        earlier, _ = merge_outputs(args.reuse, option="--reuse")
        taken = planner.reuse(earlier, default_config=not args.config and not list(overrides))
        print(f"--reuse: {len(taken)} of {len(earlier)} earlier compiles match this model, resolution, inputs "
              "and config: not compiled again.")

    # The partial plan.json holds the reused compiles too, so a run stopped again resumes from it alone.
    results, search_rows, compiled = [], [], {_result_key(r): r for r in taken}

    def compile_one(*a, **kw):
        r = planner.compile(*a, hbm_bytes=hbm, **kw)
        bar.update(1)
        compiled[_result_key(r)] = r
        if getattr(args, "out", None):  # SD-1.5 compiles take minutes: keep what is done on disk
            write_outputs(args.out, list(compiled.values()), search_rows, partial=True)
        return r

    steps = {"reg": [True], "plain": [False], "both": [True, False]}[args.step]
    for name in names:
        for remat in args.remat:
            for dtype in args.dtype:
                if args.search:
                    def measure(b, name=name, remat=remat, dtype=dtype):
                        r = compile_one(name, b, remat, dtype)
                        return r.fits, r.total_bytes

                    target_hbm = hbm or TARGETS[name].hbm_bytes
                    known = {}
                    for b in planner.compiled_batches(name, remat, dtype):  # from --reuse: not compiled again
                        r = planner.compile(name, b, remat, dtype, hbm_bytes=hbm)
                        known[b] = (r.fits, r.total_bytes)
                    best, tried = search_batch(measure, target_hbm, max_batch=args.max_batch,
                                               refine=not args.no_refine, known=known,
                                               start=getattr(args, "search_start", None))
                    results.extend(planner.compile(name, b, remat, dtype, hbm_bytes=hbm) for b in tried)
                    best_r = planner.compile(name, best, remat, dtype, hbm_bytes=hbm) if best else None
                    row = {"target": name, "remat": remat, "compute_dtype": dtype, "max_batch": best, "tried": tried,
                           "best": dataclasses.asdict(best_r) if best_r else None,
                           "xla_options": _options_text(planner.xla_options)}
                    search_rows.append(row)
                else:
                    for reg in steps:
                        results.append(compile_one(name, args.batch, remat, dtype, regularized=reg))
    bar.close()
    return results, search_rows


def _result_key(r: Result) -> tuple:
    return (r.target, r.model, r.resolution, r.inputs, r.regularized, r.remat, r.compute_dtype, r.batch_per_device,
            r.compiler_options)


def _row_key(row: dict) -> tuple:
    return row["target"], row["remat"], row["compute_dtype"], row.get("xla_options", "")


def merge_outputs(paths: Sequence[str | Path], option: str = "--merge") -> tuple[list[Result], list[dict]]:
    """Join plan.json files of separate runs (an SD-1.5 compile takes minutes, so one target per
    run is the practical way) into one report. A later file's entry replaces an earlier one's for
    the same (target, model, resolution, inputs, step, remat, dtype, batch, XLA options), or search
    row for the same (target, remat, dtype, XLA options); results are ordered as TARGETS lists the targets."""
    fields = {f.name for f in dataclasses.fields(Result)}
    results: dict[tuple, Result] = {}
    rows: dict[tuple, dict] = {}
    for path in map(Path, paths):
        try:
            payload = json.loads(path.read_text())
            loaded = [Result(**{k: v for k, v in r.items() if k in fields}) for r in payload["results"]]
            search = list(payload.get("search", []))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PlanError(f"{option}: {path} is not a readable plan.json ({type(e).__name__}: {e}).") from e
        if not payload.get("complete", True):
            print(f"note: {path} is from a plan that had not finished (partial); merging what it has.")
        for r in loaded:
            results[_result_key(r)] = r
        for row in search:
            rows[_row_key(row)] = row
    order = {name: i for i, name in enumerate(TARGETS)}
    rank = lambda name: order.get(name, len(order))  # noqa: E731
    merged = sorted(results.values(), key=lambda r: (rank(r.target), not r.regularized, r.remat, r.compute_dtype,
                                                      r.batch_per_device))
    merged_rows = sorted(rows.values(), key=lambda row: (rank(row["target"]), *_row_key(row)[1:]))
    return merged, merged_rows


def cmd_plan(args, overrides) -> int:
    if args.merge:
        if not args.out:
            raise PlanError("--merge needs --out: the folder for the merged plan.md and plan.json.")
        results, search_rows = merge_outputs(args.merge)
        print(report_markdown(results, search_rows))
        md, js = write_outputs(args.out, results, search_rows)
        print(f"wrote {md} and {js}")
        return 0
    prepare_gpu_plugin()
    results, search_rows = run(args, overrides)
    print(report_markdown(results, search_rows))
    if args.out:
        md, js = write_outputs(args.out, results, search_rows)
        print(f"wrote {md} and {js}")
    return 0


def write_outputs(out: str | Path, results: Sequence[Result], search_rows: Sequence[dict] = (),
                  partial: bool = False) -> tuple[Path, Path]:
    """plan.md (the tables) and plan.json (every number, and the targets' chip figures), written
    atomically; ``partial``: the run is still going (marked in both files)."""
    from smooth_jax.fileio import atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = report_markdown(results, search_rows)
    if partial:
        md = f"(partial: {len(results)} compile(s) done so far, the plan is still running)\n\n" + md
    atomic_write(out / "plan.md", md.encode())
    payload = {"complete": not partial, "results": [dataclasses.asdict(r) for r in results],
               "search": list(search_rows), "targets": {n: dataclasses.asdict(t) for n, t in TARGETS.items()}}
    atomic_write(out / "plan.json", json.dumps(payload, indent=1, default=str).encode())
    return out / "plan.md", out / "plan.json"


def register(sub) -> None:
    p = sub.add_parser(
        "plan", help="compile the train step for TPU pods / GPU nodes without the hardware: memory, FLOPs, step time",
        description="Compile the Smooth Diffusion train step ahead of time for TPU topologies (libtpu) and GPU "
                    "nodes (GpuTargetConfig) and report per-device memory, FLOPs and predicted step time; "
                    "--search finds the largest per-device batch that fits. Needs the 'plan' extra: "
                    f"{INSTALL_HINT}. Config fields: --config.SECTION.FIELD=VALUE (e.g. FSDP rules).")
    p.add_argument("--model", default="sd15", help="preset (sd15, tiny), diffusers folder or hub id (architecture only)")
    p.add_argument("--targets", nargs="*", default=["all"], help=f"any of: {', '.join(TARGETS)} (default: all)")
    p.add_argument("--resolution", type=int, default=512, help="image size in pixels (default 512)")
    p.add_argument("--batch", type=int, default=1, help="per-device batch without --search (default 1)")
    p.add_argument("--remat", nargs="+", default=["none"], choices=["none", "full", "dots"],
                   help="remat policies to compile (default none)")
    p.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16"],
                   help="compute dtypes to compile (default bfloat16; LoRA and optimizer stay fp32)")
    p.add_argument("--step", choices=["reg", "plain", "both"], default="reg",
                   help="the regularized step (default), the plain LoRA step, or both")
    p.add_argument("--inputs", choices=["images", "latents"], default="images",
                   help="images: VAE + text encoder run in the step (default); latents: cached encodings")
    p.add_argument("--search", action="store_true",
                   help="find the largest per-device batch that fits for every target x remat x dtype "
                        "(batches 1 and 2, then the memory line's prediction and one more: about 4 compiles each)")
    p.add_argument("--max-batch", type=int, default=256, help="upper bound for --search")
    p.add_argument("--search-start", type=int, default=None, metavar="B",
                   help="--search: compile batch B first, then B+1 (or B-1), e.g. the answer of a target with as much HBM")
    p.add_argument("--no-refine", action="store_true", help="--search: powers of two only (doubling from 1 until one does not fit)")
    p.add_argument("--hbm-gib", type=float, default=None, help="pretend each device has this much memory")
    p.add_argument("--config", default=None, help="base config (default configs/sd15_smooth_lora.py)")
    p.add_argument("--out", default=None, help="also write plan.md and plan.json here")
    p.add_argument("--merge", nargs="+", default=None, metavar="PLAN_JSON",
                   help="compile nothing: join the plan.json files of earlier runs (e.g. one target each) "
                        "into one plan.md / plan.json in --out")
    p.add_argument("--reuse", nargs="+", default=None, metavar="PLAN_JSON",
                   help="take the compiles in these plan.json files (same model, resolution, inputs and config) "
                        "instead of compiling them again: resumes a stopped --search, or extends one")
    p.add_argument("--xla-option", nargs="+", default=None, metavar="NAME=VALUE",
                   help="XLA options for every compile, as a job would set them in XLA_FLAGS, e.g. "
                        "xla_gpu_enable_triton_gemm=false (cuBLAS GEMMs: less GPU memory at SD-1.5 size); also "
                        "jax's build options: " + ", ".join(BUILD_OPTIONS))
    p.add_argument("--in-process", action="store_true",
                   help="compile in this process instead of a child process per compile (faster for small models; "
                        "an SD-1.5 search's host RAM then grows with every compile)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_plan, takes_overrides=True)
