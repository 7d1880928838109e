"""Evaluation metrics of Smooth Diffusion, in JAX.

- ``istd`` / ``adjacent_distances`` / ``istd_from_distances`` (smoothness.py): the paper's ISTD,
  on [0,1] images with the L2 norm over all C*H*W pixels (stated in every result's ``scale``).
- ``mse`` / ``psnr`` / ``ssim`` / ``reconstruction_metrics`` (reconstruction.py): inversion
  fidelity, [0,1] scale, per image.
- ``feature_statistics`` / ``frechet_distance`` / ``fid`` / ``RunningStatistics`` / ``extract``
  (frechet.py): FID's formula; the feature network decides the variant:
  ``InceptionV3Features`` (inception.py, pytorch-fid's weights) -> standard FID;
  ``CLIPImageFeatures`` (clip.py) -> FID_CLIP.
- ``CLIPScorer`` (clip.py): CLIP score, 100 * max(cos, 0), from a local Hugging Face CLIP folder.
- ``LPIPS`` (lpips.py): LPIPS v0.1 with AlexNet/VGG16, from torchvision's and lpips' .pth files.

No metric weights are downloaded; a missing file raises ``MissingWeightsError`` saying what it
is, where to get it and which argument takes it. The network modules are imported lazily.
"""

from smooth_jax.metrics.frechet import (  # noqa: F401
    FeatureExtractor,
    RunningStatistics,
    extract,
    feature_statistics,
    fid,
    frechet_distance,
)
from smooth_jax.metrics.reconstruction import mse, psnr, reconstruction_metrics, ssim  # noqa: F401
from smooth_jax.metrics.smoothness import (  # noqa: F401
    ISTD_SCALE,
    adjacent_distances,
    istd,
    istd_from_distances,
    to_unit_range,
)
from smooth_jax.metrics.weights import MissingWeightsError  # noqa: F401

__all__ = [
    "FeatureExtractor", "RunningStatistics", "extract", "feature_statistics", "fid", "frechet_distance",
    "mse", "psnr", "reconstruction_metrics", "ssim",
    "ISTD_SCALE", "adjacent_distances", "istd", "istd_from_distances", "to_unit_range",
    "MissingWeightsError",
    "CLIPScorer", "CLIPImageFeatures", "clip_score_from_embeddings", "LPIPS", "InceptionV3Features",
]

_LAZY = {
    "CLIPScorer": "clip",
    "CLIPImageFeatures": "clip",
    "clip_score_from_embeddings": "clip",
    "LPIPS": "lpips",
    "InceptionV3Features": "inception",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"smooth_jax.metrics.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'smooth_jax.metrics' has no attribute {name!r}")
