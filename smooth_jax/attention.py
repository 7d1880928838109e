"""Attention kernels for the UNet that stay differentiable twice (the regularizer needs that).

diffusers' Flax attention materializes the full score matrix ``[B*heads, n_q, n_kv]`` and keeps it
for the backward pass. At SD-1.5's first level (4096 tokens, 8 heads) that is 512 MiB per
attention per image in fp32, written to and read back from memory several times per pass; fused
kernels (flash attention, cuDNN) avoid it but have no second derivative.

``chunked_attention`` computes the same function one head and one block of queries at a time
(``lax.map``), each block under ``jax.checkpoint``: the backward pass recomputes a block's scores
instead of storing them, so only ``[chunk, n_kv]`` of scores is alive at once, and the twice
differentiated step (which differentiates that recomputation again) stays cheap. Measured on a
2-core CPU at SD-1.5's first-level shape (4096 tokens, 8 heads of 40): forward 568 -> 294 ms,
forward + backward 2.38 -> 1.13 s, the regularizer's second-order gradient 12.4 -> 2.6 s
(eval/bench/profile_step.py).

``use_attention(kind)`` swaps it into every diffusers ``FlaxAttention`` of an apply, through Flax's
method interception (the same mechanism as ``lora.factored``; the LoRA on to_q/to_k/to_v/to_out
still applies, as those Dense layers are called as before).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

KINDS = ("auto", "chunked", "xla")
DEFAULT_QUERY_CHUNK = 1024


def _chunk(n: int, target: int) -> int:
    """The largest divisor of n that is <= target (so every block has the same shape)."""
    target = max(1, min(n, int(target)))
    for c in range(target, 0, -1):
        if n % c == 0:
            return c
    return 1


def _softmax(s: jax.Array) -> jax.Array:
    """Softmax over the last axis in at least float32 (bf16 scores lose the small probabilities)."""
    return jax.nn.softmax(s.astype(jnp.promote_types(s.dtype, jnp.float32)), axis=-1).astype(s.dtype)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v. q: [B,n_q,H,D]; k, v: [B,n_kv,H,D] -> [B,n_q,H,D]."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(scale, q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", _softmax(s), v)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                      query_chunk: int = DEFAULT_QUERY_CHUNK) -> jax.Array:
    """``dense_attention``, one (image, head, block of queries) at a time, each block rematerialized
    in the backward pass. q: [B,n_q,H,D]; k, v: [B,n_kv,H,D] -> [B,n_q,H,D]. The block is the
    largest divisor of n_q not above ``query_chunk``."""
    b, n_q, h, d = q.shape
    n_kv = k.shape[1]
    c = _chunk(n_q, query_chunk)
    # [B*H, n/c, c, D] queries and [B*H, n_kv, D] keys/values: heads become a mapped axis.
    qh = q.transpose(0, 2, 1, 3).reshape(b * h, n_q // c, c, d)
    kh = k.transpose(0, 2, 1, 3).reshape(b * h, n_kv, d)
    vh = v.transpose(0, 2, 1, 3).reshape(b * h, n_kv, v.shape[-1])
    s = jnp.asarray(scale, q.dtype)

    @jax.checkpoint
    def block(qi, ki, vi):  # [c,D], [n_kv,D], [n_kv,Dv]
        return _softmax(qi @ ki.T * s) @ vi

    def head(args):
        qi, ki, vi = args
        return jax.lax.map(lambda x: block(x, ki, vi), qi)  # [n/c, c, Dv]

    out = jax.lax.map(head, (qh, kh, vh))  # [B*H, n/c, c, Dv]
    return out.reshape(b, h, n_q, -1).transpose(0, 2, 1, 3)


def resolve(kind: str, platform: str | None = None) -> str:
    """"auto" -> "chunked" on CPU, "xla" elsewhere; other kinds pass through (validated).

    Why per platform: on CPU the chunked kernel is the faster one (above). Compiled for TPU, it
    needs more memory, not less: the SD-1.5 step at 512 px, batch 1, bf16 took 38.1 GiB per v4 chip
    with it against 15.4 GiB per v5p chip with diffusers' einsum (``smooth-jax plan``; the scan's
    saved blocks of 40-wide heads pad to the TPU's 128 lanes, and the second-order pass keeps
    per-block residuals), and XLA fuses the einsum path on TPU and GPU.
    """
    if kind not in KINDS:
        raise ValueError(f"attention={kind!r}: choose one of {KINDS}.")
    if kind != "auto":
        return kind
    if platform is None:
        platform = jax.default_backend()
    return "chunked" if platform == "cpu" else "xla"


def attention_fn(kind: str, query_chunk: int = DEFAULT_QUERY_CHUNK):
    if kind == "chunked":
        return lambda q, k, v, scale: chunked_attention(q, k, v, scale, query_chunk)
    if kind == "xla":
        return dense_attention
    raise ValueError(f"attention={kind!r}: choose one of {KINDS[1:]} (resolve 'auto' first).")


@contextlib.contextmanager
def use_attention(kind: str, query_chunk: int = DEFAULT_QUERY_CHUNK):
    """Within the ``with``, every diffusers ``FlaxAttention`` computes its scores with ``kind``
    ("chunked": ``chunked_attention``; "xla": diffusers' own einsum path, untouched; "auto": as
    ``resolve`` picks for the default backend)."""
    kind = resolve(kind)
    fn = attention_fn(kind, query_chunk)
    if kind == "xla":
        yield
        return
    import flax.linen as nn
    from diffusers.models.attention_flax import FlaxAttention

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__" or not isinstance(m, FlaxAttention):
            return next_fun(*args, **kwargs)
        if m.dropout > 0 or m.use_memory_efficient_attention:
            return next_fun(*args, **kwargs)  # keep diffusers' path where it does more than attend
        hidden = args[0] if args else kwargs["hidden_states"]
        ctx = args[1] if len(args) > 1 else kwargs.get("context")
        ctx = hidden if ctx is None else ctx
        b = hidden.shape[0]
        q = m.query(hidden).reshape(b, -1, m.heads, m.dim_head)
        k = m.key(ctx).reshape(b, -1, m.heads, m.dim_head)
        v = m.value(ctx).reshape(b, -1, m.heads, m.dim_head)
        out = fn(q, k, v, float(m.dim_head) ** -0.5)
        return m.proj_attn(out.reshape(b, -1, m.heads * m.dim_head))

    with nn.intercept_methods(interceptor):
        yield
