"""What a training run shows: progress bar, messages, TensorBoard scalars, sample grids.

Only process 0 writes; other processes get a disabled RunLog. Metrics arrive one step late
(the loop fetches step i's metrics after dispatching step i+1), so logging never stalls the device.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm


class RunLog:
    def __init__(self, workdir: Path, config, enabled: bool = True):
        self.enabled = enabled
        self.every = max(1, int(config.log.every))
        self.writer = None
        self.metrics_path = Path(workdir) / "metrics.jsonl"
        if enabled:
            Path(workdir).mkdir(parents=True, exist_ok=True)
        if enabled and config.log.tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(Path(workdir) / "tensorboard"))
            self.writer.add_text("config", "```\n" + str(config) + "\n```", 0)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    @contextlib.contextmanager
    def progress(self, start: int, total: int, enabled: bool = True):
        bar = tqdm(total=total, initial=start, unit="step", desc="train", disable=not enabled, dynamic_ncols=True)
        try:
            yield bar
        finally:
            bar.close()

    def write(self, step: int, metrics: dict, bar=None) -> dict:
        """Fetch ``metrics`` of ``step`` (0-based) to host floats, log them, and stop on non-finite ones."""
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = [k for k, v in host.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"Non-finite {', '.join(bad)} at step {step + 1}: {host}. Training stopped; "
                                     "the last checkpoint is intact.")
        if self.writer is not None and ((step + 1) % self.every == 0 or step == 0):
            for k, v in host.items():
                self.writer.add_scalar(k, v, step + 1)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{host['loss/total']:.4f}", reg=f"{host['loss/reg']:.3g}", a=f"{host['reg/ema_a']:.3g}",
                            refresh=False)
        host["step"] = step + 1
        if self.enabled:  # one JSON line per step: easy to diff between runs and topologies
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(host) + "\n")
        return host

    def image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class SampleWriter:
    """DDIM samples of fixed prompts and noises with the current LoRA, as PNG grids.

    Every process must build one and call ``write`` at the same steps: the render is an SPMD
    program over the whole mesh (the frozen weights may be split across hosts), so a process
    that skipped it would leave the others waiting in its collectives. Only ``save`` processes
    write files.
    """

    def __init__(self, sd, config, workdir: Path, mesh, save: bool = True):
        from smooth_jax import sampling, sharding

        self.sd, self.save = sd, save
        self.dir = Path(workdir) / "samples"
        self.scale = float(config.lora.alpha) / float(config.lora.rank)
        prompts = list(config.log.sample_prompts)
        self.nrow = len(prompts)
        ctx, unc = sampling.encode_prompts(sd, sd.params["text_encoder"], prompts)
        s = sd.configs["unet"]["sample_size"]
        noise = jax.random.normal(jax.random.PRNGKey(int(config.seed) + 3), (len(prompts), sd.latent_channels, s, s))
        # Each process computes the same prompts and noise locally; placed on the mesh they are
        # global arrays that the render can take beside the sharded weights.
        rep = sharding.replicated(mesh)
        self.noise, self.ctx, self.unc = jax.device_put((np.asarray(noise), np.asarray(ctx), np.asarray(unc)), rep)
        sampler = sampling.make_sampler(sd, num_steps=int(config.log.sample_steps), guidance_scale=float(config.log.guidance))

        def render(unet_params, lora_tree, vae_params, noise, ctx, unc):
            # Frozen weights may be stored in bf16; the merge and sampling run in fp32, inside the jit.
            unet_params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), unet_params)
            params = sampling.merged_unet_params(sd, unet_params, lora_tree, self.scale)
            return sd.decode_latents(vae_params, sampler(params, noise, ctx, unc))

        self.render = sharding.SyncedFirstCall(jax.jit(render, out_shardings=rep), "sample render")

    def write(self, step: int, lora_tree, frozen, log: RunLog) -> Path | None:
        """Render the grid of ``step``; returns its PNG path (None where this process does not save)."""
        from smooth_jax import images

        imgs = self.render(frozen["unet"], lora_tree, frozen["vae"], self.noise, self.ctx, self.unc)
        if not self.save:
            return None
        # Replicated output: this process's first shard is the whole batch of images.
        host = np.asarray(imgs.addressable_data(0), np.float32)
        path = images.save_grid(host, self.dir / f"step_{step:07d}.png", nrow=self.nrow)
        log.image("samples", images.make_grid(host, nrow=self.nrow), step)
        return path
