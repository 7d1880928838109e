"""The paper's setting (Smooth Diffusion, CVPR 2024, §4 and the authors' code; DESIGN.md §1-§2).

SD-1.5, rank-8 LoRA on to_q/to_k/to_v/to_out.0 of all 32 attentions, lambda = 1, EMA decay 0.01,
AdamW lr 1e-4 constant, batch 96 (as 12 x 8 accumulation), 30K steps, 512 px, LAION Aesthetics 6.5+.

    smooth-jax train --config configs/sd15_smooth_lora.py --workdir runs/sd15 \\
        --config.model=/data/stable-diffusion-v1-5 \\
        --config.data.source=folder --config.data.path=/data/laion_aesthetics_6.5
    # or TFDS: --config.data.source=tfds --config.data.tfds_name=NAME --config.data.path=/data/tfds
"""

import ml_collections

from smooth_jax.data import default_data_config
from smooth_jax.lora import DEFAULT_TARGETS


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # preset, diffusers folder or hub id
    c.seed = 0

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 8
    c.lora.alpha = 8.0  # scale = alpha / rank = 1, as the authors
    c.lora.targets = tuple(DEFAULT_TARGETS)
    c.lora.init_from = ""  # a LoRA file to start from (any format); "" = fresh
    # How the step applies each LoRA module (same values): "factored" x W + s (x down) up, a cheap LoRA
    # gradient for wide layers; "merged" (W + s down up); "auto" picks the cheaper per module (lora.split_forms)
    c.lora.train_form = "auto"

    c.objective = ml_collections.ConfigDict()
    c.objective.reg_weight = 1.0  # lambda
    c.objective.ema_decay = 0.01
    c.objective.reg_every = 1  # lazy regularization: every k steps with lambda * k; 1 = every step (the paper)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 30_000
    c.train.batch_size = 96  # global, per optimizer step
    c.train.grad_accum = 8  # micro-batches per step (the authors: 3 per GPU x 4 GPUs x 8)
    c.train.lr = 1e-4
    c.train.warmup_steps = 0
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.weight_decay = 1e-2  # the authors' code; the paper says 1e-4
    c.train.grad_clip = 1.0
    c.train.compute_dtype = "float32"  # "bfloat16" halves activation memory; LoRA params stay fp32
    c.train.frozen_dtype = "float32"  # storage of the frozen base weights
    c.train.remat = "none"  # "none" | "full" | "dots": jax.checkpoint policy around each UNet block (smooth_jax/remat.py)
    # "chunked": attention per head and block of queries, each block recomputed in the backward pass
    # (smooth_jax/attention.py); "xla": diffusers' einsum over the full score matrix; "auto": chunked on
    # CPU (faster there), xla on TPU/GPU (less memory there: see attention.resolve)
    c.train.attention = "auto"
    c.train.attention_chunk = 1024  # queries per block
    c.train.latents = "sample"  # VAE posterior "sample" (diffusers' scripts) or "mean"

    c.data = default_data_config()
    c.data.source = "folder"
    c.data.resolution = 512
    c.data.host_slicing = False  # True: every host reads the global batch and keeps its slice

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = {"data": -1, "fsdp": 1}
    c.mesh.num_devices = 0  # 0 = every device of every process
    # (regex over 'unet/...', 'vae/...', 'text_encoder/...' paths, 'replicate' | 'fsdp'); first match wins.
    c.mesh.rules = (("unet/.*", "replicate"), (".*", "replicate"))

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.every = 50
    c.log.tensorboard = True
    c.log.sample_every = 1000  # 0 = no sample grids
    c.log.sample_prompts = (
        "a photo of an astronaut riding a horse on mars",
        "a watercolor painting of a lighthouse at dawn",
        "a close-up photo of a cat wearing sunglasses",
        "an oil painting of a mountain village in winter",
    )
    c.log.sample_steps = 50
    c.log.guidance = 7.5

    c.export = ml_collections.ConfigDict()
    c.export.formats = ("peft", "legacy", "kohya")
    return c
