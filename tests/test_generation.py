"""Text-to-image rendering sharded over the 8 test devices, interpolation strips, and the
`sample` / `interpolate` commands."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from smooth_jax import cli, export, images, lora, sampling
from smooth_jax.generation import Generator

STEPS = 5


@pytest.fixture(scope="module")
def gen(tiny_sd):
    return Generator(tiny_sd, None, num_steps=STEPS, guidance_scale=3.0)


def test_sharded_render_equals_unsharded_sampler(tiny_sd, gen):
    assert gen.mesh.devices.size == jax.device_count() == 8
    noise = gen.noise([3, 4, 5])
    ctx, unc = gen.text(["a handwritten digit one"] * 3)
    got = gen.render(noise, ctx, unc)  # padded to a chunk of 8, split over 8 devices
    sampler = sampling.make_sampler(tiny_sd, num_steps=STEPS, guidance_scale=3.0)
    ref = jax.jit(lambda n, c, u: tiny_sd.decode_latents(tiny_sd.params["vae"], sampler(tiny_sd.params["unet"], n, c, u)))(noise, ctx, unc)
    assert got.shape == (3, 3, 32, 32)
    np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-4, atol=1e-5)


def test_interpolation_strip_endpoints_and_slerp(gen):
    frames = gen.interpolation("a handwritten digit two", "a handwritten digit two", 3, 4, frames=5)
    assert frames.shape == (5, 3, 32, 32)
    ctx, unc = gen.text(["a handwritten digit two"] * 2)
    ends = gen.render(gen.noise([3, 4]), ctx, unc)
    np.testing.assert_allclose(frames[[0, -1]], ends, rtol=1e-4, atol=1e-5)
    assert np.abs(frames[2] - frames[0]).max() > 1e-3  # the middle is not an endpoint


def test_sample_and_interpolate_commands_with_a_lora(tmp_path, tiny_sd):
    spec = lora.LoraSpec(rank=4, alpha=4)
    tree = lora.random_like(jax.random.PRNGKey(0), lora.init(jax.random.PRNGKey(1), tiny_sd.params["unet"], spec), 0.2)
    lora_path = export.save(tmp_path / "smooth.safetensors", export.LoraFile(lora=lora.as_numpy(tree), alpha=4.0), "kohya")
    common = ["--model", "tiny", "--lora", str(lora_path), "--prompt", "a handwritten digit five", "--steps", str(STEPS),
              "--guidance", "3"]
    assert cli.main(["sample", *common, "--num", "2", "--out", str(tmp_path / "s.png")]) == 0
    grid = np.asarray(Image.open(tmp_path / "s.png"))
    assert grid.shape == (2 * 32, 2 * 32, 3)  # rows: base, LoRA; 2 seeds each
    assert np.abs(grid[:32].astype(int) - grid[32:].astype(int)).max() > 0  # the LoRA changes the images
    assert cli.main(["interpolate", *common, "--frames", "4", "--seed2", "9", "--out", str(tmp_path / "i.png"),
                     "--gif", str(tmp_path / "i.gif")]) == 0
    assert np.asarray(Image.open(tmp_path / "i.png")).shape == (2 * 32, 4 * 32, 3)
    gif = Image.open(tmp_path / "i_smooth.gif")
    assert gif.n_frames == 6  # there and back, ends not repeated
    assert (tmp_path / "i_base.gif").exists()


def test_sample_command_takes_per_sample_noise(tmp_path, gen):
    noise = gen.noise([11, 12])
    np.save(tmp_path / "x_T.npy", noise)
    assert cli.main(["sample", "--model", "tiny", "--prompt", "a handwritten digit one", "--steps", str(STEPS),
                     "--guidance", "3", "--noise", str(tmp_path / "x_T.npy"), "--out", str(tmp_path / "n.png")]) == 0
    ctx, unc = gen.text(["a handwritten digit one"] * 2)
    tiles = images.to_uint8(gen.render(noise, ctx, unc))  # [2, H, W, 3]
    want = np.concatenate(list(tiles), axis=1)  # the grid: one row of two
    assert np.array_equal(np.asarray(Image.open(tmp_path / "n.png")), want)
    np.save(tmp_path / "bad.npy", noise[:, :2])
    assert cli.main(["sample", "--model", "tiny", "--prompt", "x", "--noise", str(tmp_path / "bad.npy"),
                     "--out", str(tmp_path / "b.png")]) == 2
