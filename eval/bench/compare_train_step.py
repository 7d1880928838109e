#!/usr/bin/env python3
"""smooth-jax's jitted train step against a faithful PyTorch version of the authors' step, same
model, same weights, same batch, same run, same machine; regularized (lambda = 1) and plain LoRA.

    .venv/bin/python eval/bench/compare_train_step.py [--models tiny small] [--batch 1] [--steps 5] [--rounds 3]

Both sides get cached inputs (latents x0 [B,4,h,w] and text states [B,77,D]; no VAE or text
encoder, on either side) and run fp32 on the CPU with a rank-8 LoRA (scale 1) on to_q/to_k/to_v/
to_out.0 of every attention, grad-norm clipping and AdamW. PyTorch: ``eval/bench/torch_reference.py``
(diffusers UNet + peft + ``torch.autograd.grad(create_graph=True)``; the regularized forward uses
the math SDPA kernel, the only one with a double backward), ``torch.set_num_threads(--threads)``.
smooth-jax: ``train.make_train_step`` jitted with the state donated, on ONE XLA CPU device (its
Eigen thread pool spans all cores; ``--jax-devices 2`` instead shards the batch over 2 devices).

The kinds are timed interleaved in ``--rounds`` rounds of ``--steps`` steps each (the machine may
be shared), and every number is the median step. Prints a markdown table with s/step, steps/s, the
JAX compile time (ahead-of-time ``lower().compile()``, bypassing the persistent cache),
matmul + convolution FLOPs on both sides (JAX: counted from the step's jaxpr, loops times their
length; PyTorch: ``FlopCounterMode``), and the
ratios: PyTorch time / JAX time per step kind (> 1: JAX faster) and regularized / plain per framework.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "small"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps per kind per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    p.add_argument("--jax-devices", type=int, default=1, help="XLA CPU devices the batch is sharded over")
    p.add_argument("--no-flops", action="store_true", help="skip PyTorch's FlopCounterMode pass")
    p.add_argument("--variants", nargs="+", default=[""], metavar="KEY=VALUE,...",
                   help="smooth-jax configs to time, each a comma list of config overrides ('' = the defaults); "
                        "the first is compared with the others, e.g. --variants '' "
                        "'lora.train_form=merged,train.attention=xla' (the step before either optimization)")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # before jax is imported
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from smooth_jax import runtime

    runtime.split_host_devices(ARGS.jax_devices)

sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def compile_uncached(lowered):
    """``lowered.compile()`` bypassing the persistent compilation cache, so the time is a real
    compile (model inits elsewhere in the run still use the cache). Returns (compiled, seconds)."""
    from smooth_jax import runtime

    t0 = time.perf_counter()
    compiled = runtime.compile_uncached(lowered)
    return compiled, time.perf_counter() - t0


def _config(model: str, rank: int, variant: str = ""):
    from smooth_jax import config_loader

    c = config_loader.load_config(ROOT / "configs" / "tiny.py")
    c.model, c.train.remat, c.train.compute_dtype, c.train.grad_accum = model, "none", "float32", 1
    c.lora.rank, c.lora.alpha = rank, float(rank)
    c.train.lr = 1e-4
    overrides = [f"--config.{kv.strip()}" for kv in variant.split(",") if kv.strip()]
    c = config_loader.apply_overrides(c, overrides)
    return c


def _jax_side(sd, c, tree, x0, ctx, n_dev):
    """{kind: (compile_s, flops, step_fn, state)} for kinds plain/smooth."""
    from smooth_jax import plan, sharding, train

    frozen = {"unet": sd.params["unet"]}
    batch = {"latents": jnp.asarray(x0[None]), "context": jnp.asarray(ctx[None])}
    tx = train.make_optimizer(c.train)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, num_devices=n_dev)
    rep, bsh = sharding.replicated(mesh), sharding.batch_sharding(mesh, leading=1)
    frozen, batch = jax.device_put(frozen, rep), jax.device_put(batch, bsh)
    out = {}
    for kind, regularize in (("plain", False), ("smooth", True)):
        state = jax.device_put(train.create_train_state(jax.tree_util.tree_map(jnp.copy, tree), tx, jax.random.PRNGKey(1)), rep)
        step = train.make_train_step(sd, c, regularize=regularize)
        fn = jax.jit(step, donate_argnums=0, in_shardings=(rep, rep, bsh), out_shardings=(rep, rep))
        compiled, compile_s = compile_uncached(fn.lower(state, frozen, batch))
        # Matmul + conv FLOPs of the jaxpr (loops x trip count), what FlopCounterMode counts for PyTorch.
        flops = plan.counted_step_flops(step, state, frozen, batch)
        holder = {"state": state}

        def run(compiled=compiled, holder=holder):
            holder["state"], m = compiled(holder["state"], frozen, batch)
            jax.block_until_ready(m)
            return m

        run()  # warm-up
        out[kind] = {"compile_s": compile_s, "flops": flops, "run": run}
    return out


def _torch_side(sd, tree, x0, ctx, rank, flops: bool):
    import torch

    import torch_reference as tr

    abar = tr.alphas_cumprod(sd.configs["scheduler"])
    b = x0.shape[0]
    rng = np.random.default_rng(1)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    u = (rng.standard_normal(x0.shape) / np.sqrt(np.prod(x0.shape[1:]))).astype(np.float32)
    t = rng.integers(0, 1000, (b,))
    inputs = tr.as_torch(x0, eps, t, u, ctx)
    out = {}
    for kind, regularize in (("plain", False), ("smooth", True)):
        unet = tr.lora_unet(tr.bridge_unet(sd), rank=rank, alpha=float(rank), lora_tree=tree)
        trainer = tr.Trainer(unet, abar, lr=1e-4)

        def run(trainer=trainer, regularize=regularize):
            return trainer.step(*inputs, regularize=regularize)

        n_flops = float("nan")
        if flops:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                run()
            n_flops = float(counter.get_total_flops())
        run()  # warm-up
        out[kind] = {"run": run, "flops": n_flops}
    return out


def _fmt_flops(f: float) -> str:
    return "n/a" if not np.isfinite(f) else f"{f / 1e9:.1f}"


def bench_model(model: str, args) -> list[str]:
    from smooth_jax import lora, train

    sd = train.load_model(_config(model, args.rank))
    s = sd.configs["unet"]["sample_size"]
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((args.batch, sd.latent_channels, s, s)).astype(np.float32)
    ctx = rng.standard_normal((args.batch, sd.max_length, sd.context_dim)).astype(np.float32)
    spec = lora.LoraSpec(rank=args.rank, alpha=float(args.rank))
    tree = lora.as_numpy(lora.init(jax.random.PRNGKey(0), sd.params["unet"], spec))
    n_params = lora.count(tree)

    variants = list(dict.fromkeys(args.variants))
    sides = {f"jax:{v}": _jax_side(sd, _config(model, args.rank, v), tree, x0, ctx, args.jax_devices) for v in variants}
    sides["torch"] = _torch_side(sd, tree, x0, ctx, args.rank, not args.no_flops)
    times = {(fw, k): [] for fw in sides for k in ("plain", "smooth")}
    for _ in range(args.rounds):
        for fw, side in sides.items():
            for kind in ("plain", "smooth"):
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    side[kind]["run"]()
                    times[(fw, kind)].append(time.perf_counter() - t0)
    med = {key: statistics.median(v) for key, v in times.items()}
    spread = {key: (min(v), max(v)) for key, v in times.items()}
    label = {fw: "PyTorch" if fw == "torch" else f"smooth-jax ({fw[4:] or 'defaults'})" for fw in sides}

    lines = [f"\n### model `{model}` (UNet {sum(x.size for x in jax.tree_util.tree_leaves(sd.params['unet'])) / 1e6:.1f}M params, "
             f"latents {args.batch}x{sd.latent_channels}x{s}x{s}, LoRA rank {args.rank}: {n_params:,} params)\n",
             "| framework | step | s/step (median) | min..max | steps/s | compile s | GFLOP/step |",
             "|---|---|---|---|---|---|---|"]
    for fw, side in sides.items():
        for kind, kind_label in (("plain", "plain LoRA"), ("smooth", "Smooth (regularized)")):
            m = med[(fw, kind)]
            lo, hi = spread[(fw, kind)]
            comp = f"{side[kind]['compile_s']:.1f}" if "compile_s" in side[kind] else "-"
            lines.append(f"| {label[fw]} | {kind_label} | {m:.4f} | {lo:.4f}..{hi:.4f} | {1 / m:.2f} | {comp} "
                         f"| {_fmt_flops(side[kind]['flops'])} |")
    first = f"jax:{variants[0]}"
    lines += ["", "| ratio | plain LoRA | Smooth (regularized) |", "|---|---|---|"]
    for fw in sides:
        if fw != "torch":
            lines.append(f"| PyTorch s/step / {label[fw]} s/step (>1: JAX faster) | "
                         f"{med[('torch', 'plain')] / med[(fw, 'plain')]:.2f} | {med[('torch', 'smooth')] / med[(fw, 'smooth')]:.2f} |")
    for fw in sides:
        if fw not in ("torch", first):
            lines.append(f"| {label[fw]} s/step / {label[first]} s/step | {med[(fw, 'plain')] / med[(first, 'plain')]:.2f} "
                         f"| {med[(fw, 'smooth')] / med[(first, 'smooth')]:.2f} |")
    lines += ["", "| regularizer overhead (regularized / plain) | " + " | ".join(label[fw] for fw in sides) + " |",
              "|---|" + "---|" * len(sides),
              "| time | " + " | ".join(f"{med[(fw, 'smooth')] / med[(fw, 'plain')]:.2f}" for fw in sides) + " |",
              "| FLOPs | " + " | ".join(f"{sides[fw]['smooth']['flops'] / sides[fw]['plain']['flops']:.2f}" for fw in sides) + " |"]
    return lines


def main() -> None:
    args = ARGS
    import torch

    from smooth_jax import runtime

    runtime.setup()
    torch.set_num_threads(args.threads)
    out = ["# Train step: smooth-jax vs PyTorch (authors' step)\n",
           f"CPU cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at start; torch {torch.__version__} "
           f"with {torch.get_num_threads()} threads; jax {jax.__version__} on {jax.device_count()} "
           f"{jax.devices()[0].platform} device(s); fp32; batch {args.batch}; {args.rounds} rounds x {args.steps} "
           f"steps per kind, interleaved; compile times uncached."]
    print("\n".join(out), flush=True)
    for model in args.models:
        print("\n".join(bench_model(model, args)), flush=True)


if __name__ == "__main__":
    main()
