#!/usr/bin/env python3
"""50-step DDIM + CFG 7.5: smooth-jax's jitted sampler against diffusers' PyTorch
``StableDiffusionPipeline`` (DDIM scheduler) on the same converted weights, same noise, same text
states, same run; plus each loop's overhead over the raw UNet calls it makes.

    .venv/bin/python eval/bench/sampling.py [--models tiny small] [--batches 1 4] [--runs 3]

Both sides produce latents only (``output_type="latent"``; no VAE decode, no text encoder: the
prompt states come from smooth-jax's text encoder once and are passed to diffusers as
``prompt_embeds``/``negative_prompt_embeds``). smooth-jax: ``sampling.make_sampler`` under one
``jax.jit`` (a ``lax.scan`` of 50 UNet calls on the interleaved 2B batch) on one XLA CPU device;
compile time from ``lower().compile()`` bypassing the persistent cache. PyTorch:
``torch.set_num_threads(--threads)``, ``torch.inference_mode``; diffusers' PyTorch GEGLU is switched
to tanh-GELU (as the Flax port computes it, ``--exact-gelu`` keeps PyTorch's), so both compute the
same function and the table can show the two latents agree.

Loop overhead = sampler time / (50 x one raw UNet call on the 2B batch at the same shapes): a jitted
``sd.unet_apply`` for smooth-jax, ``pipe.unet`` under inference_mode for PyTorch. Every time is the
median over ``--runs`` (interleaved).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "small"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--runs", type=int, default=3, help="timed runs per side (median reported)")
    p.add_argument("--unet-calls", type=int, default=10, help="timed raw UNet calls per side per run")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--exact-gelu", action="store_true", help="leave PyTorch's exact GELU (latents then differ ~1e-3)")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from smooth_jax import runtime

    runtime.split_host_devices(1)

sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


from compare_train_step import compile_uncached  # noqa: E402  (same folder, on sys.path above)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_model(model: str, args) -> list[str]:
    import torch

    from smooth_jax import attention, sampling
    from smooth_jax.models import load, torch_bridge

    sd = load(model, rng=jax.random.PRNGKey(0))
    s = sd.configs["unet"]["sample_size"]
    pipe = torch_bridge.torch_pipeline(sd)
    pipe.set_progress_bar_config(disable=True)
    sampler = jax.jit(sampling.make_sampler(sd, num_steps=args.steps, guidance_scale=args.guidance))

    def unet_call(*a):
        with attention.use_attention("auto"):  # the kernel the sampler runs, so the overhead compares like with like
            return sd.unet_apply(*a)

    unet_j = jax.jit(unet_call)
    prompts = ["a photograph of an astronaut riding a horse", "a watercolor of a lighthouse at dawn",
               "a red cube on a blue sphere", "a handwritten digit seven"]
    lines = [f"\n### model `{model}` (latents 4x{s}x{s}, {args.steps} DDIM steps, CFG {args.guidance})\n",
             "| batch | smooth-jax s/image-batch | PyTorch pipeline s | PyTorch / JAX (>1: JAX faster) | JAX compile s | "
             "JAX raw UNet call s (2B) | JAX loop overhead | PyTorch raw UNet call s (2B) | PyTorch loop overhead | max abs diff of latents |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for b in args.batches:
        ps = [prompts[i % len(prompts)] for i in range(b)]
        ctx, unc = sampling.encode_prompts(sd, sd.params["text_encoder"], ps, "")
        noise = np.asarray(jax.random.normal(jax.random.PRNGKey(b), (b, 4, s, s)), np.float32)
        params = sd.params["unet"]
        compiled, compile_s = compile_uncached(sampler.lower(params, jnp.asarray(noise), ctx, unc))
        x2 = jnp.asarray(np.repeat(noise, 2, axis=0))
        t2 = jnp.full((2 * b,), 501, jnp.int32)
        c2 = sampling.interleave(unc, ctx)
        ctx_t, unc_t = torch.from_numpy(np.array(ctx)), torch.from_numpy(np.array(unc))
        noise_t = torch.from_numpy(noise)
        x2_t, t2_t, c2_t = torch.from_numpy(np.array(x2)), torch.from_numpy(np.array(t2)).long(), torch.cat([unc_t, ctx_t])

        def jax_sample():
            return jax.block_until_ready(compiled(params, jnp.asarray(noise), ctx, unc))

        def jax_unet():
            for _ in range(args.unet_calls):
                out = unet_j(params, x2, t2, c2)
            jax.block_until_ready(out)

        def torch_sample():
            with torch.inference_mode():
                return pipe(prompt_embeds=ctx_t, negative_prompt_embeds=unc_t, latents=noise_t.clone(),
                            num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="latent").images

        def torch_unet():
            with torch.inference_mode():
                for _ in range(args.unet_calls):
                    pipe.unet(x2_t, t2_t, c2_t)

        lat_j, lat_t = np.asarray(jax_sample()), torch_sample().numpy()  # warm-up, and the agreement check
        jax_unet(), torch_unet()
        tj, tt, uj, ut = [], [], [], []
        for _ in range(args.runs):
            tj.append(_timed(jax_sample))
            uj.append(_timed(jax_unet) / args.unet_calls)
            tt.append(_timed(torch_sample))
            ut.append(_timed(torch_unet) / args.unet_calls)
        mj, mt, muj, mut = (statistics.median(v) for v in (tj, tt, uj, ut))
        diff = float(np.abs(lat_j - lat_t).max())
        lines.append(f"| {b} | {mj:.3f} | {mt:.3f} | {mt / mj:.2f} | {compile_s:.1f} | {muj:.4f} | "
                     f"{mj / (args.steps * muj):.2f} | {mut:.4f} | {mt / (args.steps * mut):.2f} | "
                     f"{diff:.1e} (scale {np.abs(lat_t).max():.1f}) |")
    return lines


def main() -> None:
    args = ARGS
    import torch

    from smooth_jax import runtime

    runtime.setup()
    torch.set_num_threads(args.threads)
    if not args.exact_gelu:
        from diffusers.models.activations import GEGLU

        GEGLU.gelu = lambda self, gate: torch.nn.functional.gelu(gate, approximate="tanh")
    print("# Sampling: smooth-jax vs diffusers' StableDiffusionPipeline (DDIM + CFG)\n")
    print(f"CPU cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at start; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s); fp32; latents only (no VAE decode); GELU {'exact in PyTorch' if args.exact_gelu else 'tanh on both sides'}; "
          f"median of {args.runs} runs; compile times uncached.", flush=True)
    for model in args.models:
        print("\n".join(bench_model(model, args)), flush=True)


if __name__ == "__main__":
    main()
