"""The embedded default base model: an SD-architecture latent-diffusion model (autoencoder, UNet,
random CLIP text encoder) trained from scratch on the bundled digits at 16 px. The settings live in
``smooth_jax.base_model.default_config`` so that ``--model digits`` finds the cached model.

    smooth-jax pretrain --config configs/digits_base.py [--config.unet.steps=4000]
"""

from smooth_jax import base_model


def get_config():
    return base_model.default_config()
