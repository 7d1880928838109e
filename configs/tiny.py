"""The paper's recipe on the tiny model and the bundled scikit-learn digits, for this CPU.

    smooth-jax train --config configs/tiny.py --workdir runs/tiny
"""

from configs import sd15_smooth_lora


def get_config():
    c = sd15_smooth_lora.get_config()
    c.model = "tiny"
    c.train.steps = 100
    c.train.batch_size = 8
    c.train.grad_accum = 1
    c.train.lr = 1e-3
    c.data.source = "digits"
    c.data.resolution = 32  # tiny VAE: 32 px -> 16x16 latents, the tiny UNet's sample size
    c.checkpoint.every = 50
    c.log.every = 10
    c.log.sample_every = 50
    c.log.sample_prompts = ("a handwritten digit zero", "a handwritten digit three", "a handwritten digit seven")
    c.log.sample_steps = 10
    c.log.guidance = 3.0
    return c
