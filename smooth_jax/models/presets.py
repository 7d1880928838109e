"""Architecture presets: component configs in the diffusers/transformers config.json schema.

``sd15`` is Stable Diffusion 1.5 exactly (for shapes, parameter counts and compile-only planning:
it has no weights). ``tiny`` is the same family shrunk for CPU tests and the embedded default:
every block type of SD-1.5's UNet (cross-attention down/up blocks, plain blocks, the
cross-attention mid block), the same VAE and CLIP text encoder structure, the real CLIP vocabulary.
``small`` sits between them, for benchmarks: SD-1.5's exact block structure (4 levels, three
cross-attention down/up blocks, 2 layers per block, 8 heads) at a fifth of its widths
(block_out_channels 64/128/256/256), 32x32 latents (256 px images through a 4-level VAE of
widths 32/64/128/128), and a 4-layer CLIP text encoder of width 256 (cross_attention_dim 256).
At batch 1 its train step took 4 s plain and 9 s regularized on a 2-core CPU shared with other
jobs (load ~10; eval/bench/compare_train_step.py).
"""

from __future__ import annotations

import copy

SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

_SD15 = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": 32,
        "use_linear_projection": False,
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "scheduler": SCHEDULER,
}

_TINY = copy.deepcopy(_SD15)
_TINY["unet"].update(
    sample_size=16,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=32,
)
_TINY["vae"].update(
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 64],
    layers_per_block=1,
    sample_size=32,
)
_TINY["text_encoder"].update(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
)

_SMALL = copy.deepcopy(_SD15)
_SMALL["unet"].update(sample_size=32, block_out_channels=[64, 128, 256, 256], cross_attention_dim=256)
_SMALL["vae"].update(block_out_channels=[32, 64, 128, 128], layers_per_block=1, sample_size=256)
_SMALL["text_encoder"].update(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, projection_dim=256
)

PRESETS = {"sd15": _SD15, "tiny": _TINY, "small": _SMALL}


def preset(name: str) -> dict:
    """A deep copy of the component configs of preset ``name`` ('sd15', 'tiny' or 'small')."""
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; known presets: {sorted(PRESETS)}.")
    return copy.deepcopy(PRESETS[name])
