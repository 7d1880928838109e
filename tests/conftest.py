"""Shared fixtures: the tiny model in Flax, and the same weights as a diffusers PyTorch pipeline.

Compile time dominates on CPU, so the fixtures are session-scoped, inits are jitted, the
persistent compilation cache is on, and every test uses the same few input shapes.
"""

from __future__ import annotations

import os

# 8 host devices, so mesh tests can shard over a real 8-device mesh on a CPU. Everything else
# runs on device 0 as usual.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from smooth_jax import runtime  # noqa: E402

runtime.setup()
jax.config.update("jax_default_matmul_precision", "highest")

# One input shape for every UNet test: batch 2, tiny's 16x16 latents, 77 tokens.
BATCH = 2


@pytest.fixture(scope="session")
def tiny_sd():
    """The tiny preset with random params (seed 0)."""
    from smooth_jax.models import from_preset

    return from_preset("tiny", rng=jax.random.PRNGKey(0))


@pytest.fixture(scope="session")
def unet_inputs(tiny_sd):
    """latents [B,4,16,16], timesteps [B], context [B,77,32] as numpy float32."""
    rng = np.random.default_rng(0)
    s = tiny_sd.configs["unet"]["sample_size"]
    latents = rng.standard_normal((BATCH, 4, s, s)).astype(np.float32)
    timesteps = np.array([10, 700], dtype=np.int32)
    context = rng.standard_normal((BATCH, tiny_sd.max_length, tiny_sd.context_dim)).astype(np.float32)
    return latents, timesteps, context


@pytest.fixture(scope="session")
def torch_pipeline_dir(tmp_path_factory):
    """A diffusers-format folder of the tiny preset saved by diffusers' PyTorch classes.

    Every parameter (norm scales and biases included) is perturbed away from its init, so a
    conversion that drops or mis-transposes any tensor changes the outputs.
    """
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from smooth_jax.models import presets
    from smooth_jax.models.tokenizer import load_clip_tokenizer

    cfg = presets.preset("tiny")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{k: v for k, v in cfg["unet"].items() if not k.startswith("_")})
    vae = AutoencoderKL(**{k: v for k, v in cfg["vae"].items() if not k.startswith("_")})
    te_cfg = {k: v for k, v in cfg["text_encoder"].items() if k not in ("architectures", "model_type")}
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        scheduler=DDIMScheduler.from_config(cfg["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = tmp_path_factory.mktemp("tiny_torch_pipeline")
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def torch_pipeline(torch_pipeline_dir):
    """The saved PyTorch pipeline, loaded back (float32, CPU, eval mode)."""
    pytest.importorskip("torch")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(torch_pipeline_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def converted_sd(torch_pipeline_dir):
    """The same pipeline loaded by smooth-jax (PyTorch safetensors converted to Flax)."""
    from smooth_jax.models import from_folder

    return from_folder(torch_pipeline_dir)


@pytest.fixture
def exact_gelu_torch(monkeypatch):
    """Make diffusers' PyTorch GEGLU use tanh-approximate GELU, as diffusers' Flax GEGLU does.

    The Flax port uses ``nn.gelu`` (tanh approximation); PyTorch SD uses exact GELU. The two differ
    by up to ~1e-3 per activation, which the tiny model amplifies to ~3e-4 in outputs of scale ~2.
    With the same GELU on both sides the remaining difference is float32 rounding (~1e-5), so the
    parity tolerance can be tight enough to catch a single mis-converted tensor.
    """
    torch = pytest.importorskip("torch")
    from diffusers.models.activations import GEGLU

    monkeypatch.setattr(GEGLU, "gelu", lambda self, gate: torch.nn.functional.gelu(gate, approximate="tanh"))
