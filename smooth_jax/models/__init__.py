"""Stable Diffusion components in Flax. The only package that touches diffusers'/transformers' Flax classes."""

from smooth_jax.models.loading import (  # noqa: F401
    DEFAULT_HUB_ID,
    ModelLoadError,
    StableDiffusion,
    from_folder,
    from_hub,
    from_preset,
    load,
    load_architecture,
    preset_param_shapes,
)
