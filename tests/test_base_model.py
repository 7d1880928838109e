"""The embedded default's base model: training mechanics, the cached folder, loading it back in
JAX and in diffusers' PyTorch pipeline."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smooth_jax import base_model
from smooth_jax.models import loading

SMALL = {"autoencoder.steps": 3, "autoencoder.batch_size": 8, "unet.steps": 3, "unet.batch_size": 8,
         "unet.warmup_steps": 1}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A base model trained for 3 + 3 steps into a private cache (the mechanics, not the quality)."""
    root = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("SMOOTH_JAX_CACHE", str(root))
    cfg = base_model.with_overrides(base_model.default_config(), SMALL)
    folder = base_model.build(cfg, progress=False)
    yield cfg, folder
    mp.undo()


def test_architecture_is_the_sd_family_at_16px():
    c = base_model.architecture(base_model.default_config())
    assert c["unet"]["sample_size"] == 8 and c["vae"]["sample_size"] == 16
    assert c["unet"]["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert c["unet"]["cross_attention_dim"] == c["text_encoder"]["hidden_size"]
    bad = base_model.with_overrides(base_model.default_config(), {"resolution": 10})
    with pytest.raises(ValueError, match="resolution=10"):
        base_model.architecture(bad)


def test_unet_batch_statistics_match_their_definition():
    """Caption dropout rate, posterior sampling and scaling, checked on a large batch against the
    closed forms they should follow."""
    n, k = 5, 3
    rng = np.random.default_rng(0)
    data = {"mean": jnp.asarray(rng.standard_normal((n, 4, 2, 2)), jnp.float32),
            "std": jnp.full((n, 4, 2, 2), 0.5, jnp.float32),
            "labels": jnp.arange(n) % k,
            "contexts": jnp.asarray(np.arange(k + 1, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32))}
    bs = 40_000
    x0, ctx, t, eps = jax.jit(base_model.unet_batch, static_argnums=(2, 3, 4, 5))(
        data, jax.random.PRNGKey(0), bs, 0.1, 2.0, 1000)
    which = np.asarray(ctx[:, 0, 0]).astype(int)
    assert abs(np.mean(which == k) - 0.1) < 0.01  # the empty prompt's row is the last one
    assert 0 <= int(t.min()) and int(t.max()) == 999 and abs(float(t.mean()) - 499.5) < 10
    assert abs(float(eps.std()) - 1.0) < 0.01
    # x0 = (mean + 0.5 z) * 2: per image, E = 2 mean and std = 1.
    assert abs(float(x0.std()) - np.sqrt(4 * np.var(np.asarray(data["mean"])) + 1.0)) < 0.05


def test_unet_step_loss_is_the_epsilon_mse(built):
    """The step's loss equals ||eps - eps_theta(x_t)||^2 recomputed with numpy noising."""
    cfg, folder = built
    sd = loading.from_folder(folder)
    bs = 4
    cfg = base_model.with_overrides(cfg, {"unet.batch_size": bs})
    _, step = base_model.make_unet_step(sd, cfg)
    rng = np.random.default_rng(1)
    h = sd.configs["unet"]["sample_size"]
    data = {"mean": jnp.asarray(rng.standard_normal((6, 4, h, h)), jnp.float32),
            "std": jnp.asarray(rng.uniform(0.1, 0.3, (6, 4, h, h)), jnp.float32),
            "labels": jnp.arange(6) % 2,
            "contexts": jnp.asarray(rng.standard_normal((3, sd.max_length, sd.context_dim)), jnp.float32)}
    tx, _ = base_model.make_unet_step(sd, cfg)
    p = sd.params["unet"]
    state = {"params": p, "ema": p, "opt": tx.init(p), "step": jnp.zeros((), jnp.int32)}
    key = jax.random.PRNGKey(3)
    _, metrics = jax.jit(step)(state, data, key)
    x0, ctx, t, eps = base_model.unet_batch(data, key, bs, float(cfg.unet.p_uncond), sd.latent_scaling, 1000)
    abar = np.asarray(sd.schedule.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]
    x_t = np.sqrt(abar) * np.asarray(x0, np.float64) + np.sqrt(1 - abar) * np.asarray(eps, np.float64)
    pred = np.asarray(sd.unet_apply(p, jnp.asarray(x_t, jnp.float32), t, ctx), np.float64)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean((np.asarray(eps) - pred) ** 2), rtol=1e-5)


def test_folder_is_cached_complete_and_loads_back(built, monkeypatch):
    cfg, folder = built
    assert folder == base_model.cached_folder(cfg) and base_model.is_complete(folder)
    prov = base_model.read_provenance(folder)
    assert prov["config"]["unet"]["steps"] == 3 and prov["trained"]["num_images"] == 1797
    # A second build is the cache: no training.
    monkeypatch.setattr(base_model, "train", lambda *a, **k: pytest.fail("trained again"))
    assert base_model.build(cfg, progress=False) == folder
    # A changed config is another model.
    assert base_model.cached_folder(base_model.with_overrides(cfg, {"unet.lr": 1e-4})) != folder
    sd = loading.load(str(folder))
    # The saved latent scale makes the latents of the data unit-variance (its definition).
    images, _, _ = base_model.digit_data(16)
    lat = np.asarray(jax.jit(sd.encode_images)(sd.params["vae"], jnp.asarray(images)))
    assert abs(float(lat.std()) - 1.0) < 1e-3
    assert sd.default_image_size() == 16 and sd.configs["vae"]["scaling_factor"] == prov["trained"]["autoencoder"]["scaling_factor"]


def test_digits_source_names_the_command_when_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOOTH_JAX_CACHE", str(tmp_path))
    with pytest.raises(loading.ModelLoadError, match="smooth-jax pretrain"):
        loading.load("digits")
    arch = loading.load_architecture("digits")  # the architecture needs no training
    assert arch.params is None and arch.configs["unet"]["sample_size"] == 8


@pytest.mark.torch
def test_diffusers_pytorch_pipeline_reads_the_folder(built, exact_gelu_torch):
    """StableDiffusionPipeline.from_pretrained(folder) computes what the Flax model computes."""
    import torch
    from diffusers import StableDiffusionPipeline

    _, folder = built
    sd = loading.load(str(folder))
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    assert pipe.vae.config.scaling_factor == pytest.approx(sd.latent_scaling)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([20, 800])
    ids = pipe.tokenizer(["a handwritten digit two", ""], padding="max_length", max_length=77, return_tensors="np").input_ids
    ctx = np.asarray(sd.encode_text(sd.params["text_encoder"], ids))
    with torch.no_grad():
        ctx_t = pipe.text_encoder(torch.from_numpy(ids))[0].numpy()
        eps_t = pipe.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(np.array(ctx))).sample.numpy()
        img_t = pipe.vae.decode(torch.from_numpy(x) / pipe.vae.config.scaling_factor).sample.numpy()
    np.testing.assert_allclose(ctx, ctx_t, atol=1e-4)
    eps = np.asarray(sd.unet_apply(sd.params["unet"], x, t, ctx))
    np.testing.assert_allclose(eps, eps_t, atol=1e-4 * np.abs(eps).max())
    img = np.asarray(sd.decode_latents(sd.params["vae"], x))
    np.testing.assert_allclose(img, img_t, atol=1e-4 * np.abs(img).max())
