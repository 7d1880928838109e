#!/usr/bin/env python3
"""Peak memory of ONE regularized train step (lambda = 1, rank-8 LoRA, fp32, batch 1) on this CPU:
smooth-jax without remat, with full remat (``train.remat=full``), and without remat on diffusers'
einsum attention (``train.attention=xla``: the full score matrices), and the PyTorch reference of the
authors' step (``eval/bench/torch_reference.py``).

    .venv/bin/python eval/bench/memory.py --model small            # quick (about a minute per variant)
    .venv/bin/python eval/bench/memory.py --model sd15 --limit-gib 22 --timeout 1500  # SD-1.5 size: 4x64x64 latents

Every variant runs in its own child process, one at a time, under ``RLIMIT_AS = min(--limit-gib, MemAvailable - --margin-gib)``, so
an oversize run fails with MemoryError (reported as "did not fit under N GiB") instead of pushing
the machine into swap; a child that runs past ``--timeout`` seconds is killed and reported. The
model is the preset's architecture with random weights (the values do not change memory); inputs
are cached latents [1,4,h,w] and text states [1,77,D] (no VAE or text encoder on either side).

Per variant the table gives:
- base RSS: resident memory once the weights (and for JAX the compiled step) are in place;
- step peak RSS: the high-water mark (``VmHWM``) during the step alone (reset through
  ``/proc/self/clear_refs`` just before it), and its increment over the base: what the step adds;
- process peak RSS: ``ru_maxrss`` of the child (``os.wait4``), compile included;
- JAX's compiled ``memory_analysis()``: temp (activations and the like) and argument sizes;
- compile and step seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GiB = 1 << 30
# smooth-jax variants: (train.remat, train.attention). The chunked attention is the CPU default;
# jax-xla-attention keeps diffusers' einsum (the full score matrices saved for the backward pass).
JAX_VARIANTS = {"jax-remat-none": ("none", "chunked"), "jax-remat-full": ("full", "chunked"),
                "jax-xla-attention": ("none", "xla")}
VARIANTS = (*JAX_VARIANTS, "torch")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _presets():
    """smooth_jax/models/presets.py by path: importing the package would pull JAX into the PyTorch child."""
    import importlib.util

    name = "smooth_jax_bench_presets"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "smooth_jax" / "models" / "presets.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _unet_config(model: str) -> dict:
    return _presets().preset(model)["unet"]


# --- children ---------------------------------------------------------------------------------


def _child_jax(model: str, remat: str, batch: int, attention: str, info: dict) -> dict:
    """``info`` gets the compile's figures as soon as they exist, so a step that then fails to
    allocate still reports what XLA asked for."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from smooth_jax import runtime

    runtime.split_host_devices(1)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from smooth_jax import config_loader, lora, runtime, train
    from smooth_jax.models import from_preset

    runtime.setup(compilation_cache=False)
    c = config_loader.load_config(ROOT / "configs" / "tiny.py")
    c.model, c.train.remat, c.train.compute_dtype, c.train.grad_accum = model, remat, "float32", 1
    c.lora.rank, c.lora.alpha = 8, 8.0
    c.train.attention = attention
    sd = from_preset(model)  # architecture only: random weights below, without compiling an init
    shapes = jax.eval_shape(sd.init_fns()["unet"], jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray((0.02 * rng.standard_normal(s.shape, dtype=np.float32)).astype(s.dtype)), shapes)
    h = sd.configs["unet"]["sample_size"]
    batch_d = {"latents": jnp.asarray(rng.standard_normal((1, batch, 4, h, h), dtype=np.float32)),
               "context": jnp.asarray(rng.standard_normal((1, batch, sd.max_length, sd.context_dim), dtype=np.float32))}
    frozen = {"unet": params}
    tx = train.make_optimizer(c.train)
    spec = lora.LoraSpec(rank=8, alpha=8.0)
    state = train.create_train_state(lora.init(jax.random.PRNGKey(1), shapes, spec), tx, jax.random.PRNGKey(2))
    fn = jax.jit(train.make_train_step(sd, c, regularize=True), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = fn.lower(state, frozen, batch_d).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    info.update(compile_s=compile_s, temp_gib=ma.temp_size_in_bytes / GiB, argument_gib=ma.argument_size_in_bytes / GiB)
    base = _status_kib("VmRSS")
    reset = _reset_hwm()
    t0 = time.perf_counter()
    state, m = compiled(state, frozen, batch_d)
    jax.block_until_ready(m)
    step_s = time.perf_counter() - t0
    return {
        "base_rss_gib": base / (1 << 20),
        "step_peak_gib": _status_kib("VmHWM") / (1 << 20) if reset else None,
        "compile_s": compile_s,
        "step_s": step_s,
        "temp_gib": ma.temp_size_in_bytes / GiB,
        "argument_gib": ma.argument_size_in_bytes / GiB,
        "output_gib": ma.output_size_in_bytes / GiB,
        "alias_gib": ma.alias_size_in_bytes / GiB,
        "loss": float(m["loss/total"]),
    }


def _child_torch(model: str, batch: int, threads: int) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    import torch_reference as tr

    torch.set_num_threads(threads)
    cfg = _unet_config(model)
    unet = tr.lora_unet(tr.random_unet(cfg), rank=8, alpha=8.0)
    abar = tr.alphas_cumprod(_presets().SCHEDULER)
    trainer = tr.Trainer(unet, abar, lr=1e-4)
    h = cfg["sample_size"]
    rng = np.random.default_rng(0)
    shape = (batch, 4, h, h)
    x0, eps = rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)
    u = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
    ctx = rng.standard_normal((batch, 77, cfg["cross_attention_dim"]), dtype=np.float32)
    t = np.array([500] * batch)
    inputs = tr.as_torch(x0, eps, t, u, ctx)
    base = _status_kib("VmRSS")
    reset = _reset_hwm()
    t0 = time.perf_counter()
    m = trainer.step(*inputs, regularize=True)
    step_s = time.perf_counter() - t0
    return {"base_rss_gib": base / (1 << 20), "step_peak_gib": _status_kib("VmHWM") / (1 << 20) if reset else None,
            "step_s": step_s, "loss": m["loss"]}


def child_main(args) -> None:
    limit = int(args.limit_gib * GiB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    info: dict = {}
    try:
        if args.child == "torch":
            out = _child_torch(args.model, args.batch, args.threads)
        else:
            remat, attention = JAX_VARIANTS[args.child]
            out = _child_jax(args.model, remat, args.batch, attention, info)
        out["status"] = "ok"
    except MemoryError as e:
        out = {**info, "status": f"did not fit under {args.limit_gib:g} GiB (MemoryError: {str(e)[:120]})"}
    except Exception as e:  # XLA reports allocation failures as RuntimeError / XlaRuntimeError
        msg = str(e)
        oom = any(k in msg.lower() for k in ("memory", "alloc", "resource_exhausted", "bad_alloc"))
        out = {**info, "status": (f"did not fit under {args.limit_gib:g} GiB" if oom else "failed")
               + f" ({type(e).__name__}: {msg[:160]})"}
    print("RESULT " + json.dumps(out), flush=True)


# --- parent -----------------------------------------------------------------------------------


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / (1 << 20)
    return float("inf")


def run_variant(variant: str, args) -> dict:
    # Never let a child reserve more than what is free now (less a margin): the machine is shared.
    limit = min(args.limit_gib, round(mem_available_gib() - args.margin_gib, 1))
    if limit < 1:
        return {"status": f"skipped: only {mem_available_gib():.1f} GiB available", "limit_gib": limit}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--model", args.model,
           "--batch", str(args.batch), "--limit-gib", str(limit), "--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    result: dict = {}
    deadline = t0 + args.timeout
    status = None
    while True:
        pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            status = st
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, st, ru = os.wait4(proc.pid, 0)
            result["status"] = f"killed after {args.timeout} s (still compiling or running)"
            break
        time.sleep(0.5)
    out = proc.stdout.read() if proc.stdout else ""
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result.update(json.loads(line[len("RESULT "):]))
    if "status" not in result:
        code = os.waitstatus_to_exitcode(status) if status is not None else None
        result["status"] = (f"died (exit {code}); likely out of memory under {limit:g} GiB"
                            if code and code < 0 else f"no result (exit {code})")
    result["process_peak_gib"] = ru.ru_maxrss / (1 << 20)  # ru_maxrss is KiB on Linux
    result["limit_gib"] = limit
    result["wall_s"] = time.perf_counter() - t0
    return result


def _g(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="preset: tiny, small or sd15")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--limit-gib", type=float, default=16.0, help="RLIMIT_AS of each child (address space)")
    p.add_argument("--margin-gib", type=float, default=1.5,
                   help="each child's limit is at most MemAvailable minus this (the machine may be shared)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a child is killed")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args)
        return
    h = _unet_config(args.model)["sample_size"]
    print(f"# Peak memory of one regularized step: model `{args.model}`, latents {args.batch}x4x{h}x{h}, fp32, "
          f"rank-8 LoRA; one child per variant under RLIMIT_AS min({args.limit_gib:g} GiB, MemAvailable - "
          f"{args.margin_gib:g} GiB), timeout {args.timeout:g} s\n",
          flush=True)
    rows = []
    for v in args.variants:
        r = run_variant(v, args)
        rows.append((v, r))
        print(f"{v}: {json.dumps(r)}", file=sys.stderr, flush=True)
    print("| variant | status | limit GiB | base RSS GiB | step peak RSS GiB | step peak - base GiB | process peak RSS GiB | "
          "XLA temp GiB | XLA arguments GiB | compile s | step s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for v, r in rows:
        inc = r["step_peak_gib"] - r["base_rss_gib"] if r.get("step_peak_gib") is not None and "base_rss_gib" in r else None
        print(f"| {v} | {r['status']} | {_g(r.get('limit_gib'), '{:.1f}')} | {_g(r.get('base_rss_gib'))} | {_g(r.get('step_peak_gib'))} | {_g(inc)} | "
              f"{_g(r.get('process_peak_gib'))} | {_g(r.get('temp_gib'))} | {_g(r.get('argument_gib'))} | "
              f"{_g(r.get('compile_s'), '{:.0f}')} | {_g(r.get('step_s'), '{:.1f}')} |")


if __name__ == "__main__":
    main()
