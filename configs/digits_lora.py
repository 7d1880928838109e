"""Smooth LoRA on the embedded default base model (``digits``: trained here by smooth-jax, see
``smooth_jax/base_model.py``) and the bundled scikit-learn digits at 16 px: the main job's and the
replication's training recipe, sized for a 2-core CPU.

    smooth-jax train --config configs/digits_lora.py --workdir runs/digits_smooth
    smooth-jax train --config configs/digits_lora.py --workdir runs/digits_plain --config.objective.reg_weight=0

``--config.model=digits`` is the cached base model of ``configs/digits_base.py``'s defaults
(``smooth-jax pretrain`` builds it; ``smooth-jax demo`` does so on first use).
"""

from configs import sd15_smooth_lora


def get_config():
    c = sd15_smooth_lora.get_config()
    c.model = "digits"
    c.lora.rank = 8
    c.lora.alpha = 8.0
    c.objective.reg_weight = 1.0
    c.train.steps = 300
    c.train.batch_size = 32
    c.train.grad_accum = 1
    c.train.lr = 1e-3
    c.train.weight_decay = 1e-2
    c.data.source = "digits"
    c.data.resolution = 16
    c.data.num_workers = 0
    c.checkpoint.every = 300
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    c.log.every = 25
    c.log.sample_every = 0
    c.log.sample_prompts = ("a handwritten digit zero", "a handwritten digit three", "a handwritten digit seven")
    c.log.sample_steps = 25
    c.log.guidance = 3.0
    return c
