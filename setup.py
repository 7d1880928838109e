"""smooth-jax: Smooth Diffusion (CVPR 2024) LoRA training and evaluation in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup


def _requirements(name: str) -> list[str]:
    lines = (Path(__file__).parent / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("#", "-r"))]


setup(
    name="smooth-jax",
    version="0.1.0",
    description="Smooth Diffusion (CVPR 2024) in JAX/Flax: Jacobian-regularized LoRA for Stable Diffusion",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["smooth_jax", "smooth_jax.*"]),
    install_requires=_requirements("requirements.txt"),
    extras_require={
        # PyTorch-side checks: diffusers' PyTorch pipeline and peft judge our LoRA files.
        "torch": ["torch==2.13.0", "peft==0.21.2"],
        "test": _requirements("requirements-dev.txt"),  # torch, peft, pytest, scikit-image (SSIM reference)
        # smooth-jax plan: ahead-of-time compiles for TPU topologies (libtpu, the version jax[tpu]==0.10.2
        # pins) and GPU target configs (the CUDA plugin without NVIDIA's runtime wheels: compiling needs none).
        "plan": ["libtpu==0.0.42.1", "jax-cuda12-plugin==0.10.2", "jax-cuda12-pjrt==0.10.2"],
    },
    entry_points={"console_scripts": ["smooth-jax=smooth_jax.cli:main"]},
)
