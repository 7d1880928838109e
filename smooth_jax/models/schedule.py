"""The DDPM noise schedule of a Stable Diffusion scheduler config."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """betas, alphas_cumprod: [T] float64 numpy arrays (cast where used), T = num_train_timesteps."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    prediction_type: str = "epsilon"
    set_alpha_to_one: bool = False
    steps_offset: int = 1

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_config(cls, config: dict, source: str = "scheduler config") -> "NoiseSchedule":
        kind = config.get("beta_schedule", "linear")
        n = int(config.get("num_train_timesteps", 1000))
        b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        if kind == "scaled_linear":
            # Stable Diffusion's schedule: linear in sqrt(beta).
            betas = np.linspace(b0**0.5, b1**0.5, n, dtype=np.float64) ** 2
        elif kind == "linear":
            betas = np.linspace(b0, b1, n, dtype=np.float64)
        else:
            raise ValueError(f"{source}: beta_schedule {kind!r} is not supported (use 'scaled_linear' or 'linear').")
        prediction = config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(f"{source}: prediction_type {prediction!r} is not supported; SD-1.x uses 'epsilon'.")
        return cls(
            betas=betas,
            alphas_cumprod=np.cumprod(1.0 - betas),
            prediction_type=prediction,
            set_alpha_to_one=bool(config.get("set_alpha_to_one", False)),
            steps_offset=int(config.get("steps_offset", 1)),
        )
