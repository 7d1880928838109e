"""The paper's equations against independent computations: closed forms, an explicit Jacobian,
and central finite differences in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smooth_jax import lora, objective
from smooth_jax.models import StableDiffusion

# 8x8 latents keep the explicit Jacobian (256 x 256 per sample) and the float64 compiles small.
LATENT = (2, 4, 8, 8)


def _draws(seed=0, shape=LATENT):
    r = np.random.default_rng(seed)
    x0 = r.standard_normal(shape)
    eps = r.standard_normal(shape)
    u = r.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    abar = np.array([0.9, 0.3])
    return x0, eps, u, abar


def test_noising_and_x0_prediction_invert_each_other():
    x0, eps, _, abar = _draws()
    x_t = objective.add_noise(x0, eps, abar)
    np.testing.assert_allclose(objective.predict_x0(x_t, eps, abar), x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_t[1], np.sqrt(0.3) * x0[1] + np.sqrt(0.7) * eps[1], rtol=1e-5, atol=1e-6)


def test_direction_scale():
    u = objective.sample_direction(jax.random.PRNGKey(0), (64, 4, 8, 8))
    norms = np.linalg.norm(np.asarray(u).reshape(64, -1), axis=1)
    assert abs(norms.mean() - 1) < 0.02 and norms.std() > 0.01  # unit in expectation, not exactly


def test_linear_model_closed_form():
    """eps_theta = x_t W (per sample, flattened): J = (I - s W)^T s / sqrt(abar), s = sqrt(1-abar),
    so the norm is || s/sqrt(abar) (I - s W) s u || per sample. Penalty and EMA by hand."""
    with jax.enable_x64(True):
        x0, eps, u, abar = _draws(1)
        n = int(np.prod(LATENT[1:]))
        W = np.random.default_rng(2).standard_normal((n, n)) * 0.05

        def eps_fn(x_t):
            return (x_t.reshape(x_t.shape[0], -1) @ W).reshape(x_t.shape)

        out = objective.smooth_loss(eps_fn, x0, eps, abar, u, jnp.asarray(0.5), reg_weight=2.0, ema_decay=0.01)
        s, sa = np.sqrt(1 - abar), np.sqrt(abar)
        norms = []
        for b in range(2):
            J = (np.eye(n) - s[b] * W).T * s[b] / sa[b]  # d x0_hat / d eps as (out, in) for row vectors
            norms.append(np.linalg.norm(J.T @ (s[b] * u[b].ravel())))
        norms = np.array(norms)
        a_new = 0.5 + 0.01 * (norms.mean() - 0.5)
        x_t = sa[:, None, None, None] * x0 + s[:, None, None, None] * eps
        mse = np.mean((eps - eps_fn(x_t)) ** 2)
        np.testing.assert_allclose(out.norms, norms, rtol=1e-10)
        np.testing.assert_allclose(out.ema_a, a_new, rtol=1e-12)
        np.testing.assert_allclose(out.penalty, np.mean((norms - a_new) ** 2), rtol=1e-10)
        np.testing.assert_allclose(out.loss, mse + 2.0 * np.mean((norms - a_new) ** 2), rtol=1e-10)


def test_one_unet_forward_serves_both_terms():
    calls = []

    def eps_fn(x_t):
        calls.append(1)
        return jnp.tanh(x_t)

    x0, eps, u, abar = _draws()
    jax.make_jaxpr(lambda e: objective.smooth_loss(eps_fn, x0, e, abar, u, 0.0, reg_weight=1.0, ema_decay=0.01).loss)(eps)
    assert len(calls) == 1


@pytest.fixture(scope="module")
def sd64(tiny_sd):
    """The tiny UNet computing in float64 (Flax Dense casts to the module dtype)."""
    sd = StableDiffusion(configs=tiny_sd.configs, tokenizer=None, schedule=tiny_sd.schedule, dtype=jnp.float64)
    return sd


def _unet_eps_fn(sd, params, t, ctx):
    return lambda x_t: sd.unet_apply(params, x_t, t, ctx)


def test_norm_matches_explicit_jacobian_of_the_unet(tiny_sd, sd64):
    """Build d x0_hat / d eps of the real (tiny) UNet column by column and compare the norm."""
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), tiny_sd.params["unet"])
        x0, eps, u, abar = _draws(3)
        t = jnp.array([100, 700])
        ctx = np.random.default_rng(4).standard_normal((2, 77, 32))
        fn = _unet_eps_fn(sd64, params, t, ctx)
        out = jax.jit(lambda e: objective.smooth_loss(fn, x0, e, abar, u, 0.0, reg_weight=1.0, ema_decay=0.01))(eps)

        def x0_hat_flat(e_flat):  # all samples at once; the Jacobian is block-diagonal in b
            e = e_flat.reshape(LATENT)
            x_t = objective.add_noise(x0, e, abar)
            return objective.predict_x0(x_t, fn(x_t), abar).ravel()

        J = np.asarray(jax.jit(jax.jacfwd(x0_hat_flat))(eps.ravel()))  # [B*n, B*n]
        n = int(np.prod(LATENT[1:]))
        s = np.sqrt(1 - abar)
        for b in range(2):
            block = J[b * n:(b + 1) * n, b * n:(b + 1) * n]
            assert np.abs(J[b * n:(b + 1) * n, (1 - b) * n:(2 - b) * n]).max() < 1e-12  # samples independent
            expected = np.linalg.norm(block.T @ (s[b] * u[b].ravel()))
            np.testing.assert_allclose(out.norms[b], expected, rtol=1e-9)


def test_lora_gradient_matches_central_finite_differences(tiny_sd, sd64):
    """d L / d LoRA of the full loss (MSE + penalty, through the vjp and the in-graph EMA)
    against (L(p + h v) - L(p - h v)) / 2h along a random direction v, in float64.

    diffusers' Flax UNet still rounds a few internals to float32, which puts ~1e-7 of noise on L,
    so h = 1e-3: that noise then costs ~1e-4 of the derivative and the O(h^2) truncation ~1e-6.
    Measured agreement is ~1e-5 relative; the MSE and penalty parts are each 1e-2 to 1 here, so
    a missing or wrong term cannot pass the 1e-4 tolerance."""
    with jax.enable_x64(True):
        base = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), tiny_sd.params["unet"])
        spec = lora.LoraSpec(rank=2, alpha=2)
        tree = lora.init(jax.random.PRNGKey(0), base, spec, dtype=jnp.float64)
        tree = lora.random_like(jax.random.PRNGKey(1), tree, std=0.1)
        x0, eps, u, abar = _draws(5)
        t = jnp.array([300, 900])
        ctx = np.random.default_rng(6).standard_normal((2, 77, 32))

        def loss(tr):
            fn = _unet_eps_fn(sd64, lora.merge(base, tr, spec.scale), t, ctx)
            return objective.smooth_loss(fn, x0, eps, abar, u, 0.7, reg_weight=10.0, ema_decay=0.01).loss

        grad = jax.jit(jax.grad(loss))(tree)
        v = lora.random_like(jax.random.PRNGKey(2), tree, std=1.0)
        analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(v)))
        h = 1e-3
        shift = lambda sgn: jax.tree_util.tree_map(lambda p, d: p + sgn * h * d, tree, v)  # noqa: E731
        jl = jax.jit(loss)
        numeric = (float(jl(shift(1))) - float(jl(shift(-1)))) / (2 * h)
        assert abs(analytic) > 1e-3
        np.testing.assert_allclose(analytic, numeric, rtol=1e-4)
        # The regularizer contributes: the gradient without it differs.
        def mse_only(tr):
            fn = _unet_eps_fn(sd64, lora.merge(base, tr, spec.scale), t, ctx)
            return objective.plain_loss(fn, x0, eps, abar, 0.7).loss

        g0 = jax.jit(jax.grad(mse_only))(tree)
        plain = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(v)))
        assert abs(plain - analytic) > 1e-3 * abs(analytic)
