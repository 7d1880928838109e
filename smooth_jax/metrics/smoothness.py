"""ISTD, the paper's latent-smoothness metric (Smooth Diffusion, Guo et al. 2024, Sec. 5.1).

For each prompt: two noises, 11 slerp mixes (weights 0, 0.1, ..., 1), 11 images; the L2
distances between adjacent images; the standard deviation of those 10 distances. ISTD is the mean
of that std over prompts (500 in the paper). Lower is smoother: a model whose image moves by
the same amount for each equal step of the mix weight scores 0.

The paper does not give the pixel scale. smooth-jax uses images in [0, 1] and the L2 norm over all
C*H*W values (not a per-pixel mean), the reading that fits the paper's numbers
(ISTD 38.63 for SD-1.5 and 16.54 for Smooth Diffusion at 512 px). Every result states it in
``scale``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ISTD_SCALE = "images in [0,1], L2 norm over all C*H*W pixels; std over adjacent distances is population std (ddof=0)"


def to_unit_range(images: jax.Array, value_range: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """Map images from ``value_range`` (e.g. (-1, 1), the decoder's range, or (0, 255) for uint8)
    to [0, 1] as float32 (float64 stays float64 under x64). No clipping."""
    lo, hi = (float(v) for v in value_range)
    if hi <= lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}.")
    x = jnp.asarray(images)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float32, or float64 under x64
    if (lo, hi) == (0.0, 1.0):
        return x
    return (x - lo) / (hi - lo)


@jax.jit
def adjacent_distances(frames: jax.Array) -> jax.Array:
    """L2 distances between consecutive frames.

    frames: ``[..., F, C, H, W]`` float images (pass them in [0, 1] for ISTD's scale).
    Returns ``[..., F-1]`` float32: ``||frames[i+1] - frames[i]||_2`` over all C*H*W values, in the
    images' units (no per-pixel averaging).
    """
    x = jnp.asarray(frames, jnp.float32)
    d = x[..., 1:, :, :, :] - x[..., :-1, :, :, :]
    return jnp.sqrt(jnp.sum(d * d, axis=(-3, -2, -1)))


def istd_from_distances(distances) -> dict:
    """ISTD from per-prompt adjacent distances, so long runs can compute distances in chunks.

    distances: ``[P, F-1]`` (``adjacent_distances`` of each prompt's strip, [0,1] images).
    Returns ``istd`` (float: mean over prompts of the per-prompt std), ``per_prompt_std`` [P],
    ``per_prompt_mean_distance`` [P], ``distances`` [P, F-1] (numpy float64) and ``scale`` (str).
    The std is the population std (ddof=0) of the F-1 distances of one prompt.
    """
    d = np.asarray(distances, np.float64)
    if d.ndim != 2 or d.shape[1] < 1:
        raise ValueError(f"distances must be [P, F-1] with F >= 2, got shape {d.shape}.")
    std = d.std(axis=1, ddof=0)
    return {
        "istd": float(std.mean()),
        "per_prompt_std": std,
        "per_prompt_mean_distance": d.mean(axis=1),
        "distances": d,
        "scale": ISTD_SCALE,
    }


def istd(strips, value_range: tuple[float, float] = (0.0, 1.0)) -> dict:
    """ISTD of interpolation strips.

    strips: ``[P, F, 3, H, W]``, for each of P prompts the F images (F = 11 in the paper) made from
    slerp mixes of two noises at evenly spaced weights, in order. Images are in ``value_range``
    ((0, 1) default; pass (-1, 1) for decoder output); they are mapped to [0, 1] first.
    Returns the dict of ``istd_from_distances``: ``istd`` is in [0,1]-image L2 units over all
    C*H*W pixels, per-prompt std with ddof=0; ``scale`` says so.
    """
    x = to_unit_range(strips, value_range)
    if x.ndim != 5:
        raise ValueError(f"strips must be [P, F, C, H, W], got shape {x.shape}.")
    if x.shape[1] < 2:
        raise ValueError(f"need at least 2 frames per prompt, got {x.shape[1]}.")
    return istd_from_distances(adjacent_distances(x))
