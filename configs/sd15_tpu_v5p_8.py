"""The paper's setting on TPU v5p-8 (4 chips, 95 GiB HBM each): 4-way data parallel, 6 sample(s) per device per
micro-batch, 4-step accumulation = global batch 96, bfloat16 compute, fp32 LoRA.

    smooth-jax train --config configs/sd15_tpu_v5p_8.py --workdir runs/sd15 \
        --config.model=/data/stable-diffusion-v1-5 --config.data.path=/data/laion_aesthetics_6.5
See launch/ for the multi-host commands.
"""

from configs import sd15_smooth_lora


def get_config():
    c = sd15_smooth_lora.get_config()
    c.mesh.shape = {"data": 4, "fsdp": 1}
    c.train.grad_accum = 4
    c.train.batch_size = 96
    c.train.compute_dtype = "bfloat16"
    return c
