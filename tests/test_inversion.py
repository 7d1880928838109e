"""DDIM inversion, null-text inversion (NTI) and prompt-switch editing on the tiny model.

Every run uses 10 DDIM steps (one more inversion/sampling compile at 50 steps for the step-count
test), batch 2 (two digits, or one pair) and tiny's 16x16 latents, so the few compiles are shared.

The test UNet is tiny's random UNet with its output conv scaled by ``EPS_SCALE``. A random UNet is
no denoiser: its eps is as large as its input (std 0.6) and, through its GroupNorms, depends on
``x / |x|``, so on the random VAE's small latents (std 0.1) DDIM inversion is chaotic (measured
reconstruction MSE 7.8, 7.9 and 6.1 at 10, 20 and 50 steps: not even monotone; NTI cannot repair
that). Scaled by 0.01 it is still a nonlinear function of x, t and the prompt, but smooth enough
that inversion works as it does for a trained model: guidance 1 reconstructs to ~1% of the latent
variance, CFG 7.5 breaks that by an order of magnitude, and NTI has something to repair.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smooth_jax import inversion, sampling
from smooth_jax.models import presets
from smooth_jax.models.schedule import NoiseSchedule

STEPS = 10
EPS_SCALE = 0.01
PROMPTS = ["a handwritten digit zero", "a handwritten digit three"]
TARGETS = ["a handwritten digit eight", "a handwritten digit one"]


def _mse(a, b, axis=(1, 2, 3)):
    return np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=axis)


@pytest.fixture(scope="module")
def unet(tiny_sd):
    """tiny's UNet params with conv_out (kernel and bias) scaled by EPS_SCALE (see module docstring)."""
    params = dict(tiny_sd.params["unet"])
    params["conv_out"] = jax.tree.map(lambda a: a * EPS_SCALE, params["conv_out"])
    return params


@pytest.fixture(scope="module")
def digits(tiny_sd):
    """Two real digits (0 and 3) upscaled 8 -> 32 px, their latents, and prompt embeddings."""
    from sklearn.datasets import load_digits

    d = load_digits().images[[0, 3]] / 8.0 - 1.0  # [2, 8, 8] in [-1, 1]
    images = np.repeat(np.repeat(d, 4, axis=1), 4, axis=2)[:, None].repeat(3, axis=1).astype(np.float32)
    latents = inversion.encode_latents(tiny_sd, tiny_sd.params["vae"], images)
    context, uncond = sampling.encode_prompts(tiny_sd, tiny_sd.params["text_encoder"], PROMPTS)
    target, _ = sampling.encode_prompts(tiny_sd, tiny_sd.params["text_encoder"], TARGETS)
    return {"images": images, "latents": latents, "context": context, "uncond": uncond, "target": target}


@pytest.fixture(scope="module")
def inverted(tiny_sd, unet, digits):
    """DDIM inversion at 10 steps: (x_T, pivots)."""
    return inversion.ddim_invert(tiny_sd, unet, digits["latents"], digits["context"], num_steps=STEPS)


@pytest.fixture(scope="module")
def nti(tiny_sd, unet, digits):
    """NTI with one null series per image (uncond [2,L,D]), the authors' settings."""
    return inversion.null_text_invert(
        tiny_sd, unet, digits["latents"], digits["context"], digits["uncond"], num_steps=STEPS, progress=True
    )


@pytest.fixture(scope="module")
def ddim_cfg(tiny_sd, unet, digits, inverted):
    """What NTI improves on: DDIM inversion, then CFG 7.5 sampling with the "" embedding."""
    x_T, _ = inverted
    return inversion.reconstruct(
        tiny_sd, unet, x_T, digits["context"], num_steps=STEPS, guidance_scale=7.5, null_series=digits["uncond"]
    )


# --- DDIM inversion ---------------------------------------------------------------------------


def test_inverse_step_undoes_ddim_step():
    """``ddim_step`` with the alphas swapped inverts it exactly when eps is the same at both ends,
    at every abar pair of a 50-step schedule (float32 rounding, amplified by 1/sqrt(abar) <= 15)."""
    a_t, a_prev = sampling.ddim_alphas(NoiseSchedule.from_config(presets.SCHEDULER), 50)
    a_t, a_prev = (jnp.asarray(a, jnp.float32)[:, None, None, None] for a in (a_t, a_prev))
    rng = np.random.default_rng(0)
    x, eps = (jnp.asarray(rng.standard_normal((50, 4, 8, 8)), jnp.float32) for _ in range(2))
    y = sampling.ddim_step(x, eps, a_t, a_prev)
    back = sampling.ddim_step(y, eps, a_prev, a_t)
    err = float(jnp.abs(back - x).max())
    print(f"max |inverse(step(x)) - x| = {err:.2g}")
    assert err < 2e-6
    assert float(jnp.abs(y - x).max()) > 0.1  # the step did move x


class _XIndependentEps:
    """An ``sd``-like model whose eps ignores x but depends on t and the prompt:
    ``eps = w * (sin(t / 50) + mean(context))``, w a fixed [4,h,w] pattern."""

    dtype = jnp.float32

    def __init__(self):
        self.schedule = NoiseSchedule.from_config(presets.SCHEDULER)

    def unet_apply(self, params, x, t, context):
        scale = jnp.sin(jnp.asarray(t, jnp.float32) / 50.0) + jnp.mean(context, axis=(1, 2))
        return params["w"][None] * scale[:, None, None, None]


def test_inversion_then_reconstruction_exact_when_eps_ignores_x():
    """DDIM inversion assumes eps(x_{t-}, t) == eps(x_t, t); with an eps-model that does not look at x
    that holds exactly, so inversion then guidance-1 sampling returns the latents to float rounding.
    eps depends on t, so a timestep or abar pair misaligned between the two loops would show."""
    sd = _XIndependentEps()
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal((4, 8, 8)), jnp.float32)}
    latents = jnp.asarray(rng.standard_normal((2, 4, 8, 8)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)
    x_T, traj = inversion.ddim_invert(sd, params, latents, context, num_steps=STEPS)
    assert traj.shape == (STEPS + 1, 2, 4, 8, 8)
    np.testing.assert_array_equal(traj[0], latents)
    np.testing.assert_array_equal(traj[-1], x_T)
    rec = inversion.reconstruct(sd, params, x_T, context, num_steps=STEPS)
    err = float(jnp.abs(rec - latents).max())
    print(f"x-independent eps: max |reconstruction - latents| = {err:.2g}")
    assert err < 1e-5
    assert float(jnp.abs(x_T - latents).max()) > 1.0


def test_inversion_error_shrinks_with_more_steps(tiny_sd, unet, digits, inverted):
    """With the real (tiny) UNet, eps(x_{t-}) != eps(x_t): each of the S steps errs by about
    L |x_t - x_{t-}| = O(1/S), so inversion then guidance-1 sampling converges to the latents as the
    step size T/S -> 0. (Not as fast as 1/S: "leading" spacing ends 10 steps at t = 901 and 50 at
    t = 981, and an error at x_T reaches x0 amplified by sqrt(abar_0 / abar_T): 8x vs 15x.)"""
    latents, context = digits["latents"], digits["context"]
    x_T10, _ = inverted
    err10 = _mse(inversion.reconstruct(tiny_sd, unet, x_T10, context, num_steps=STEPS), latents)
    x_T50, _ = inversion.ddim_invert(tiny_sd, unet, latents, context, num_steps=50)
    err50 = _mse(inversion.reconstruct(tiny_sd, unet, x_T50, context, num_steps=50), latents)
    var = float(np.var(np.asarray(latents)))
    print(f"guidance-1 reconstruction MSE: 10 steps {err10}, 50 steps {err50} (latent variance {var:.3g})")
    assert (err10 < 0.05 * var).all()  # inversion works at all with this model
    assert (err50 < 0.6 * err10).all()


@pytest.mark.torch
def test_ddim_inversion_matches_diffusers(converted_sd, torch_pipeline, exact_gelu_torch):
    """Our inversion == a loop over diffusers' ``DDIMInverseScheduler`` (SD-1.5 scheduler config)
    with the same converted weights and the same GELU, every step of the trajectory. What remains is
    float32 rounding of different kernels (the sampler's parity test allows 1e-4 relative)."""
    torch = pytest.importorskip("torch")
    from diffusers import DDIMInverseScheduler

    context, _ = sampling.encode_prompts(converted_sd, converted_sd.params["text_encoder"], PROMPTS)
    context = np.array(context)
    s = converted_sd.configs["unet"]["sample_size"]
    latents = np.random.default_rng(2).standard_normal((2, 4, s, s)).astype(np.float32)
    _, ours = inversion.ddim_invert(converted_sd, converted_sd.params["unet"], latents, context, num_steps=STEPS)

    sched = DDIMInverseScheduler.from_config(torch_pipeline.scheduler.config)
    sched.set_timesteps(STEPS)
    x, ref = torch.from_numpy(latents), [latents]
    with torch.no_grad():
        for t in sched.timesteps:
            eps = torch_pipeline.unet(x, t, encoder_hidden_states=torch.from_numpy(context)).sample
            x = sched.step(eps, t, x).prev_sample
            ref.append(x.numpy())
    ref = np.stack(ref)
    scale, err = np.abs(ref).max(), np.abs(np.asarray(ours) - ref).max()
    print(f"inversion vs DDIMInverseScheduler: max |diff| {err:.3g}, max |ref| {scale:.3g}")
    assert err <= 1e-4 * scale
    assert np.abs(ref[-1] - latents).max() > 0.1 * scale


def test_loops_are_one_scan_and_one_while():
    """Inversion and sampling are one lax.scan over the steps holding the only eps call; an NTI
    timestep is one while_loop. Traced on the x-independent stub: the structure is the model's."""
    sd = _XIndependentEps()
    params = {"w": jnp.ones((4, 8, 8))}
    x, ctx = jnp.ones((2, 4, 8, 8)), jnp.ones((2, 3, 5))
    inv = jax.make_jaxpr(inversion.make_ddim_inverter(sd, num_steps=STEPS))(params, x, ctx).jaxpr
    sample = inversion.make_null_sampler(sd, num_steps=STEPS, guidance_scale=7.5)
    nulls = jnp.zeros((STEPS,) + ctx.shape)
    smp = jax.make_jaxpr(sample)(params, x, nulls, ctx, ctx, np.zeros(STEPS, bool)).jaxpr
    for jaxpr in (inv, smp):
        scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        assert len(scans) == 1 and scans[0].params["length"] == STEPS
        assert len(jaxpr.eqns) < 20  # the rest is a few reshapes around the scan
    step = inversion.make_nti_step(sd, guidance_scale=7.5)
    jaxpr = jax.make_jaxpr(step)(params, x, x, ctx, ctx, True, 1, 0.5, 0.6, 1e-2, 1e-5, 10).jaxpr
    assert [e.primitive.name for e in jaxpr.eqns].count("while") == 1


# --- null-text inversion ----------------------------------------------------------------------


def test_nti_beats_ddim_inversion_with_cfg(tiny_sd, unet, digits, inverted, nti, ddim_cfg):
    """NTI's per-step nulls bring CFG-7.5 sampling from x_T back to the image, where plain DDIM
    inversion + CFG drifts: lower MSE in latent space and after decoding (measured against the
    VAE-only reconstruction, the bound the paper compares to; the random VAE itself is far from the
    digits)."""
    latents = digits["latents"]
    np.testing.assert_array_equal(nti.pivots, inverted[1])
    np.testing.assert_array_equal(nti.x_T, inverted[0])
    assert nti.nulls.shape == (STEPS, 2) + digits["uncond"].shape[1:]
    rec = inversion.sample_with_nulls(tiny_sd, unet, nti.x_T, digits["context"], nti.nulls, num_steps=STEPS)
    # The sampler replays NTI's own path (same steps, one 2B UNet batch instead of two B batches).
    np.testing.assert_allclose(rec, nti.latents[-1], rtol=0, atol=1e-5 * float(jnp.abs(rec).max()))

    lat_ddim, lat_nti = _mse(ddim_cfg, latents), _mse(rec, latents)
    decode = jax.jit(tiny_sd.decode_latents)
    vae = tiny_sd.params["vae"]
    vae_only = decode(vae, latents)
    pix_ddim, pix_nti = _mse(decode(vae, ddim_cfg), vae_only), _mse(decode(vae, rec), vae_only)
    print(f"latent MSE: DDIM+CFG {lat_ddim}, NTI {lat_nti}; decoded MSE vs VAE-only: DDIM+CFG {pix_ddim}, "
          f"NTI {pix_nti}; NTI inner steps per timestep {np.asarray(nti.inner_steps).T.tolist()}")
    assert (lat_nti < 0.5 * lat_ddim).all()
    assert (pix_nti < 0.6 * pix_ddim).all()
    # Each step's NTI loss is the MSE to the pivot it reached: it tracks the inversion path.
    for i in range(STEPS):
        np.testing.assert_allclose(nti.losses[i], _mse(nti.latents[i + 1], inverted[1][STEPS - 1 - i]), rtol=1e-4)


def test_nti_inner_steps_stop_early_and_are_capped(tiny_sd, unet, digits, nti):
    """Inner Adam steps never exceed the cap, and stop after one when the loss starts below
    ``1e-5 + i 2e-5``: pivots taken from CFG sampling with the "" embedding itself have loss ~0 at
    every step, so each step takes exactly one update (the authors apply it before breaking)."""
    counts = np.asarray(nti.inner_steps)
    assert counts.dtype == np.int32 and counts.shape == (STEPS, 2)
    assert ((counts >= 1) & (counts <= inversion.NTI_INNER_STEPS)).all()
    assert counts.min() < inversion.NTI_INNER_STEPS  # early stop happened on the real pivots

    context, uncond = digits["context"], digits["uncond"]
    _, path = inversion.sample_with_nulls(
        tiny_sd, unet, nti.x_T, context, uncond, num_steps=STEPS, return_path=True
    )
    on_path = inversion.null_text_optimize(tiny_sd, unet, path[::-1], context, uncond)
    print(f"losses on the CFG path: {np.asarray(on_path.losses).max():.2g}")
    np.testing.assert_array_equal(on_path.inner_steps, 1)
    assert float(np.asarray(on_path.losses).max()) < inversion.NTI_EARLY_STOP


def test_nti_learning_rate_schedule(tiny_sd, digits, inverted):
    """Adam's lr at step i is 1e-2 (1 - i/100). Independent check: Adam's first update moves every
    coordinate by lr |g| / (|g| + 1e-8), i.e. by lr wherever |g| >> 1e-8, so with one inner step the
    largest change of the null at step i must be lr_i. Run with the unscaled UNet, whose gradients
    are large enough for that (with eps scaled by 0.01 the largest |g| is ~1e-6: 1% short of lr)."""
    lrs = inversion.nti_learning_rates(STEPS)
    np.testing.assert_allclose(lrs, 1e-2 * (1 - np.arange(STEPS) / 100), rtol=1e-6)
    np.testing.assert_allclose(inversion.nti_thresholds(STEPS), 1e-5 + 2e-5 * np.arange(STEPS), rtol=1e-6)
    one = inversion.null_text_optimize(
        tiny_sd, tiny_sd.params["unet"], inverted[1], digits["context"], digits["uncond"], inner_steps=1
    )
    np.testing.assert_array_equal(one.inner_steps, 1)
    np.testing.assert_array_equal(one.learning_rates, lrs)
    nulls = np.concatenate([np.asarray(digits["uncond"])[None], np.asarray(one.nulls)])
    moved = np.abs(np.diff(nulls, axis=0)).max(axis=(2, 3))  # [S, B]
    np.testing.assert_allclose(moved, np.broadcast_to(lrs[:, None], moved.shape), rtol=1e-4)


def test_dual_nti_shares_one_series_for_both_images(tiny_sd, unet, digits, inverted, ddim_cfg):
    """One null series [S,1,L,D] optimised on the pair's mean loss reconstructs both images better
    than DDIM inversion + CFG; interpolating its x_T pair renders with the same nulls, and the end
    frames are the two reconstructions."""
    latents, context = digits["latents"], digits["context"]
    pair = inversion.null_text_invert_pair(tiny_sd, unet, latents, context, digits["uncond"][:1], num_steps=STEPS)
    assert pair.nulls.shape == (STEPS, 1) + context.shape[1:]
    assert pair.inner_steps.shape == (STEPS, 1)
    rec = inversion.sample_with_nulls(tiny_sd, unet, pair.x_T, context, pair.nulls, num_steps=STEPS)
    lat_ddim, lat_pair = _mse(ddim_cfg, latents), _mse(rec, latents)
    print(f"latent MSE: DDIM+CFG {lat_ddim}, shared-null NTI {lat_pair}; "
          f"inner steps {np.asarray(pair.inner_steps)[:, 0].tolist()}")
    assert (lat_pair < 0.6 * lat_ddim).all()
    np.testing.assert_allclose(pair.losses[:, 0], _mse(pair.latents[1:], pair.pivots[-2::-1], axis=(1, 2, 3, 4)),
                               rtol=1e-4)

    frames = inversion.interpolate(tiny_sd, unet, pair.x_T, context, pair.nulls, [0.5, 1.0], num_steps=STEPS)
    np.testing.assert_array_equal(frames[1], rec[1])  # weight 1: image 1's x_T and prompt, same function
    mid = np.asarray(frames[0])
    assert np.isfinite(mid).all()
    assert min(_mse(mid[None], rec[:1])[0], _mse(mid[None], rec[1:])[0]) > 0.1 * float(lat_pair.max())


# --- editing ----------------------------------------------------------------------------------


def test_edit_switches_prompt_after_the_source_steps(tiny_sd, unet, digits, nti):
    """r = 0 is the NTI reconstruction and r = 1 sampling with the target prompt, bit for bit (one
    compiled function). r = 0.7 follows the source path for the first round(0.3 S) = 3 steps exactly,
    then leaves it, and ends away from both."""
    np.testing.assert_array_equal(inversion.edit_switch(10, 0.7), [False] * 3 + [True] * 7)
    assert [int((~inversion.edit_switch(50, r)).sum()) for r in (0.6, 0.7, 0.8, 0.9)] == [20, 15, 10, 5]
    assert not inversion.edit_switch(STEPS, 0.0).any() and inversion.edit_switch(STEPS, 1.0).all()

    src, tgt = digits["context"], digits["target"]
    kw = dict(num_steps=STEPS, return_path=True)
    rec, rec_path = inversion.sample_with_nulls(tiny_sd, unet, nti.x_T, src, nti.nulls, **kw)
    full, _ = inversion.sample_with_nulls(tiny_sd, unet, nti.x_T, tgt, nti.nulls, **kw)
    def edit(ratio, **kwargs):
        return inversion.edit(tiny_sd, unet, nti.x_T, nti.nulls, src, tgt, ratio=ratio, num_steps=STEPS, **kwargs)

    np.testing.assert_array_equal(edit(0.0), rec)
    np.testing.assert_array_equal(edit(1.0), full)
    mid, mid_path = edit(0.7, return_path=True)
    np.testing.assert_array_equal(mid_path[:4], rec_path[:4])
    assert (_mse(mid_path[4], rec_path[4]) > 0).all()
    gap = _mse(rec, full)
    print(f"edit r=0.7: MSE to reconstruction {_mse(mid, rec)}, to full target sampling {_mse(mid, full)}; "
          f"reconstruction vs full target {gap}")
    assert (_mse(mid, rec) > 1e-3 * gap).all() and (_mse(mid, full) > 1e-3 * gap).all()
