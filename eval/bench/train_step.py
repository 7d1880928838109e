#!/usr/bin/env python3
"""Step time of the regularized train step against the plain LoRA step, same model, same batch,
same run (ratios are what transfers between machines; absolute CPU times do not).

    .venv/bin/python eval/bench/train_step.py [--model tiny] [--batch 4] [--steps 10] [--remat none]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--remat", default="none")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()

    from smooth_jax import config_loader, lora, runtime, train
    from smooth_jax.models.tokenizer import tokenize

    runtime.setup()
    c = config_loader.load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.py")
    c.model, c.train.remat, c.train.compute_dtype, c.train.grad_accum = args.model, args.remat, args.dtype, 1
    sd = train.load_model(c)
    res = sd.default_image_size()
    rng = np.random.default_rng(0)
    batch = {"images": jnp.asarray(rng.uniform(-1, 1, (1, args.batch, 3, res, res)).astype(np.float32)),
             "input_ids": jnp.asarray(tokenize(sd.tokenizer, ["a handwritten digit seven"] * args.batch)[None])}
    frozen = {k: sd.params[k] for k in ("unet", "vae", "text_encoder")}
    spec = lora.LoraSpec(rank=c.lora.rank, alpha=c.lora.alpha)
    tree = lora.init(jax.random.PRNGKey(0), sd.params["unet"], spec)
    tx = train.make_optimizer(c.train)
    rows = []
    for name, regularize in (("plain LoRA (lambda=0)", False), ("Smooth LoRA (lambda=1)", True)):
        step = jax.jit(train.make_train_step(sd, c, regularize=regularize), donate_argnums=0)
        state = train.create_train_state(jax.tree_util.tree_map(jnp.copy, tree), tx, jax.random.PRNGKey(1))
        t0 = time.perf_counter()
        state, m = step(state, frozen, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        state, per_step = train.timed_steps(step, state, frozen, batch, args.steps)
        rows.append((name, compile_s, per_step))
    print(f"\nmodel={args.model} batch={args.batch} {res}px remat={args.remat} dtype={args.dtype} "
          f"devices={jax.devices()[0].platform} x{jax.device_count()}")
    print("| step | first call (compile+run) s | s/step | steps/s |")
    print("|---|---|---|---|")
    for name, cs, ps in rows:
        print(f"| {name} | {cs:.1f} | {ps:.3f} | {1 / ps:.2f} |")
    print(f"\nregularizer overhead: {rows[1][2] / rows[0][2]:.2f}x the plain step")


if __name__ == "__main__":
    main()
