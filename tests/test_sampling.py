"""DDIM + CFG sampler against diffusers' PyTorch pipeline, slerp's closed form, image files.

Two sampler compiles only (guided batch 2, unguided batch 2), both at 10 steps and tiny's 16x16
latents, so the file stays well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from smooth_jax import images, sampling
from smooth_jax.models import presets
from smooth_jax.models.schedule import NoiseSchedule

PROMPTS = ["a red circle on a white square", "a handwritten digit seven"]
STEPS = 10


# --- DDIM schedule ----------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("n", [10, 50])
def test_ddim_timesteps_match_diffusers(n):
    pytest.importorskip("torch")
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(presets.SCHEDULER)
    sched.set_timesteps(n)
    schedule = NoiseSchedule.from_config(presets.SCHEDULER)
    ts = sampling.ddim_timesteps(schedule, n)
    assert ts.dtype == np.int32
    np.testing.assert_array_equal(ts, sched.timesteps.numpy())

    # abar pairs as DDIMScheduler.step reads them, the final step's alphas_cumprod[0] included.
    alpha_t, alpha_prev = sampling.ddim_alphas(schedule, n)
    ratio = sched.config.num_train_timesteps // n
    ref_prev = [
        float(sched.alphas_cumprod[t - ratio]) if t - ratio >= 0 else float(sched.final_alpha_cumprod)
        for t in ts.tolist()
    ]
    np.testing.assert_allclose(alpha_t, sched.alphas_cumprod.numpy()[ts], rtol=1e-6)
    np.testing.assert_allclose(alpha_prev, ref_prev, rtol=1e-6)
    assert alpha_prev[-1] == pytest.approx(schedule.alphas_cumprod[0])


# --- sampler vs diffusers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_inputs(converted_sd):
    """Our prompt embeddings and one fixed initial noise for the parity tests."""
    context, uncond = sampling.encode_prompts(converted_sd, converted_sd.params["text_encoder"], PROMPTS)
    s = converted_sd.configs["unet"]["sample_size"]
    noise = np.random.default_rng(0).standard_normal((len(PROMPTS), converted_sd.latent_channels, s, s))
    return np.array(context), np.array(uncond), noise.astype(np.float32)  # writable: torch.from_numpy


def _torch_latents(pipe, context, uncond, noise, guidance_scale):
    import torch

    with torch.no_grad():
        out = pipe(
            prompt_embeds=torch.from_numpy(context),
            negative_prompt_embeds=torch.from_numpy(uncond),
            latents=torch.from_numpy(noise),
            num_inference_steps=STEPS,
            guidance_scale=guidance_scale,
            eta=0.0,
            output_type="latent",
        )
    return out.images.numpy()


@pytest.mark.torch
@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_sampler_matches_diffusers_pipeline(
    converted_sd, torch_pipeline, exact_gelu_torch, prompt_inputs, guidance_scale
):
    """Our jitted scan sampler == diffusers' StableDiffusionPipeline (DDIM, eta 0) on the same weights.

    Same converted weights, our prompt embeddings fed to both as ``prompt_embeds`` /
    ``negative_prompt_embeds``, the same initial latents (DDIM's init_noise_sigma is 1), 10 steps.
    GELU is the same on both sides (``exact_gelu_torch``), so what remains is float32 rounding
    (different matmul/conv kernels, ~1e-7 relative per op) accumulated over 10 UNet calls and
    amplified by the sampler: CFG multiplies eps_c - eps_u by 7.5, and the early DDIM steps divide
    by sqrt(abar_901) = 0.12. Measured on this CPU: max |diff| / max |ref| = 3.8e-6 with guidance 7.5
    (1.7e-4 absolute on latents up to 45: the random tiny model is far from unit scale) and 1.3e-6
    without. The bound, 1e-4 relative, leaves room for other BLAS builds while the smallest
    scheduler slip is 20x above it: final_alpha_cumprod = 1 instead of alphas_cumprod[0] moves the
    result by 2e-3 relative, guidance 7.0 instead of 7.5 by 1.6e-2.
    """
    context, uncond, noise = prompt_inputs
    sample = jax.jit(sampling.make_sampler(converted_sd, num_steps=STEPS, guidance_scale=guidance_scale))
    ours = np.asarray(sample(converted_sd.params["unet"], noise, context, uncond))
    ref = _torch_latents(torch_pipeline, context, uncond, noise, guidance_scale)

    assert ours.shape == ref.shape == noise.shape
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    print(f"guidance {guidance_scale}: max |ours - diffusers| = {err:.3g}, max |ref| = {scale:.3g}, "
          f"rel {err / scale:.3g}")
    assert err <= 1e-4 * scale
    # The sampler must have done something: the result is far from the noise it started at.
    assert np.abs(ours - noise).max() > 0.1 * scale


def test_sampler_is_one_scan(converted_sd, prompt_inputs):
    """The denoising loop is a single lax.scan holding the only UNet call (no Python loop over steps)."""
    context, uncond, noise = prompt_inputs
    sample = sampling.make_sampler(converted_sd, num_steps=STEPS, guidance_scale=7.5)
    jaxpr = jax.make_jaxpr(sample)(converted_sd.params["unet"], noise, context, uncond).jaxpr
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == STEPS
    assert len(jaxpr.eqns) < 20  # everything else is a few reshapes around the scan
    with pytest.raises(ValueError, match="uncond_context"):
        sample(converted_sd.params["unet"], noise, context)


def test_merged_unet_params_applies_lora(converted_sd):
    from smooth_jax import lora

    fresh = lora.init(jax.random.PRNGKey(0), converted_sd.params["unet"], lora.LoraSpec(rank=4, alpha=4.0))
    tree = lora.random_like(jax.random.PRNGKey(1), fresh)
    base = converted_sd.params["unet"]
    assert sampling.merged_unet_params(converted_sd, base, None) is base
    merged = sampling.merged_unet_params(converted_sd, base, tree, 0.5)
    expected = lora.merge(base, tree, 0.5)
    jax.tree.map(np.testing.assert_array_equal, merged, expected)


# --- slerp ------------------------------------------------------------------------------------


def _unit(x):
    return x / np.linalg.norm(x.reshape(x.shape[0], -1), axis=1).reshape((-1,) + (1,) * (x.ndim - 1))


def test_slerp_endpoints_exact_and_shapes():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    b = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(sampling.slerp(a, b, 0.0)), a)
    np.testing.assert_array_equal(np.asarray(sampling.slerp(a, b, 1.0)), b)
    w = sampling.interpolation_weights(11)
    np.testing.assert_allclose(w, np.arange(11) / 10, atol=1e-7)
    path = np.asarray(jax.jit(sampling.slerp)(a, b, w))
    assert path.shape == (11, 3, 4, 5, 5)
    np.testing.assert_array_equal(path[0], a)
    np.testing.assert_array_equal(path[-1], b)


def test_slerp_follows_the_great_circle():
    """Unit inputs: outputs stay unit-norm and the angle to ``a`` is t * theta (closed form)."""
    rng = np.random.default_rng(1)
    a = _unit(rng.standard_normal((4, 2, 8, 8)))
    b = _unit(rng.standard_normal((4, 2, 8, 8)))
    t = np.linspace(0, 1, 7)
    out = np.asarray(sampling.slerp(a, b, t)).reshape(7, 4, -1)
    fa, fb = a.reshape(4, -1), b.reshape(4, -1)
    theta = np.arccos(np.sum(fa * fb, axis=1))  # [4]
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
    angle_to_a = np.arccos(np.clip(np.einsum("tnd,nd->tn", out, fa), -1, 1))
    np.testing.assert_allclose(angle_to_a, t[:, None] * theta[None], atol=1e-3)
    # And in the plane of a and b: out = cos(t theta) a + sin(t theta) e, e the unit part of b orthogonal to a.
    e = fb - np.sum(fa * fb, axis=1, keepdims=True) * fa
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    closed = np.cos(t[:, None, None] * theta[None, :, None]) * fa + np.sin(t[:, None, None] * theta[None, :, None]) * e
    np.testing.assert_allclose(out, closed, atol=1e-5)


def test_slerp_falls_back_to_lerp_for_parallel_inputs():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((2, 64)).astype(np.float32)
    # Row 0: exactly parallel (cos 1); row 1: nearly parallel (cos > 0.9995); both lerp.
    b = np.stack([2.0 * a[0], a[1] + 1e-3 * rng.standard_normal(64).astype(np.float32)])
    t = np.array([0.0, 0.3, 0.5, 1.0], np.float32)
    out = np.asarray(sampling.slerp(a, b, t))
    assert np.isfinite(out).all()
    lerp = (1 - t)[:, None, None] * a + t[:, None, None] * b
    np.testing.assert_allclose(out, lerp, rtol=1e-6, atol=1e-6)
    # Antiparallel is the lerp branch too (|cos| > threshold), and its gradient is finite.
    for other in (lambda x: -x, lambda x: 2.0 * x, lambda x: 0.0 * x):  # antiparallel, parallel, zero
        grad = jax.grad(lambda x: sampling.slerp(x, other(x), 0.5).sum())(a)
        assert np.isfinite(np.asarray(grad)).all()


# --- image files ------------------------------------------------------------------------------


def test_to_uint8_range_and_layout():
    x = np.array([-1.0, -2.0, 0.0, 1.0, 5.0, 1 / 255.0 - 1.0], np.float32)
    img = np.broadcast_to(x[None, None, None, :], (1, 3, 1, 6)).copy()
    img[:, 1] = -1.0  # green channel off
    out = images.to_uint8(img)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 6, 3)
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 0, 128, 255, 255, 0])
    np.testing.assert_array_equal(out[0, 0, :, 1], 0)


def test_save_grid_pixels_and_atomic(tmp_path):
    from PIL import Image

    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.float32)  # r, g, b, yellow
    h, w = 3, 5
    imgs = np.broadcast_to((colors / 127.5 - 1.0)[:, :, None, None], (4, 3, h, w))  # [-1, 1] NCHW
    path = tmp_path / "new" / "dir" / "grid.png"
    assert images.save_grid(imgs, path, nrow=2) == path
    got = np.asarray(Image.open(path).convert("RGB"))
    assert got.shape == (2 * h, 2 * w, 3)
    for i, c in enumerate(colors.astype(np.uint8)):
        r, q = divmod(i, 2)
        assert (got[r * h : (r + 1) * h, q * w : (q + 1) * w] == c).all(), f"cell {i}"
    # Overwrite in place; no temp file is left in the folder.
    images.save_grid(images.to_uint8(imgs)[:3], path, nrow=3)
    assert np.asarray(Image.open(path).convert("RGB")).shape == (h, 3 * w, 3)
    assert os.listdir(path.parent) == ["grid.png"]


def test_save_gif(tmp_path):
    from PIL import Image

    frames = np.zeros((3, 4, 4, 3), np.uint8)
    for i in range(3):
        frames[i, ..., i] = 255
    path = images.save_gif(frames, tmp_path / "a" / "path.gif", duration_ms=80)
    with Image.open(path) as im:
        assert im.n_frames == 3
        assert im.info["duration"] == 80
        for i in range(3):
            im.seek(i)
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), frames[i])
    assert os.listdir(path.parent) == ["path.gif"]
