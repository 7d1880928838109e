"""The paper's equations: noising, x0 prediction, and Smooth Diffusion's training loss.

Guo et al., "Smooth Diffusion", CVPR 2024 (arXiv 2312.04410); facts of the authors' code in
DESIGN.md §2. Notation: ``abar`` is alpha-bar_t of the DDPM schedule, ``eps`` the sampled noise,
``eps_theta`` the UNet's prediction.

    x_t     = sqrt(abar) x0 + sqrt(1 - abar) eps                          (forward noising)
    x0_hat  = (x_t - sqrt(1 - abar) eps_theta(x_t, t, c)) / sqrt(abar)   (predicted clean latent)
    J       = d x0_hat / d eps        (through x_t's explicit eps term and through the UNet)
    L_reg   = E[(sqrt(1 - abar) ||J^T u||_2 - a)^2]                     (Step-wise Variation Reg.)
    L       = ||eps - eps_theta||^2 + lambda L_reg

``sqrt(1 - abar) ||J^T u||`` is one vector-Jacobian product: ``jax.vjp`` of ``eps -> x0_hat``
applied to ``sqrt(1 - abar) u``. Its parameter gradient differentiates through that vjp
(second-order autodiff). ``u`` is a standard Gaussian divided by sqrt(C H W): unit length in
expectation, as in the authors' code. ``a`` is an EMA of the batch-mean norm with decay 0.01; the
penalty uses the updated ``a``, which stays in the graph (as StyleGAN2's path-length penalty,
which this loss follows), while the stored ``a`` is a constant.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def _per_sample(v: Array, x: Array) -> Array:
    """[B] -> [B, 1, 1, 1] to broadcast over a [B, C, H, W] latent."""
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _at_least_f32(x: Array) -> Array:
    """bf16 compute still reduces in float32; float64 (the gradient tests) stays float64."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def add_noise(x0: Array, eps: Array, abar: Array) -> Array:
    """Forward noising. x0, eps: [B,C,H,W]; abar: [B] -> x_t [B,C,H,W]."""
    return _per_sample(jnp.sqrt(abar), x0) * x0 + _per_sample(jnp.sqrt(1.0 - abar), x0) * eps


def predict_x0(x_t: Array, eps_pred: Array, abar: Array) -> Array:
    """x0_hat from an epsilon prediction. x_t, eps_pred: [B,C,H,W]; abar: [B]."""
    return (x_t - _per_sample(jnp.sqrt(1.0 - abar), x_t) * eps_pred) / _per_sample(jnp.sqrt(abar), x_t)


def sample_direction(rng: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """u ~ N(0, I) / sqrt(C H W), per sample: [B,C,H,W] (unit length in expectation)."""
    per_sample = 1
    for d in shape[1:]:
        per_sample *= d
    return jax.random.normal(rng, shape, dtype) / jnp.sqrt(jnp.asarray(per_sample, dtype))


def ema_update(a: Array, value: Array, decay: float) -> Array:
    """a + decay (value - a): decay 0.01 moves 1% of the way each step."""
    return a + decay * (value - a)


class LossOut(NamedTuple):
    loss: Array  # scalar: mse + reg_weight * penalty
    mse: Array  # scalar
    penalty: Array  # scalar, 0 without the regularizer
    norms: Array  # [B]: sqrt(1 - abar) ||J^T u|| per sample (zeros without the regularizer)
    ema_a: Array  # scalar: the updated EMA, as a constant for the next step


def diffusion_mse(eps: Array, eps_pred: Array) -> Array:
    """The base loss: mean over batch and elements of (eps - eps_theta)^2."""
    return jnp.mean(jnp.square(_at_least_f32(eps) - _at_least_f32(eps_pred)))


def plain_loss(eps_fn: Callable[[Array], Array], x0: Array, eps: Array, abar: Array, ema_a: Array) -> LossOut:
    """Standard LoRA fine-tuning loss (lambda = 0). eps_fn: x_t [B,C,H,W] -> eps_theta [B,C,H,W]."""
    mse = diffusion_mse(eps, eps_fn(add_noise(x0, eps, abar)))
    zero = jnp.zeros((), jnp.float32)
    return LossOut(mse, mse, zero, jnp.zeros((x0.shape[0],), jnp.float32), _at_least_f32(ema_a))


def smooth_loss(
    eps_fn: Callable[[Array], Array],
    x0: Array,
    eps: Array,
    abar: Array,
    u: Array,
    ema_a: Array,
    *,
    reg_weight: float,
    ema_decay: float,
) -> LossOut:
    """Smooth Diffusion's loss: MSE + reg_weight * mean_b (norm_b - a_new)^2.

    eps_fn: x_t -> eps_theta(x_t, t, c), closing over params, t and c; x0, eps, u: [B,C,H,W];
    abar: [B]; ema_a: scalar. One UNet forward serves both terms: eps_theta comes out of the vjp's
    primal pass as an auxiliary output. Under jit with a sharded batch, the batch means (and so
    the EMA update) are over the global batch.
    """
    sqrt_1m = _per_sample(jnp.sqrt(1.0 - abar), x0)

    def x0_hat_of(e):
        x_t = add_noise(x0, e, abar)
        eps_pred = eps_fn(x_t)
        return predict_x0(x_t, eps_pred.astype(x_t.dtype), abar), eps_pred

    _, vjp_fn, eps_pred = jax.vjp(x0_hat_of, eps, has_aux=True)
    (g,) = vjp_fn((sqrt_1m * u).astype(eps.dtype))
    norms = jnp.sqrt(jnp.sum(jnp.square(_at_least_f32(g)), axis=tuple(range(1, g.ndim))))
    a_new = ema_update(_at_least_f32(ema_a), jnp.mean(norms), ema_decay)
    penalty = jnp.mean(jnp.square(norms - a_new))
    mse = diffusion_mse(eps, eps_pred)
    return LossOut(mse + reg_weight * penalty, mse, penalty, norms, jax.lax.stop_gradient(a_new))
