"""A loaded model plus an optional LoRA, with jitted, batch-sharded text-to-image rendering.

``Generator`` is what the ``sample`` and ``interpolate`` commands and the ISTD evaluation use:
prompts -> text states once, seeds -> noises, and ``render`` = DDIM + CFG + VAE decode in one jit
whose batch axis is split over every device (a mesh over the data axis).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from smooth_jax import export, lora, sampling, sharding


def load_lora_file(path: str, unet_params: Any) -> export.LoraFile:
    """A LoRA in any format (peft, legacy, kohya, smooth-jax .msgpack), checked against the UNet."""
    lf = export.read_any(path, module_names=lora.flatten(unet_params).keys())
    export.check_against(lf, unet_params, path)
    return lf


def merged_unet(unet_params: Any, lora_file: export.LoraFile | None) -> Any:
    """UNet params with the LoRA folded in once (jitted ``lora.merge``); the base params for None."""
    if lora_file is None:
        return unet_params
    return jax.jit(lora.merge, static_argnums=2)(unet_params, lora_file.lora, lora_file.scale)


class Generator:
    """sd: a loaded StableDiffusion; lora_file: an ``export.LoraFile`` or None (the base model)."""

    def __init__(self, sd, lora_file: export.LoraFile | None = None, *, num_steps: int = 50,
                 guidance_scale: float = 7.5):
        self.sd = sd
        self.lora = lora_file
        self.num_steps, self.guidance_scale = int(num_steps), float(guidance_scale)
        # Merged once, outside the sampler: every render reuses the merged kernels.
        self.unet_params = merged_unet(sd.params["unet"], lora_file)
        self.mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
        sampler = sampling.make_sampler(sd, num_steps=self.num_steps, guidance_scale=self.guidance_scale)

        def render(unet_params, vae_params, noise, ctx, unc):
            return sd.decode_latents(vae_params, sampler(unet_params, noise, ctx, unc))

        rep, batch = sharding.replicated(self.mesh), sharding.batch_sharding(self.mesh)
        self._render = jax.jit(render, in_shardings=(rep, rep, batch, batch, batch), out_shardings=batch)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.sd.configs["unet"]["sample_size"]
        return (self.sd.latent_channels, s, s)

    def noise(self, seeds: Sequence[int]) -> np.ndarray:
        """One x_T per seed: [len(seeds), 4, h, w] float32 (the same for every model)."""
        return np.stack([np.asarray(jax.random.normal(jax.random.PRNGKey(int(s)), self.latent_shape)) for s in seeds])

    def text(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] = "") -> tuple[np.ndarray, np.ndarray]:
        ctx, unc = sampling.encode_prompts(self.sd, self.sd.params["text_encoder"], list(prompts), negative_prompt)
        return np.asarray(ctx), np.asarray(unc)

    def render(self, noise: np.ndarray, ctx: np.ndarray, unc: np.ndarray, chunk: int = 0) -> np.ndarray:
        """noise [B,4,h,w], ctx/unc [B,77,D] -> images [B,3,H,W] in [-1,1], in chunks of ``chunk``
        (default: a multiple of the device count) padded to the mesh so every shape compiles once."""
        n_dev = self.mesh.devices.size
        chunk = -(-(chunk or 8) // n_dev) * n_dev
        out = []
        for start in range(0, noise.shape[0], chunk):
            parts = [noise[start:start + chunk], ctx[start:start + chunk], unc[start:start + chunk]]
            real = parts[0].shape[0]
            if real < chunk:  # pad, so the last chunk reuses the compiled shape
                parts = [np.concatenate([p, np.repeat(p[-1:], chunk - real, axis=0)]) for p in parts]
            imgs = self._render(self.unet_params, self.sd.params["vae"], *[jnp.asarray(p) for p in parts])
            out.append(np.asarray(imgs)[:real])
        return np.concatenate(out)

    def interpolation(self, prompt_a: str, prompt_b: str, seed_a: int, seed_b: int, frames: int,
                      negative_prompt: str = "") -> np.ndarray:
        """Frames [F,3,H,W]: noises slerped, text states linearly mixed (equal prompts: fixed)."""
        w = sampling.interpolation_weights(frames)
        na, nb = self.noise([seed_a, seed_b])
        noises = np.asarray(sampling.slerp(na[None], nb[None], w))[:, 0]
        ctx, unc = self.text([prompt_a, prompt_b], negative_prompt)
        ctxs = (1 - w)[:, None, None] * ctx[0] + w[:, None, None] * ctx[1]
        uncs = np.repeat(unc[:1], frames, axis=0)
        return self.render(noises, ctxs.astype(np.float32), uncs)
