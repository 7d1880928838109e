"""The chunked attention kernel: the same function as dense attention, to first and second order,
alone and swapped into the UNet, with the LoRA still applied to its projections."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smooth_jax import attention, lora


def _qkv(n_q=48, n_kv=40, h=3, d=8, b=2, seed=0):
    r = np.random.default_rng(seed)
    q = r.standard_normal((b, n_q, h, d))
    k = r.standard_normal((b, n_kv, h, d))
    v = r.standard_normal((b, n_kv, h, d + 2))
    return q, k, v


def _numpy_attention(q, k, v, scale):
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("chunk", [1, 7, 16, 48, 1000])  # 7 -> blocks of 6 (the largest divisor of 48)
def test_chunked_equals_float64_numpy(chunk):
    q, k, v = _qkv()
    with jax.enable_x64(True):
        got = attention.chunked_attention(*map(jnp.asarray, (q, k, v)), 0.3, query_chunk=chunk)
        np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, 0.3), rtol=1e-12, atol=1e-12)


def test_chunked_first_and_second_derivatives_equal_dense():
    """The regularizer differentiates a vjp: compare grad of ||vjp_q(attn)(w)||^2 + <attn, w>."""
    q, k, v = _qkv()
    w = np.random.default_rng(1).standard_normal((2, 48, 3, 10))

    def objective(fn):
        def f(q, k, v):
            out, vjp = jax.vjp(lambda q_: fn(q_, k, v, 0.3), q)
            (g,) = vjp(w)
            return jnp.sum(g**2) + jnp.sum(out * w)
        return jax.grad(f, argnums=(0, 1, 2))

    with jax.enable_x64(True):
        args = tuple(map(jnp.asarray, (q, k, v)))
        dense = objective(attention.dense_attention)(*args)
        chunked = objective(lambda *a: attention.chunked_attention(*a, query_chunk=16))(*args)
        for a, b in zip(chunked, dense):
            assert float(jnp.abs(b).max()) > 1e-3
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10)


def test_unknown_kind_is_an_error_and_auto_picks_per_platform():
    with pytest.raises(ValueError, match="attention='flash'.*chunked"):
        with attention.use_attention("flash"):
            pass
    assert [attention.resolve("auto", p) for p in ("cpu", "tpu", "cuda")] == ["chunked", "xla", "xla"]
    assert attention.resolve("auto") == "chunked"  # the tests run on CPU
    assert attention.resolve("xla", "cpu") == "xla" and attention.resolve("chunked", "tpu") == "chunked"


def test_unet_with_chunked_attention_and_lora_equals_diffusers_path(tiny_sd, unet_inputs):
    """Swapped into every FlaxAttention of the tiny UNet (self-attention over 256 tokens in blocks of
    64, cross-attention over the 77 text states), with a factored LoRA on the projections: the same
    output and LoRA gradient as diffusers' own attention on the merged LoRA."""
    latents, t, ctx = unet_inputs
    spec = lora.LoraSpec(rank=4, alpha=4)
    tree = lora.random_like(jax.random.PRNGKey(3), lora.init(jax.random.PRNGKey(1), tiny_sd.params["unet"], spec), 0.2)
    base = tiny_sd.params["unet"]

    def ours(tr):
        with attention.use_attention("chunked", 64), lora.factored(tr, spec.scale):
            return tiny_sd.unet_apply(base, latents, t, ctx)

    def reference(tr):
        return tiny_sd.unet_apply(lora.merge(base, tr, spec.scale), latents, t, ctx)

    a, b = jax.jit(ours)(tree), jax.jit(reference)(tree)
    assert float(jnp.abs(b - jax.jit(tiny_sd.unet_apply)(base, latents, t, ctx)).max()) > 1e-2  # LoRA matters
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    ga = jax.jit(jax.grad(lambda tr: jnp.sum(ours(tr) ** 2)))(tree)
    gb = jax.jit(jax.grad(lambda tr: jnp.sum(reference(tr) ** 2)))(tree)
    for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4 * float(jnp.abs(y).max()))
