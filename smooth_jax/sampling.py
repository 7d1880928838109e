"""Deterministic DDIM sampling (eta = 0) with classifier-free guidance, and slerp of noises.

The sampler is diffusers' ``StableDiffusionPipeline`` with a ``DDIMScheduler`` (SD-1.5 config:
``timestep_spacing="leading"``, ``steps_offset=1``, ``set_alpha_to_one=False``), rewritten as one
pure function whose denoising loop is a single ``jax.lax.scan``. Step count and guidance scale are
settled when the sampler is built, so nothing inside the traced function branches on config, and
there is no Python loop over samples: the caller jits it, with in/out shardings over a mesh if it
wants them (the batch axis is the only one that needs sharding).

    sd = load("tiny")
    context, uncond = encode_prompts(sd, sd.params["text_encoder"], ["a cat", "a dog"])
    sample = jax.jit(make_sampler(sd, num_steps=50, guidance_scale=7.5))
    unet_params = merged_unet_params(sd, sd.params["unet"], lora_tree, scale=1.0)  # or the base params
    latents = sample(unet_params, noise, context, uncond)      # noise: [2, 4, h, w]
    images = sd.decode_latents(sd.params["vae"], latents)       # [2, 3, H, W] in about [-1, 1]

Smooth Diffusion's interpolation (DESIGN §1-§2) mixes two initial noises with ``slerp`` at
``interpolation_weights(11)`` and samples every mix with the same prompt.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from smooth_jax import attention
from smooth_jax import lora as lora_lib
from smooth_jax.models.schedule import NoiseSchedule
from smooth_jax.models.tokenizer import tokenize

# Above this |cos| between two noises slerp's sin(theta) denominator is ill-conditioned; like the
# authors' code (and the usual SD slerp) we fall back to linear interpolation there.
SLERP_DOT_THRESHOLD = 0.9995

Sampler = Callable[..., jax.Array]


# --- DDIM schedule ----------------------------------------------------------------------------


def ddim_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """The UNet timesteps of a ``num_steps`` DDIM run, descending: int32 ``[num_steps]``.

    diffusers' ``DDIMScheduler.set_timesteps`` with ``timestep_spacing="leading"`` (the default,
    and SD-1.5's): ``arange(num_steps) * (T // num_steps)``, reversed, plus ``steps_offset``.
    For SD-1.5 and 50 steps that is 981, 961, ..., 1.
    """
    n_train = schedule.num_train_timesteps
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"num_steps={num_steps} must be in [1, {n_train}] (the schedule's training timesteps).")
    step_ratio = n_train // num_steps
    timesteps = (np.arange(num_steps) * step_ratio)[::-1] + schedule.steps_offset
    return timesteps.astype(np.int32)


def ddim_alphas(schedule: NoiseSchedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(alpha_t, alpha_prev)``: float64 ``[num_steps]`` abar at each DDIM timestep and at the one it steps to.

    As diffusers' ``DDIMScheduler.step``: the previous timestep is ``t - T // num_steps``, and where
    that is negative (the last step) abar is ``final_alpha_cumprod``: 1 with ``set_alpha_to_one``,
    else ``alphas_cumprod[0]`` (SD-1.5), so the last step does not land exactly on x0.
    """
    ts = ddim_timesteps(schedule, num_steps).astype(np.int64)
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    final = 1.0 if schedule.set_alpha_to_one else float(abar[0])
    prev = ts - schedule.num_train_timesteps // num_steps
    alpha_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], final)
    return abar[ts], alpha_prev


def ddim_step(x: jax.Array, eps: jax.Array, alpha_t, alpha_prev) -> jax.Array:
    """One deterministic DDIM update (eta = 0), from abar ``alpha_t`` to ``alpha_prev``.

    ``x0_hat = (x - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)``;
    ``x_prev = sqrt(alpha_prev) x0_hat + sqrt(1 - alpha_prev) eps``.
    Run with the alphas swapped it is the DDIM inversion step.
    """
    x0_hat = (x - jnp.sqrt(1.0 - alpha_t) * eps) / jnp.sqrt(alpha_t)
    return jnp.sqrt(alpha_prev) * x0_hat + jnp.sqrt(1.0 - alpha_prev) * eps


# --- sampler ----------------------------------------------------------------------------------


def make_sampler(sd, *, num_steps: int = 50, guidance_scale: float = 7.5) -> Sampler:
    """A pure ``sample(unet_params, noise, context, uncond_context=None) -> latents``; not jitted.

    noise: ``[B, 4, h, w]`` initial latents x_T (DDIM's ``init_noise_sigma`` is 1, so used as is).
    context, uncond_context: ``[B, L, D]`` text-encoder states of the prompts and of the negative
    prompt (see ``encode_prompts``). With ``guidance_scale <= 1`` there is no guidance: the UNet
    runs on the conditional batch only and ``uncond_context`` is ignored (may be None).
    Returns float32 scaled latents ``[B, 4, h, w]``; decode with ``sd.decode_latents``.

    The whole loop is one ``lax.scan`` over the ``num_steps`` timesteps. With guidance each step
    runs the UNet once on ``2B`` samples, eps = eps_u + g (eps_c - eps_u). The unconditional and
    conditional copies are interleaved per sample (``[u_0, c_0, u_1, c_1, ...]``) rather than
    concatenated as two halves: each sample's pair then stays on the device holding that sample
    when the batch axis is sharded, so no step needs cross-device traffic. The result is the same.

    Jit it yourself (``jax.jit(sampler)``, optionally with ``in_shardings``/``out_shardings`` that
    shard the batch axis of noise/contexts/latents and replicate the params), so the caller owns
    sharding and donation. For a LoRA, pass ``merged_unet_params(...)`` as ``unet_params`` (merge
    inside the same jit to avoid keeping a merged copy around).
    """
    timesteps = ddim_timesteps(sd.schedule, num_steps)
    alpha_t, alpha_prev = ddim_alphas(sd.schedule, num_steps)
    guided = float(guidance_scale) > 1.0
    g = float(guidance_scale)
    # Per-step scan inputs, settled now: [S] timesteps and abar pairs (numpy: they become
    # constants of whatever jit traces the sampler, placed wherever that jit runs).
    xs = (timesteps, alpha_t.astype(np.float32), alpha_prev.astype(np.float32))

    def sample(
        unet_params: Any, noise: jax.Array, context: jax.Array, uncond_context: jax.Array | None = None
    ) -> jax.Array:
        noise = jnp.asarray(noise, jnp.float32)
        context = jnp.asarray(context)
        b = noise.shape[0]
        if context.shape[0] != b:
            raise ValueError(f"context has batch {context.shape[0]} but noise has batch {b}.")
        if guided:
            if uncond_context is None:
                raise ValueError(f"guidance_scale={g} > 1 needs uncond_context (e.g. from encode_prompts).")
            uncond_context = jnp.asarray(uncond_context, context.dtype)
            if uncond_context.shape != context.shape:
                raise ValueError(f"uncond_context {uncond_context.shape} and context {context.shape} differ in shape.")
            ctx = interleave(uncond_context, context)
        else:
            ctx = context

        def step(x, per_step):
            t, a_t, a_prev = per_step
            x_in = interleave(x, x) if guided else x
            t_in = jnp.full((x_in.shape[0],), t)
            with attention.use_attention("auto"):  # chunked on CPU: 2.2x faster at batch 4 (eval/bench/sampling.py)
                eps = sd.unet_apply(unet_params, x_in.astype(sd.dtype), t_in, ctx).astype(jnp.float32)
            if guided:
                eps = eps.reshape((b, 2) + eps.shape[1:])
                eps_u, eps_c = eps[:, 0], eps[:, 1]
                eps = eps_u + g * (eps_c - eps_u)
            return ddim_step(x, eps, a_t, a_prev), None

        latents, _ = jax.lax.scan(step, noise, jax.tree.map(jnp.asarray, xs))
        return latents

    return sample


def interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """``[B, ...]`` x2 -> ``[2B, ...]`` ordered a_0, b_0, a_1, b_1, ... (keeps pairs on one shard)."""
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def merged_unet_params(sd, unet_params: Any, lora_tree: Any | None, scale: float = 1.0) -> Any:
    """UNet params with a LoRA folded in (``lora.merge``); the base params if ``lora_tree`` is None.

    Pure: call it inside the jitted function that samples. ``sd`` is taken for the parallel with
    the other helpers here and to name the model in the error if the LoRA does not fit.
    """
    if lora_tree is None:
        return unet_params
    lora_lib.check_compatible(unet_params, lora_tree, where=f"LoRA for {getattr(sd, 'source', 'the model')}")
    return lora_lib.merge(unet_params, lora_tree, scale)


def encode_prompts(
    sd, text_params: Any, prompts: Sequence[str] | str, negative_prompt: str | Sequence[str] = ""
) -> tuple[jax.Array, jax.Array]:
    """Prompts -> ``(context, uncond_context)``, both float ``[B, L, D]`` (L = 77 for SD).

    ``negative_prompt`` is one string for every prompt or a list of B; "" is the usual unconditional
    embedding. Both go through the text encoder in one jitted call of ``2B`` rows.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(
            f"{len(negatives)} negative prompts for {len(prompts)} prompts: pass one string or one per prompt."
        )
    ids = tokenize(sd.tokenizer, prompts + negatives, max_length=sd.max_length)
    states = jax.jit(sd.encode_text)(text_params, ids)
    return states[: len(prompts)], states[len(prompts) :]


# --- interpolation ----------------------------------------------------------------------------


def interpolation_weights(n: int) -> np.ndarray:
    """``n`` mixing weights 0, ..., 1 evenly spaced, float32 (n = 11 in the paper's ISTD)."""
    return np.linspace(0.0, 1.0, n, dtype=np.float32)


def slerp(a: jax.Array, b: jax.Array, t, dot_threshold: float = SLERP_DOT_THRESHOLD) -> jax.Array:
    """Spherical interpolation between ``a`` and ``b`` (same shape ``[N, ...]``), per sample.

    Each ``a[i]``, ``b[i]`` is flattened into one vector (a single pair is ``[1, ...]``), and
    ``theta_i`` is the angle between them. Out: ``sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b``;
    where ``|cos theta| > dot_threshold`` it is ``(1-t) a + t b`` instead (authors' fallback).
    t: a scalar, or an array of any shape ``[*T]``; the result is ``[*T, N, ...]``.
    t = 0 gives ``a`` and t = 1 gives ``b`` exactly. Jit-able; computed in float32 or wider.
    """
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    if a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"slerp needs a and b of the same shape [N, ...]; got {a.shape} and {b.shape}.")
    dtype = jnp.result_type(a.dtype, b.dtype, jnp.float32)
    a, b = a.astype(dtype), b.astype(dtype)
    t = jnp.asarray(t, dtype)
    sample_axes = tuple(range(1, a.ndim))
    sq = jnp.sum(a * a, axis=sample_axes) * jnp.sum(b * b, axis=sample_axes)  # [N] |a|^2 |b|^2
    # A zero vector has no direction: call it parallel (lerp) rather than divide by 0 (or take
    # sqrt'(0) in a gradient).
    nonzero = sq > 0
    cos = jnp.sum(a * b, axis=sample_axes) / jnp.sqrt(jnp.where(nonzero, sq, 1.0))
    cos = jnp.where(nonzero, jnp.clip(cos, -1.0, 1.0), 1.0)
    linear = jnp.abs(cos) > dot_threshold
    # Where the lerp branch is taken, feed the slerp branch a harmless angle: arccos'(+-1) and
    # 1/sin(0) are infinite, and jnp.where would pass their NaNs into gradients.
    theta = jnp.arccos(jnp.where(linear, 0.0, cos))
    sin_theta = jnp.sin(theta)
    tt = t[..., None]  # [*T, 1] against [N]
    wa = jnp.where(linear, 1.0 - tt, jnp.sin(theta - tt * theta) / sin_theta)  # [*T, N]
    wb = jnp.where(linear, tt, jnp.sin(tt * theta) / sin_theta)
    # sin(theta) / sin(theta) need not be exactly 1 once XLA fuses the two sines differently, so
    # pin the endpoints: t = 0 and t = 1 must reproduce the inputs bit for bit.
    wa = jnp.where(tt == 0, 1.0, jnp.where(tt == 1, 0.0, wa))
    wb = jnp.where(tt == 0, 0.0, jnp.where(tt == 1, 1.0, wb))
    expand = (...,) + (None,) * len(sample_axes)
    return wa[expand] * a + wb[expand] * b
