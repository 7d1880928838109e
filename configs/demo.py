"""The main job (``smooth-jax demo``): base model on the bundled digits, plain vs Smooth LoRA,
export, ISTD / digit accuracy / FD_digits and DDIM-inversion errors, report. Sized to finish in
about 15 minutes on 2 CPU cores, the base model's training included (cached afterwards).

    smooth-jax demo --out demo_out [--config configs/demo.py] [--config.lora.train.steps=600]
"""

import ml_collections

from configs import digits_base, digits_lora


def get_config():
    c = ml_collections.ConfigDict()
    c.base = digits_base.get_config()
    c.lora = digits_lora.get_config()
    # name -> lambda; identical otherwise (config, seed, batches).
    c.models = ml_collections.ConfigDict({"plain": 0.0, "smooth": 1.0})
    c.eval = ml_collections.ConfigDict()
    c.eval.prompts_file = "eval/prompts/digits.txt"
    c.eval.repeats = 5  # noise pairs per digit prompt: 50 interpolations
    c.eval.frames = 11  # the paper's 0, 0.1, ..., 1
    c.eval.steps = 25
    c.eval.guidance = 3.0
    c.eval.seed = 0
    c.eval.batch_prompts = 10
    c.eval.fid_num_images = 1797
    c.eval.num_images = 100  # real digits inverted and reconstructed
    c.eval.batch_images = 50
    c.eval.inversion_guidance = 3.0  # rows: DDIM inversion with CFG 3 (the paper's Table 2 uses CFG), and guidance 1
    c.eval.grids = 4
    return c
