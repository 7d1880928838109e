"""Real-image inversion: DDIM inversion, null-text inversion (NTI), prompt-switch editing.

What the authors' code does (DESIGN §2), rewritten as pure JAX:

- DDIM inversion runs the conditional UNet without guidance and walks the sampler's DDIM schedule
  backwards: ``x_{t} = ddim_step(x_{t-}, eps(x_{t-}, t, c), abar_{t-}, abar_t)``, the sampler's step
  with the alphas swapped (``t-`` is the timestep the sampler steps to from ``t``). It is diffusers'
  ``DDIMInverseScheduler`` and prompt-to-prompt's ``NullInversion.ddim_loop``.
- NTI (Mokady et al. 2023) then walks the guided sampler (CFG 7.5) down that trajectory, the
  "pivots": at each step i it optimises the null (unconditional) embedding with Adam
  (lr ``1e-2 (1 - i/100)``, at most 10 inner steps, stop once the loss < ``1e-5 + 2e-5 i``) so that
  the guided step lands on the next pivot, then takes the step with the optimised null.
- Real-image interpolation optimises one null series for two images; editing samples from the
  inverted x_T with the NTI nulls, switching from the source to the target prompt after
  ``round((1 - r) S)`` of the S steps.

Where the jit boundaries are:
- ``make_ddim_inverter`` and ``make_null_sampler`` return pure functions whose loop over the S
  timesteps is one ``lax.scan``; jit them yourself (as ``sampling.make_sampler``), or call the
  wrappers ``ddim_invert`` / ``sample_with_nulls`` / ``reconstruct`` / ``edit``, which jit them once
  per (model, config) and reuse the compiled function.
- ``make_nti_step`` is one NTI timestep: a ``lax.while_loop`` over the inner Adam steps with the
  early stop in its condition, then the guided step. Timestep, alphas, lr, threshold, the
  inner-step cap and the shared-null flag are traced arguments, so one compile serves every
  timestep, setting, and both the per-image and the shared (interpolation) form.
  ``null_text_optimize`` jits it and runs the outer loop over timesteps in Python: the timesteps are
  sequential anyway, the host does not block between them, and it can show a tqdm bar.

LoRA: pass merged params (``sampling.merged_unet_params``) as ``unet_params`` everywhere.

    latents = encode_latents(sd, sd.params["vae"], images)                 # [B,4,h,w]
    context, uncond = sampling.encode_prompts(sd, sd.params["text_encoder"], prompts)
    inv = null_text_invert(sd, unet, latents, context, uncond, num_steps=50)
    rec = sample_with_nulls(sd, unet, inv.x_T, context, inv.nulls, num_steps=50)
    out = edit(sd, unet, inv.x_T, inv.nulls, context, target_context, ratio=0.8, num_steps=50)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smooth_jax import attention
from smooth_jax.sampling import ddim_alphas, ddim_step, ddim_timesteps, interleave, slerp

# The authors' NTI settings (DESIGN §2; prompt-to-prompt's null_optimization has the same).
NTI_LR = 1e-2  # Adam lr at step 0; step i uses NTI_LR * (1 - i / 100)
NTI_INNER_STEPS = 10  # at most this many Adam steps per timestep
NTI_EARLY_STOP = 1e-5  # stop once loss < NTI_EARLY_STOP + i * NTI_EARLY_STOP_SLOPE
NTI_EARLY_STOP_SLOPE = 2e-5
# torch.optim.Adam defaults, which their code uses.
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


def _schedule(sd, num_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampling order (descending t): int32 timesteps [S], float32 abar_t [S], abar_prev [S]."""
    a_t, a_prev = ddim_alphas(sd.schedule, num_steps)
    return ddim_timesteps(sd.schedule, num_steps), a_t.astype(np.float32), a_prev.astype(np.float32)


def _eps(sd, unet_params, x: jax.Array, t, context: jax.Array) -> jax.Array:
    """UNet eps in float32 for x [B,4,h,w] at scalar timestep t, context [B,L,D]."""
    tb = jnp.full((x.shape[0],), t)
    with attention.use_attention("auto"):  # as the sampler: chunked on CPU, diffusers' einsum elsewhere
        return sd.unet_apply(unet_params, x.astype(sd.dtype), tb, context).astype(jnp.float32)


class _ByIdentity:
    """Hashes a model by identity, so jitted closures can be cached per model (it is not hashable).
    The cache holds the model alive; it keeps the last few (model, config) pairs only."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _ByIdentity) and other.obj is self.obj


@functools.lru_cache(maxsize=16)
def _jitted(kind: str, model: _ByIdentity, **config) -> Callable:
    sd = model.obj
    if kind == "invert":
        return jax.jit(make_ddim_inverter(sd, **config))
    if kind == "sample":
        return jax.jit(make_null_sampler(sd, **config))
    if kind == "nti_step":
        return jax.jit(make_nti_step(sd, **config))
    if kind == "encode":
        return jax.jit(lambda vae_params, images: sd.encode_images(vae_params, images))
    raise ValueError(kind)


def encode_latents(sd, vae_params, images: jax.Array) -> jax.Array:
    """images [B,3,H,W] in [-1,1] -> the latents inversion starts from: posterior mean x scaling, [B,4,h,w]."""
    return _jitted("encode", _ByIdentity(sd))(vae_params, jnp.asarray(images, jnp.float32))


# --- DDIM inversion ---------------------------------------------------------------------------


def make_ddim_inverter(sd, *, num_steps: int = 50) -> Callable:
    """A pure ``invert(unet_params, latents0, context) -> (x_T, trajectory)``; not jitted.

    latents0: clean latents [B,4,h,w]; context: [B,L,D] (the prompt; no guidance, DESIGN §2).
    x_T: [B,4,h,w]; trajectory: [S+1,B,4,h,w] with ``trajectory[0] = latents0`` and
    ``trajectory[k]`` the latent at the k-th smallest DDIM timestep (``trajectory[S] = x_T``).

    Step k goes from abar of the sampler's step target ``t - T/S`` (``alphas_cumprod[0]`` below 0)
    to abar_t, with eps = UNet(x, t, c): the exact inverse of the sampler's step at t whenever eps
    is the same at both ends. That equality is what DDIM inversion assumes; the error it makes is
    eps(x_{t-}) vs eps(x_t), which vanishes as the step size T/S -> 0. One ``lax.scan``.
    """
    ts, a_t, a_prev = _schedule(sd, num_steps)
    xs = (ts[::-1].copy(), a_prev[::-1].copy(), a_t[::-1].copy())  # ascending t: from abar_{t-} to abar_t

    def invert(unet_params: Any, latents0: jax.Array, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        x0 = jnp.asarray(latents0, jnp.float32)
        if context.shape[0] != x0.shape[0]:
            raise ValueError(f"context has batch {context.shape[0]} but latents have batch {x0.shape[0]}.")

        def step(x, per_step):
            t, a_from, a_to = per_step
            x_next = ddim_step(x, _eps(sd, unet_params, x, t, context), a_from, a_to)
            return x_next, x_next

        x_T, path = jax.lax.scan(step, x0, jax.tree.map(jnp.asarray, xs))
        return x_T, jnp.concatenate([x0[None], path], axis=0)

    return invert


def ddim_invert(sd, unet_params, latents0, context, *, num_steps: int = 50) -> tuple[jax.Array, jax.Array]:
    """``make_ddim_inverter`` jitted once per (model, num_steps) and applied: ``(x_T, trajectory)``."""
    return _jitted("invert", _ByIdentity(sd), num_steps=num_steps)(unet_params, latents0, jnp.asarray(context))


# --- guided sampling with per-step nulls (reconstruction, interpolation, editing) --------------


def make_null_sampler(sd, *, num_steps: int = 50, guidance_scale: float = 7.5) -> Callable:
    """A pure ``sample(unet_params, x_T, null_series, source_context, target_context, use_target)
    -> (latents, path)``; not jitted.

    x_T: [B,4,h,w]. null_series: [S,B,L,D], the unconditional embedding of each step (NTI's nulls,
    or one embedding broadcast); ignored (may be None) when ``guidance_scale <= 1``.
    source_context, target_context: [B,L,D]; use_target: bool [S], step i conditions on the target
    where True (prompt-switch editing), on the source elsewhere.
    latents: [B,4,h,w] after the last step; path: [S+1,B,4,h,w], ``path[0] = x_T``, ``path[i+1]``
    after step i.

    Each step is the sampler's (``sampling.make_sampler``): eps = eps_u + g (eps_c - eps_u) from one
    UNet call on the interleaved 2B batch, then ``ddim_step``. The prompt choice is a select on the
    scanned mask, so editing and plain reconstruction are one compiled function. One ``lax.scan``.
    """
    ts, a_t, a_prev = _schedule(sd, num_steps)
    g = float(guidance_scale)
    guided = g > 1.0

    def sample(unet_params, x_T, null_series, source_context, target_context, use_target):
        x_T = jnp.asarray(x_T, jnp.float32)
        use_target = jnp.asarray(use_target, bool)
        if use_target.shape != (num_steps,):
            raise ValueError(f"use_target has shape {use_target.shape}; expected ({num_steps},).")
        nulls = None
        if guided:
            if null_series is None:
                raise ValueError(f"guidance_scale={g} > 1 needs a null_series (or an uncond embedding to broadcast).")
            nulls = jnp.broadcast_to(null_series, (num_steps,) + source_context.shape)

        def step(x, per_step):
            t, at, ap, null, switch = per_step
            ctx = jnp.where(switch, target_context, source_context)
            if guided:
                eps = _eps(sd, unet_params, interleave(x, x), t, interleave(null.astype(ctx.dtype), ctx))
                eps = eps.reshape((x.shape[0], 2) + x.shape[1:])
                eps = eps[:, 0] + g * (eps[:, 1] - eps[:, 0])
            else:
                eps = _eps(sd, unet_params, x, t, ctx)
            x = ddim_step(x, eps, at, ap)
            return x, x

        xs = (jnp.asarray(ts), jnp.asarray(a_t), jnp.asarray(a_prev), nulls, use_target)
        latents, path = jax.lax.scan(step, x_T, xs)
        return latents, jnp.concatenate([x_T[None], path], axis=0)

    return sample


def _run_sampler(sd, unet_params, x_T, null_series, source_context, target_context, use_target, num_steps,
                 guidance_scale, return_path):
    fn = _jitted("sample", _ByIdentity(sd), num_steps=num_steps, guidance_scale=float(guidance_scale))
    if float(guidance_scale) <= 1.0:
        null_series = None  # unused without guidance; None keeps one compile with or without it
    if null_series is not None:
        # Broadcast [S,1,L,D] to [S,B,L,D] outside the jit: one compile for shared and per-sample nulls.
        null_series = jnp.broadcast_to(jnp.asarray(null_series), (num_steps,) + jnp.shape(source_context))
    latents, path = fn(unet_params, x_T, null_series, source_context, target_context, use_target)
    return (latents, path) if return_path else latents


def sample_with_nulls(
    sd, unet_params, x_T, context, null_series, *, guidance_scale: float = 7.5, num_steps: int = 50,
    return_path: bool = False,
):
    """Guided DDIM from x_T [B,4,h,w] with per-step nulls [S,1|B,L,D] (or an uncond [1|B,L,D] for all
    steps) and context [B,L,D] -> latents [B,4,h,w], and with ``return_path`` also the path
    [S+1,B,4,h,w] (``path[0] = x_T``). The NTI reconstruction, and every frame of an interpolation;
    jitted once per (model, num_steps, guidance_scale)."""
    context = jnp.asarray(context)
    if null_series is not None and jnp.ndim(null_series) == 3:
        null_series = jnp.asarray(null_series)[None]
    off = np.zeros(num_steps, bool)
    return _run_sampler(
        sd, unet_params, x_T, null_series, context, context, off, num_steps, guidance_scale, return_path
    )


def reconstruct(
    sd, unet_params, x_T, context, *, num_steps: int = 50, guidance_scale: float = 1.0, null_series=None
) -> jax.Array:
    """DDIM sampling back from an inverted x_T [B,4,h,w]: latents [B,4,h,w].

    ``guidance_scale=1`` (default) is the exact inverse path of ``ddim_invert`` (conditional only,
    no nulls). With guidance > 1 pass ``null_series``: NTI's per-step nulls [S,1|B,L,D], or the ""
    embedding [1|B,L,D] for plain DDIM inversion + CFG (what NTI improves on).
    """
    return sample_with_nulls(
        sd, unet_params, x_T, context, null_series, guidance_scale=guidance_scale, num_steps=num_steps
    )


def edit_switch(num_steps: int, ratio: float) -> np.ndarray:
    """bool [S]: True at the steps that use the target prompt, the last ``S - round((1 - ratio) S)``.

    ratio r = 0 keeps the source prompt throughout (the NTI reconstruction), r = 1 uses the target
    throughout; the paper edits with r in {0.6, 0.7, 0.8, 0.9}. Rounding, not truncation: (1-0.9)*50
    is 4.999... in floating point and means 5 source steps.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio} must be in [0, 1].")
    n_source = int(round((1.0 - ratio) * num_steps))
    return np.arange(num_steps) >= n_source


def edit(
    sd, unet_params, x_T, null_series, source_context, target_context, *,
    ratio: float, num_steps: int = 50, guidance_scale: float = 7.5, return_path: bool = False,
) -> jax.Array:
    """Prompt-switch editing: latents [B,4,h,w] from the inverted x_T [B,4,h,w] and NTI nulls [S,1|B,L,D].

    The first ``round((1 - ratio) S)`` steps condition on ``source_context`` [B,L,D], the rest on
    ``target_context`` [B,L,D] (``edit_switch``). Same compiled function as ``sample_with_nulls``:
    ratio 0 is the NTI reconstruction and ratio 1 full sampling with the target, bit for bit.
    ``return_path`` adds the path [S+1,B,4,h,w] as ``sample_with_nulls``.
    """
    source_context, target_context = jnp.asarray(source_context), jnp.asarray(target_context)
    if source_context.shape != target_context.shape:
        raise ValueError(f"source {source_context.shape} and target {target_context.shape} contexts differ in shape.")
    switch = edit_switch(num_steps, ratio)
    return _run_sampler(
        sd, unet_params, x_T, null_series, source_context, target_context, switch, num_steps, guidance_scale,
        return_path,
    )


def interpolate(
    sd, unet_params, x_T_pair, context_pair, null_series, weights, *, num_steps: int = 50, guidance_scale: float = 7.5
) -> jax.Array:
    """Real-image interpolation: latents [N,4,h,w], one frame per weight in ``weights`` [N].

    x_T_pair: [2,4,h,w], the two inverted noises, slerped (``sampling.slerp``, lerp when nearly
    parallel). context_pair: [2,L,D], linearly mixed with the same weight (constant when both images
    have the same prompt). null_series: the shared nulls of ``null_text_invert_pair``, [S,1,L,D].
    Weights 0 and 1 reproduce the two reconstructions.
    """
    x_T_pair, context_pair = jnp.asarray(x_T_pair), jnp.asarray(context_pair)
    if x_T_pair.shape[0] != 2 or context_pair.shape[0] != 2:
        raise ValueError(f"interpolate needs a pair: x_T {x_T_pair.shape}, context {context_pair.shape}.")
    w = jnp.asarray(weights, jnp.float32)
    x_T = slerp(x_T_pair[:1], x_T_pair[1:], w)[:, 0]  # [N,4,h,w]
    wc = w[:, None, None]
    context = ((1.0 - wc) * context_pair[0] + wc * context_pair[1]).astype(context_pair.dtype)
    return sample_with_nulls(
        sd, unet_params, x_T, context, null_series, guidance_scale=guidance_scale, num_steps=num_steps
    )


# --- null-text inversion ----------------------------------------------------------------------


def nti_learning_rates(num_steps: int, lr: float = NTI_LR) -> np.ndarray:
    """float32 [S]: Adam's lr at sampling step i, ``lr * (1 - i / 100)`` (the authors' schedule)."""
    return (lr * (1.0 - np.arange(num_steps) / 100.0)).astype(np.float32)


def nti_thresholds(
    num_steps: int, early_stop: float = NTI_EARLY_STOP, slope: float = NTI_EARLY_STOP_SLOPE
) -> np.ndarray:
    """float32 [S]: the early-stop loss bound of step i, ``early_stop + i * slope``."""
    return (early_stop + np.arange(num_steps) * slope).astype(np.float32)


def make_nti_step(sd, *, guidance_scale: float = 7.5) -> Callable:
    """A pure ``nti_step(unet_params, x, pivot, null, context, shared, t, alpha_t, alpha_prev, lr,
    threshold, max_inner) -> (null, x_prev, n_inner, loss)``: one NTI timestep; not jitted.

    x: [B,4,h,w] the current latent at timestep t; pivot: [B,4,h,w] the inversion latent one step
    less noisy; null: [B,L,D] the nulls to start from; context: [B,L,D]. shared: bool scalar, False
    for one null per image, True for one null shared by all B images (the dual form for
    interpolation: pass B equal rows, they stay equal). The scalars shared, t (int), alpha_t,
    alpha_prev, lr, threshold (float) and max_inner (int) are traced, so one compile serves every
    timestep, setting and both forms.

    Loss of image b: MSE between ``ddim_step(x, eps_u + s (eps_c - eps_u))`` and the pivot; shared:
    their mean over the batch. Adam (torch defaults) runs from ``null`` until ``max_inner`` steps or
    until the loss, evaluated before an update, is below ``threshold``; as in the authors' loop,
    that step's update is still applied. The UNet treats samples independently, so per-image nulls
    get only their own image's gradient: B images here equal B separate inversions; an image that
    stopped is frozen while the others go on. Returns the optimised nulls [B,L,D], the guided step
    taken with them x_prev [B,4,h,w], the Adam steps taken n_inner int32 [B], and the (mean, if
    shared) loss of that final step [B]. The inner loop is one ``lax.while_loop``.
    """
    s = float(guidance_scale)

    def nti_step(unet_params, x, pivot, null, context, shared, t, alpha_t, alpha_prev, lr, threshold, max_inner):
        x = jnp.asarray(x, jnp.float32)
        pivot = jnp.asarray(pivot, jnp.float32)
        null = jnp.asarray(null, jnp.float32)
        if null.shape != context.shape:
            raise ValueError(f"null {null.shape} and context {context.shape} differ in shape.")
        eps_c = jax.lax.stop_gradient(_eps(sd, unet_params, x, t, context))  # fixed within the timestep

        def guided_step(null):
            eps_u = _eps(sd, unet_params, x, t, null.astype(context.dtype))
            return ddim_step(x, eps_u + s * (eps_c - eps_u), alpha_t, alpha_prev)

        def per_image_loss(null):  # [B]
            return jnp.mean((guided_step(null) - pivot) ** 2, axis=tuple(range(1, x.ndim)))

        def pool(a):  # [B, ...]: shared -> the batch mean in every row
            return jnp.where(shared, jnp.broadcast_to(jnp.mean(a, axis=0), a.shape), a)

        def body(carry):
            null, m, v, n, done = carry
            losses, vjp = jax.vjp(per_image_loss, null)
            (grad,) = vjp(jnp.ones_like(losses))  # row b: d loss_b / d null_b
            losses, grad = pool(losses), pool(grad)  # shared: d mean_b(loss_b) / d null
            active = ~done & (n < max_inner)
            k = (n + 1).astype(jnp.float32)[:, None, None]
            m_new = ADAM_B1 * m + (1 - ADAM_B1) * grad
            v_new = ADAM_B2 * v + (1 - ADAM_B2) * grad**2
            m_hat, v_hat = m_new / (1 - ADAM_B1**k), v_new / (1 - ADAM_B2**k)
            null_new = null - lr * m_hat / (jnp.sqrt(v_hat) + ADAM_EPS)
            keep = active[:, None, None]
            return (
                jnp.where(keep, null_new, null),
                jnp.where(keep, m_new, m),
                jnp.where(keep, v_new, v),
                n + active.astype(n.dtype),
                done | (active & (losses < threshold)),
            )

        def cond(carry):
            _, _, _, n, done = carry
            return jnp.any(~done & (n < max_inner))

        b = x.shape[0]
        zeros = jnp.zeros_like(null)
        init = (null, zeros, zeros, jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))
        null, _, _, n_inner, _ = jax.lax.while_loop(cond, body, init)
        x_prev = guided_step(null)
        return null, x_prev, n_inner, pool(jnp.mean((x_prev - pivot) ** 2, axis=tuple(range(1, x.ndim))))

    return nti_step


class NullTextInversion(NamedTuple):
    """What ``null_text_invert`` returns (numpy-convertible jax arrays).

    x_T: [B,4,h,w] the DDIM-inverted noise, where reconstruction and editing start.
    nulls: [S,G,L,D] optimised null embedding per sampling step (G = B per image, G = 1 shared).
    pivots: [S+1,B,4,h,w] the DDIM-inversion trajectory (``pivots[0]`` the clean latents).
    latents: [S+1,B,4,h,w] NTI's guided path, ``latents[0] = x_T``, ``latents[i+1]`` after step i
      (it tracks ``pivots[S-1-i]``; ``latents[S]`` is the reconstruction).
    inner_steps: int32 [S,G] Adam steps taken per timestep (<= inner_steps; fewer = stopped early).
    losses: [S,G] the MSE to the pivot of the step taken with the optimised null.
    learning_rates: float32 [S] the Adam lr used at each step.
    """

    x_T: jax.Array
    nulls: jax.Array
    pivots: jax.Array
    latents: jax.Array
    inner_steps: jax.Array
    losses: jax.Array
    learning_rates: np.ndarray


def null_text_optimize(
    sd, unet_params, pivots, context, uncond_context, *,
    guidance_scale: float = 7.5, inner_steps: int = NTI_INNER_STEPS, lr: float = NTI_LR,
    early_stop: float = NTI_EARLY_STOP, early_stop_slope: float = NTI_EARLY_STOP_SLOPE, progress: bool = False,
) -> NullTextInversion:
    """NTI along given pivots [S+1,B,4,h,w] (ascending noise, ``pivots[S]`` = x_T); S = num_steps.

    context: [B,L,D]; uncond_context: [G,L,D], the "" embedding the first step starts from, G = B
    (one null series per image) or 1 (one series shared by all images). Each step starts from the
    previous step's optimised null with fresh Adam state, as the authors' code. The timestep loop
    runs in Python over one jitted ``make_nti_step`` (see the module docstring), the same compiled
    function for both forms; ``progress`` shows a tqdm bar.
    """
    pivots = jnp.asarray(pivots, jnp.float32)
    num_steps, b = pivots.shape[0] - 1, pivots.shape[1]
    context = jnp.asarray(context)
    uncond = jnp.asarray(uncond_context, jnp.float32)
    if context.shape[0] != b or context.shape[1:] != uncond.shape[1:] or uncond.shape[0] not in (1, b):
        raise ValueError(
            f"context {context.shape} and uncond_context {uncond.shape} do not fit pivots {pivots.shape}: "
            f"expected [{b},L,D] and [1 or {b},L,D]."
        )
    n_nulls = uncond.shape[0]
    shared = np.bool_(n_nulls == 1 and b > 1)
    null = jnp.broadcast_to(uncond, context.shape)
    step = _jitted("nti_step", _ByIdentity(sd), guidance_scale=float(guidance_scale))
    ts, a_t, a_prev = _schedule(sd, num_steps)
    lrs, thresholds = nti_learning_rates(num_steps, lr), nti_thresholds(num_steps, early_stop, early_stop_slope)

    x = pivots[-1]
    nulls, path, counts, losses = [], [x], [], []
    steps = range(num_steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="null-text inversion", unit="step")
    for i in steps:
        null, x, n, loss = step(
            unet_params, x, pivots[num_steps - 1 - i], null, context, shared,
            ts[i], a_t[i], a_prev[i], lrs[i], thresholds[i], np.int32(inner_steps),
        )
        nulls.append(null[:n_nulls]), path.append(x), counts.append(n[:n_nulls]), losses.append(loss[:n_nulls])
        if progress:  # otherwise the host runs ahead and the bar would show dispatch, not work
            x.block_until_ready()
    return NullTextInversion(
        x_T=pivots[-1], nulls=jnp.stack(nulls), pivots=pivots, latents=jnp.stack(path),
        inner_steps=jnp.stack(counts), losses=jnp.stack(losses), learning_rates=lrs,
    )


def null_text_invert(
    sd, unet_params, latents0, context, uncond_context, *, num_steps: int = 50, guidance_scale: float = 7.5,
    inner_steps: int = NTI_INNER_STEPS, lr: float = NTI_LR, early_stop: float = NTI_EARLY_STOP,
    early_stop_slope: float = NTI_EARLY_STOP_SLOPE, progress: bool = False,
) -> NullTextInversion:
    """DDIM inversion of latents0 [B,4,h,w] (``encode_latents`` of the images) under context [B,L,D],
    then NTI: one null series per image when uncond_context is [B,L,D], one shared when [1,L,D].

    Reconstruct with ``sample_with_nulls(sd, unet_params, inv.x_T, context, inv.nulls)``.
    """
    _, pivots = ddim_invert(sd, unet_params, latents0, context, num_steps=num_steps)
    return null_text_optimize(
        sd, unet_params, pivots, context, uncond_context, guidance_scale=guidance_scale, inner_steps=inner_steps,
        lr=lr, early_stop=early_stop, early_stop_slope=early_stop_slope, progress=progress,
    )


def null_text_invert_pair(sd, unet_params, latents_pair, context, uncond_context, **kwargs) -> NullTextInversion:
    """The dual form for real-image interpolation: two images [2,4,h,w], context [2,L,D] (or [1,L,D]
    for one prompt), one null series [S,1,L,D] optimised for both (loss = MSE over the pair).

    Interpolate with ``interpolate(sd, unet_params, inv.x_T, context_pair, inv.nulls, weights)``.
    Keyword arguments as ``null_text_invert``.
    """
    latents_pair = jnp.asarray(latents_pair)
    if latents_pair.shape[0] != 2:
        raise ValueError(f"null_text_invert_pair needs two images; got latents {latents_pair.shape}.")
    context = jnp.broadcast_to(jnp.asarray(context), (2,) + jnp.shape(context)[1:])
    uncond = jnp.asarray(uncond_context)[:1]
    return null_text_invert(sd, unet_params, latents_pair, context, uncond, **kwargs)
