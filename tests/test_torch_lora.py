"""LoRA files travel both ways, with diffusers' PyTorch UNet as the judge.

The base UNet is the tiny preset saved by diffusers' PyTorch classes (conftest) and converted to
Flax. A random LoRA with non-zero ``up`` (so it really changes the output) is exported by
smooth-jax and loaded by diffusers; the PyTorch UNet's output must equal the smooth-jax merged
UNet's. Tolerance: both sides use the same GELU (``exact_gelu_torch``), so what remains is float32
rounding of two differently ordered computations (PyTorch runs the LoRA as a side branch
``x W + s (x A^T) B^T``, we fold it into W): ~1e-6 relative. We allow 2e-5 of the output's scale,
two orders below what one wrong LoRA tensor (or a wrong scale) produces, which the sanity check
against the base output shows.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from smooth_jax import export, lora

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")


def _torch_out(unet, inputs):
    latents, t, ctx = inputs
    with torch.no_grad():
        return unet(torch.from_numpy(latents), torch.from_numpy(t).long(), torch.from_numpy(ctx)).sample.numpy()


def _flax_out(sd, lf, inputs):
    latents, t, ctx = inputs
    params = sd.params["unet"] if lf is None else lora.merge(sd.params["unet"], lf.lora, lf.scale)
    return np.asarray(jax.jit(sd.unet_apply)(params, latents, t, ctx))


def _close(a, b):
    np.testing.assert_allclose(a, b, atol=2e-5 * np.abs(b).max(), rtol=1e-4)


@pytest.fixture(scope="module")
def random_lora(converted_sd):
    spec = lora.LoraSpec(rank=4, alpha=8.0)  # scale 2: a loader that ignores alpha is caught
    tree = lora.random_like(jax.random.PRNGKey(7), lora.init(jax.random.PRNGKey(1), converted_sd.params["unet"], spec), 0.1)
    return export.LoraFile(lora=lora.as_numpy(tree), alpha=spec.alpha, base_model="tiny")


def _fresh_pipeline(torch_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(torch_pipeline_dir, safety_checker=None)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_exported_lora_loads_in_diffusers_load_lora_weights(fmt, torch_pipeline_dir, converted_sd, random_lora,
                                                             unet_inputs, tmp_path, exact_gelu_torch):
    path = export.save(tmp_path / f"lora_{fmt}.safetensors", random_lora, fmt)
    pipe = _fresh_pipeline(torch_pipeline_dir)
    base = _torch_out(pipe.unet, unet_inputs)
    # Offline, diffusers needs the file name passed explicitly (DESIGN.md §3).
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    ours = _flax_out(converted_sd, random_lora, unet_inputs)
    theirs = _torch_out(pipe.unet, unet_inputs)
    assert np.abs(theirs - base).max() > 100 * 2e-5 * np.abs(base).max()  # the LoRA was applied
    _close(ours, theirs)


def test_legacy_lora_loads_with_load_attn_procs(torch_pipeline_dir, converted_sd, random_lora, unet_inputs,
                                                tmp_path, exact_gelu_torch):
    path = export.save(tmp_path / "smooth_lora.safetensors", random_lora, "legacy")
    pipe = _fresh_pipeline(torch_pipeline_dir)
    base = _torch_out(pipe.unet, unet_inputs)
    pipe.unet.load_attn_procs(str(tmp_path), weight_name=path.name)
    theirs = _torch_out(pipe.unet, unet_inputs)
    assert np.abs(theirs - base).max() > 100 * 2e-5 * np.abs(base).max()
    _close(_flax_out(converted_sd, random_lora, unet_inputs), theirs)


def test_converted_legacy_file_loads_with_load_lora_weights(torch_pipeline_dir, converted_sd, random_lora,
                                                            unet_inputs, tmp_path, exact_gelu_torch):
    """The authors' legacy file loads nothing through load_lora_weights (no ``unet.`` prefix);
    `convert --to peft` makes it load, with the same output."""
    legacy = export.save(tmp_path / "legacy.safetensors", random_lora, "legacy")
    export.convert(legacy, tmp_path / "peft.safetensors", "peft")
    pipe = _fresh_pipeline(torch_pipeline_dir)
    pipe.load_lora_weights(str(tmp_path), weight_name="peft.safetensors")
    _close(_flax_out(converted_sd, random_lora, unet_inputs), _torch_out(pipe.unet, unet_inputs))


def test_lora_saved_by_diffusers_imports_into_smooth_jax(torch_pipeline_dir, converted_sd, unet_inputs, tmp_path,
                                                         exact_gelu_torch):
    """The reverse direction: a peft LoRA made and saved by diffusers/peft in PyTorch."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _fresh_pipeline(torch_pipeline_dir)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=2, init_lora_weights="gaussian",
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    pipe.unet.add_adapter(config)
    with torch.no_grad():  # gaussian init leaves lora_B at zero; make it count
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True,
    )
    theirs = _torch_out(pipe.unet, unet_inputs)
    lf = export.read_any(tmp_path / "pytorch_lora_weights.safetensors")
    assert lf.format == "peft" and lf.rank == 4 and lf.alpha == 2
    export.check_against(lf, converted_sd.param_shapes()["unet"], "pytorch_lora_weights.safetensors")
    assert len(lora.modules(lf.lora)) == 32
    _close(_flax_out(converted_sd, lf, unet_inputs), theirs)
