"""Image-pair fidelity: MSE, PSNR and SSIM (inversion/reconstruction quality, the paper's Table 2).

Images are ``[B, C, H, W]``; every function maps them from ``value_range`` to [0, 1] first, so the
numbers are always on the [0, 1] scale (data range 1). Each returns one value per image pair;
``reconstruction_metrics`` averages them (PSNR is the mean of per-image PSNRs, not the PSNR of
the mean MSE). All are jit-able and run in float32 (float64 when x64 is on and inputs are float64).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from smooth_jax.metrics.smoothness import to_unit_range

# Wang et al. 2004 / scikit-image ``gaussian_weights=True``: sigma 1.5, truncate 3.5 -> 11 taps.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _range(value_range) -> tuple[float, float]:
    """A hashable (low, high) for jit's static argument, whatever sequence was passed."""
    lo, hi = value_range
    return float(lo), float(hi)


def _pair(x, y, value_range):
    x, y = to_unit_range(x, value_range), to_unit_range(y, value_range)
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two [B, C, H, W] batches of the same shape, got {x.shape} and {y.shape}.")
    return x, y


@functools.partial(jax.jit, static_argnames="value_range")
def _mse(x, y, value_range):
    x, y = _pair(x, y, value_range)
    return jnp.mean((x - y) ** 2, axis=(1, 2, 3))


def mse(x, y, value_range: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """Mean squared error per image pair: ``[B, C, H, W] x2 -> [B]``, in [0,1]-units squared
    (mean over C*H*W)."""
    return _mse(x, y, _range(value_range))


def psnr(x, y, value_range: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """PSNR per image pair in dB: ``10 log10(1 / MSE)`` with data range 1 -> ``[B]`` (inf where equal)."""
    return 10.0 * jnp.log10(1.0 / mse(x, y, value_range))


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
    """1-D normalised Gaussian taps as ``scipy.ndimage.gaussian_filter1d`` builds them:
    radius ``int(truncate * sigma + 0.5)`` (5 for the SSIM default, so 11 taps)."""
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def _filter_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
    """Separable 2-D filter over the last two axes, 'valid' region only: ``[..., H, W]`` ->
    ``[..., H-k+1, W-k+1]``. Shifted multiply-adds rather than a conv, so it runs in full float32
    on every backend (TPU/GPU convs may use reduced-precision passes by default)."""
    k = len(taps)
    h, w = x.shape[-2], x.shape[-1]
    rows = sum(float(taps[i]) * x[..., i : h - k + 1 + i, :] for i in range(k))
    return sum(float(taps[i]) * rows[..., :, i : w - k + 1 + i] for i in range(k))


def ssim(x, y, value_range: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """Mean SSIM per image pair: ``[B, C, H, W] x2 -> [B]``, unitless, in [-1, 1].

    Wang et al. 2004 with the Gaussian window (sigma 1.5, 11x11), K1=0.01, K2=0.03, data range 1,
    population (co)variances, the mean over the region where the window fits inside the image,
    then the mean over channels. Equals ``skimage.metrics.structural_similarity(a, b,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=0)``
    per image (the cropped border makes skimage's 'reflect' padding irrelevant). H, W >= 11.
    """
    return _ssim(x, y, _range(value_range))


@functools.partial(jax.jit, static_argnames="value_range")
def _ssim(x, y, value_range):
    x, y = _pair(x, y, value_range)
    taps = gaussian_window()
    if min(x.shape[-2:]) < len(taps):
        raise ValueError(f"SSIM needs images of at least {len(taps)}x{len(taps)}, got {x.shape[-2:]}.")
    f = functools.partial(_filter_valid, taps=taps)
    ux, uy = f(x), f(y)
    vx = f(x * x) - ux * ux
    vy = f(y * y) - uy * uy
    vxy = f(x * y) - ux * uy
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(-2, -1)).mean(axis=-1)


def reconstruction_metrics(x, y, value_range: tuple[float, float] = (0.0, 1.0)) -> dict[str, float]:
    """Means over the batch of per-image ``mse`` ([0,1] units squared), ``psnr`` (dB, data range 1)
    and ``ssim``: ``[B, C, H, W] x2 -> {"mse", "psnr", "ssim"}`` as Python floats."""
    return {
        "mse": float(jnp.mean(mse(x, y, value_range))),
        "psnr": float(jnp.mean(psnr(x, y, value_range))),
        "ssim": float(jnp.mean(ssim(x, y, value_range))),
    }
