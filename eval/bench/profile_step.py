#!/usr/bin/env python3
"""Where the train step's time goes, smooth-jax against the PyTorch reference, same model and weights.

    .venv/bin/python eval/bench/profile_step.py [--model small] [--batch 1] [--threads 1] [--reps 5]

``compare_train_step.py`` says which framework is faster; this says why. Three tables:

1. The step's parts, each timed alone: UNet forward (inference, with the step's attention
   kernel), UNet forward + backward to the LoRA (the plain loss's gradient, no optimizer), and the
   regularized loss's gradient. PyTorch
   runs each with its default attention (the fused flash kernel on CPU) and with the math
   kernel (the one the regularized step must use, as it alone has a double backward).
2. The two kernels that carry the FLOPs, at the model's first level (the largest activations):
   a 3x3 convolution and self-attention over its h*w tokens, forward, forward + backward and
   (attention) the regularizer's second order, XLA (diffusers' einsum, smooth-jax's chunked kernel)
   against PyTorch (oneDNN convolution; flash and math attention). ``--kernel-shape N H D`` also
   times attention at another shape, e.g. SD-1.5's first level: ``--kernel-shape 4096 8 40``.
3. The share of the step's counted FLOPs in convolutions and in matmuls (jaxpr count).

All fp32 on the CPU, medians of ``--reps`` timed calls after a warm-up, one XLA device, PyTorch with
``--threads`` threads (1 on a shared machine: see README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="preset (tiny, small)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--reps", type=int, default=5, help="timed calls per measurement (median)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--kernel-shape", nargs=3, type=int, metavar=("TOKENS", "HEADS", "HEAD_DIM"), default=None,
                   help="also time the attention kernels at this shape (e.g. 4096 8 40: SD-1.5's first level)")
    p.add_argument("--kernels-only", action="store_true", help="skip the step's parts (table 1 and 3)")
    return p.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # before jax is imported
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def median_time(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _jax_block(fn):
    return lambda: jax.block_until_ready(fn())


# --- the step's parts -------------------------------------------------------------------------


def step_parts(model: str, batch: int, rank: int, reps: int) -> tuple[list[str], dict]:
    import torch

    import torch_reference as tr
    from compare_train_step import _config
    from smooth_jax import attention, lora, plan, train

    c = _config(model, rank)
    sd = train.load_model(c)
    s = sd.configs["unet"]["sample_size"]
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((batch, sd.latent_channels, s, s)).astype(np.float32)
    ctx = rng.standard_normal((batch, sd.max_length, sd.context_dim)).astype(np.float32)
    t = rng.integers(0, 1000, (batch,))
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    u = (rng.standard_normal(x0.shape) / np.sqrt(np.prod(x0.shape[1:]))).astype(np.float32)
    spec = lora.LoraSpec(rank=rank, alpha=float(rank))
    tree = lora.as_numpy(lora.init(jax.random.PRNGKey(0), sd.params["unet"], spec))

    # smooth-jax
    frozen = {"unet": sd.params["unet"]}
    micro = {"latents": jnp.asarray(x0), "context": jnp.asarray(ctx)}
    lora_j = jax.tree_util.tree_map(jnp.asarray, tree)
    merged = lora.merge(frozen["unet"], lora_j, 1.0)
    def unet_forward(p, x, tt, cc):  # with the attention kernel the step uses (train.attention)
        with attention.use_attention(c.train.attention):
            return sd.unet_apply(p, x, tt, cc)

    fwd = jax.jit(unet_forward)
    res: dict = {}
    res[("jax", "forward")] = median_time(_jax_block(lambda: fwd(merged, micro["latents"], jnp.asarray(t), micro["context"])), reps)
    flops = {}
    for kind, reg in (("plain grad", False), ("regularized grad", True)):
        loss = train.make_micro_loss(sd, c, regularize=reg)
        g = jax.jit(jax.grad(lambda lt, fr, mi: loss(lt, fr, mi, jnp.float32(0.3), jax.random.PRNGKey(2))[0]))
        res[("jax", kind)] = median_time(_jax_block(lambda g=g: g(lora_j, frozen, micro)), reps)
        flops[kind] = plan.count_flops_by_kind(jax.make_jaxpr(g)(lora_j, frozen, micro))

    # PyTorch, default attention and math attention
    abar = tr.alphas_cumprod(sd.configs["scheduler"])
    unet = tr.lora_unet(tr.bridge_unet(sd), rank=rank, alpha=float(rank), lora_tree=tree)
    x0_t, eps_t, t_t, u_t, ctx_t = tr.as_torch(x0, eps, t, u, ctx)
    params = tr.lora_parameters(unet)

    def torch_fwd():
        with torch.no_grad():
            unet(x0_t, t_t, ctx_t)

    def torch_grad(reg):
        def run():
            for p in params:
                p.grad = None
            if reg:
                out = tr.smooth_loss(unet, x0_t, eps_t, t_t, u_t, ctx_t, 0.3, abar)
            else:
                out = tr.plain_loss(unet, x0_t, eps_t, t_t, ctx_t, 0.3, abar)
            out.loss.backward()
        return run

    for attn in ("default", "math"):
        ctxm = tr.double_backward_attention if attn == "math" else contextlib.nullcontext
        with ctxm():
            res[(f"torch {attn}", "forward")] = median_time(torch_fwd, reps)
            res[(f"torch {attn}", "plain grad")] = median_time(torch_grad(False), reps)
    # The regularized loss pins the math kernel itself (the fused one cannot be differentiated twice).
    res[("torch math", "regularized grad")] = median_time(torch_grad(True), reps)

    n_unet = sum(x.size for x in jax.tree_util.tree_leaves(sd.params["unet"])) / 1e6
    lines = [f"\n## model `{model}` (UNet {n_unet:.1f}M params, latents {batch}x{sd.latent_channels}x{s}x{s}, LoRA rank {rank})\n",
             "| part | smooth-jax s | PyTorch (default attention) s | PyTorch (math attention) s "
             "| PyTorch default / JAX | PyTorch math / JAX |", "|---|---|---|---|---|---|"]
    for part in ("forward", "plain grad", "regularized grad"):
        j, d, m = res[("jax", part)], res.get(("torch default", part)), res[("torch math", part)]
        lines.append(f"| {part} | {j:.4f} | {'' if d is None else f'{d:.4f}'} | {m:.4f} "
                     f"| {'' if d is None else f'{d / j:.2f}'} | {m / j:.2f} |")
    lines += ["", "| counted FLOPs (jaxpr) | conv GFLOP | matmul GFLOP | conv share |", "|---|---|---|---|"]
    for kind, f in flops.items():
        lines.append(f"| {kind} | {f['conv'] / 1e9:.2f} | {f['dot'] / 1e9:.2f} | {f['conv'] / (f['conv'] + f['dot']):.0%} |")
    level0 = {"channels": sd.configs["unet"]["block_out_channels"][0], "hw": s,
              "heads": _heads(sd.configs["unet"]), "context_dim": sd.context_dim}
    return lines, level0


def _heads(unet_config) -> int:
    h = unet_config.get("attention_head_dim", 8)
    return int(h[0] if isinstance(h, (list, tuple)) else h)


# --- the kernels ------------------------------------------------------------------------------


def kernels(channels: int, hw: int, heads: int, batch: int, reps: int, query_chunk: int = 1024) -> list[str]:
    """3x3 conv C->C on [B,C,hw,hw] and self-attention over hw*hw tokens of width C (``heads``
    heads): forward, forward + backward (to the inputs), and the regularizer's second order (the
    gradient of ||vjp||^2 + <out, w>), XLA (diffusers' einsum path and smooth-jax's chunked
    kernel) against PyTorch (oneDNN convolution; flash and math attention; only math has a second
    derivative)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from smooth_jax import attention

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, hw, hw, channels)).astype(np.float32)  # NHWC, as Flax
    w = (rng.standard_normal((3, 3, channels, channels)) / np.sqrt(9 * channels)).astype(np.float32)  # HWIO
    n = hw * hw
    d = channels // heads
    q, k, v, wo = (rng.standard_normal((batch, n, heads, d)).astype(np.float32) for _ in range(4))  # [B,n,H,D]
    scale = d**-0.5

    def conv_j(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def second_order_j(fn):
        def f(q, k, v):
            out, vjp = jax.vjp(lambda q_: fn(q_, k, v), q)
            (g,) = vjp(wj)
            return jnp.sum(g**2) + jnp.sum(out * wj)
        return jax.grad(f, argnums=(0, 1, 2))

    res = {}
    xj, wcj = jnp.asarray(x), jnp.asarray(w)
    qj, kj, vj, wj = map(jnp.asarray, (q, k, v, wo))
    res["conv", "XLA", "fwd"] = median_time(_jax_block(lambda f=jax.jit(conv_j): f(xj, wcj)), reps)
    res["conv", "XLA", "fwd+bwd"] = median_time(_jax_block(
        lambda f=jax.jit(jax.grad(lambda x, w: jnp.sum(conv_j(x, w) ** 2), argnums=(0, 1))): f(xj, wcj)), reps)
    for label, fn in (("XLA einsum (diffusers)", lambda q, k, v: attention.dense_attention(q, k, v, scale)),
                      (f"XLA chunked ({attention._chunk(n, query_chunk)} queries)",
                       lambda q, k, v: attention.chunked_attention(q, k, v, scale, query_chunk))):
        res["attention", label, "fwd"] = median_time(_jax_block(lambda f=jax.jit(fn): f(qj, kj, vj)), reps)
        res["attention", label, "fwd+bwd"] = median_time(_jax_block(
            lambda f=jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * wj), argnums=(0, 1, 2))): f(qj, kj, vj)), reps)
        res["attention", label, "2nd order"] = median_time(_jax_block(lambda f=jax.jit(second_order_j(fn)): f(qj, kj, vj)), reps)

    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
    qt, kt, vt, wot = (torch.from_numpy(z).transpose(1, 2).contiguous() for z in (q, k, v, wo))  # [B,H,n,D]

    def conv_fwd():
        with torch.no_grad():
            F.conv2d(xt, wt, padding=1)

    def conv_bwd():
        a, b = xt.clone().requires_grad_(True), wt.clone().requires_grad_(True)
        (F.conv2d(a, b, padding=1) ** 2).sum().backward()

    res["conv", "PyTorch oneDNN", "fwd"], res["conv", "PyTorch oneDNN", "fwd+bwd"] = (
        median_time(conv_fwd, reps), median_time(conv_bwd, reps))
    for backend, label in ((SDPBackend.FLASH_ATTENTION, "PyTorch flash"), (SDPBackend.MATH, "PyTorch math")):
        def attn_fwd():
            with torch.no_grad(), sdpa_kernel(backend):
                F.scaled_dot_product_attention(qt, kt, vt)

        def attn_bwd():
            a, b, c_ = (z.clone().requires_grad_(True) for z in (qt, kt, vt))
            with sdpa_kernel(backend):
                (F.scaled_dot_product_attention(a, b, c_) * wot).sum().backward()

        def attn_second():
            a, b, c_ = (z.clone().requires_grad_(True) for z in (qt, kt, vt))
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(a, b, c_)
            (g,) = torch.autograd.grad(out, a, grad_outputs=wot, create_graph=True)
            ((g**2).sum() + (out * wot).sum()).backward()

        res["attention", label, "fwd"] = median_time(attn_fwd, reps)
        res["attention", label, "fwd+bwd"] = median_time(attn_bwd, reps)
        if label == "PyTorch math":
            res["attention", label, "2nd order"] = median_time(attn_second, reps)

    lines = [f"\n## kernels at the first level: conv 3x3 {channels}->{channels} on {batch}x{channels}x{hw}x{hw}; "
             f"self-attention over {n} tokens, {heads} heads of {d}\n",
             "| kernel | implementation | fwd s | fwd+bwd s | 2nd order s |", "|---|---|---|---|---|"]
    for (kernel, impl) in dict.fromkeys((k_[0], k_[1]) for k_ in res):
        cell = lambda pas: f"{res[kernel, impl, pas]:.5f}" if (kernel, impl, pas) in res else "-"  # noqa: E731
        lines.append(f"| {kernel} | {impl} | {cell('fwd')} | {cell('fwd+bwd')} | {cell('2nd order')} |")
    return lines


def main() -> None:
    args = ARGS
    import torch

    from smooth_jax import runtime

    runtime.setup()
    torch.set_num_threads(args.threads)
    print(f"# Train step profile: smooth-jax vs PyTorch\n\nCPU cores {os.cpu_count()}, load average "
          f"{os.getloadavg()[0]:.1f} at start; torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"jax {jax.__version__} on 1 {jax.devices()[0].platform} device; fp32; median of {args.reps} calls.",
          flush=True)
    if not args.kernels_only:
        lines, level0 = step_parts(args.model, args.batch, args.rank, args.reps)
        print("\n".join(lines), flush=True)
        print("\n".join(kernels(level0["channels"], level0["hw"], level0["heads"], args.batch, args.reps)), flush=True)
    if args.kernel_shape:
        n, h, d = args.kernel_shape
        hw = int(round(n**0.5))
        if hw * hw != n:
            raise SystemExit(f"--kernel-shape: {n} tokens is not a square image's h*w")
        print("\n".join(kernels(h * d, hw, h, args.batch, args.reps)), flush=True)


if __name__ == "__main__":
    main()
