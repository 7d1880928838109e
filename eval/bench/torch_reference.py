"""A faithful PyTorch version of the authors' Smooth Diffusion train step, for benchmarks and parity.

What the authors' code does (DESIGN.md §2), written the way they write it: a diffusers
``UNet2DConditionModel`` with a peft LoRA on ``to_q/to_k/to_v/to_out.0`` of every ``attn1``/``attn2``,
the noise ``eps`` made a leaf that requires grad, ONE UNet forward whose ``eps_theta`` serves both the
MSE and ``x0_hat``, and the regularizer's norm from

    torch.autograd.grad(outputs=x0_hat, inputs=eps, grad_outputs=sqrt(1-abar) * u, create_graph=True)

so the parameter gradient of the penalty is a double backward. ``a`` is an EMA (decay 0.01, from 0)
of the batch-mean norm; the penalty is ``mean_b (norm_b - a_new)^2`` with ``a_new`` in the graph.
Then grad-norm clipping (1.0) and AdamW, as in their script.

Every random input (x0 latents, eps, t, u, text context) is an argument, so smooth-jax and this
reference can be fed the same batch. The UNet weights come from a smooth-jax model through
``smooth_jax.models.torch_bridge`` (or from a random init for memory runs), and a smooth-jax LoRA
tree (``P/down (in,r)``, ``P/up (r,out)``) can be copied in, so both sides hold the same LoRA.

    import torch_reference as tr        # eval/bench on sys.path (the scripts here put it there)
    unet = tr.lora_unet(tr.bridge_unet(sd), rank=8, alpha=8, lora_tree=tree)
    trainer = tr.Trainer(unet, tr.alphas_cumprod(sd.configs["scheduler"]), lr=1e-4)
    metrics = trainer.step(x0, eps, t, u, context, regularize=True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import numpy as np
import torch

# The authors' LoRA placement, as PyTorch module-name suffixes (peft matches ``name == target`` or
# ``name.endswith("." + target)``; we pass full names, see ``target_modules``).
TARGET_SUFFIXES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                   "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
ADAPTER = "default"


# --- model ------------------------------------------------------------------------------------


def bridge_unet(sd, unet_params: Any = None):
    """diffusers' PyTorch UNet holding the same weights as smooth-jax's ``sd`` (float32, CPU)."""
    from smooth_jax.models import torch_bridge

    return torch_bridge.torch_unet(sd, sd.params["unet"] if unet_params is None else unet_params)


def random_unet(unet_config: Mapping[str, Any], seed: int = 0):
    """diffusers' PyTorch UNet of a config (e.g. ``presets.preset("sd15")["unet"]``), random init."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    return UNet2DConditionModel(**kwargs).eval()


def target_modules(unet) -> list[str]:
    """Full names of the Linear layers the authors put a LoRA on (or the peft layers wrapping them), sorted."""
    names = [n for n, m in unet.named_modules()
             if (isinstance(m, torch.nn.Linear) or hasattr(m, "base_layer")) and any(n.endswith(s) for s in TARGET_SUFFIXES)]
    if not names:
        raise ValueError("No attn1/attn2 to_q/to_k/to_v/to_out.0 Linear layers in this UNet.")
    return sorted(names)


def lora_unet(unet, rank: int = 8, alpha: float = 8.0, lora_tree: Mapping | None = None, seed: int = 0):
    """Freeze ``unet`` and add a peft LoRA (``unet.add_adapter``) on the authors' targets.

    Without ``lora_tree`` the init is the authors': A (down) ~ N(0, 1/r) (peft's "gaussian"), B (up) = 0.
    With a smooth-jax LoRA tree, its ``down.T``/``up.T`` are copied into every ``lora_A``/``lora_B``,
    so this UNet computes what smooth-jax's ``lora.merge``d UNet computes. Scale = alpha / rank.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    torch.manual_seed(seed)
    names = target_modules(unet)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=names, lora_dropout=0.0,
                        init_lora_weights="gaussian")
    unet.add_adapter(config)
    if lora_tree is not None:
        set_lora(unet, lora_tree)
    return unet


def _lora_layers(unet) -> dict[str, Any]:
    """``{torch module name: peft LoRA layer}`` for every adapted layer."""
    return {n: m for n, m in unet.named_modules() if hasattr(m, "lora_A") and ADAPTER in getattr(m, "lora_A", {})}


def set_lora(unet, lora_tree: Mapping) -> None:
    """Copy a smooth-jax LoRA tree (nested ``{.../down (in,r), .../up (r,out)}``) into the peft layers."""
    from smooth_jax import lora as lora_lib
    from smooth_jax.models import naming

    layers = _lora_layers(unet)
    mods = {naming.flax_to_torch(p): du for p, du in lora_lib.modules(lora_tree).items()}
    if set(mods) != set(layers):
        raise ValueError(f"LoRA modules differ: only in the tree {sorted(set(mods) - set(layers))[:3]}, "
                         f"only in the UNet {sorted(set(layers) - set(mods))[:3]}")
    with torch.no_grad():
        for name, (down, up) in mods.items():
            layer = layers[name]
            layer.lora_A[ADAPTER].weight.copy_(torch.from_numpy(np.asarray(down, np.float32).T.copy()))
            layer.lora_B[ADAPTER].weight.copy_(torch.from_numpy(np.asarray(up, np.float32).T.copy()))


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    """The trainable (LoRA) parameters, in a fixed order."""
    return [p for _, p in sorted(unet.named_parameters()) if p.requires_grad]


def lora_grads_as_tree(unet) -> dict[str, np.ndarray]:
    """The ``.grad`` of every LoRA matrix in smooth-jax's flat naming and layout:
    ``{flax module path + '/down': (in, r), ... + '/up': (r, out)}``."""
    from smooth_jax.models import naming

    out = {}
    for name, layer in _lora_layers(unet).items():
        path = naming.torch_to_flax(name)
        out[f"{path}/down"] = layer.lora_A[ADAPTER].weight.grad.detach().numpy().T.copy()
        out[f"{path}/up"] = layer.lora_B[ADAPTER].weight.grad.detach().numpy().T.copy()
    return out


def alphas_cumprod(scheduler_config: Mapping[str, Any]) -> torch.Tensor:
    """abar_t [1000] float32, as the authors' script gets it (diffusers' ``DDPMScheduler``)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(dict(scheduler_config)).alphas_cumprod.to(torch.float32)


# --- loss -------------------------------------------------------------------------------------


@dataclasses.dataclass
class LossOut:
    loss: torch.Tensor
    mse: torch.Tensor
    penalty: torch.Tensor
    norms: torch.Tensor
    ema_a: float  # the updated EMA (a plain number: the next step's constant)


def double_backward_attention():
    """Route ``scaled_dot_product_attention`` to its math kernel, the one that supports the second
    backward (``_scaled_dot_product_flash_attention_for_cpu_backward`` has no derivative). The
    graph records the kernel at forward time, so only the forward needs to run inside."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _bc(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def smooth_loss(unet, x0, eps, t, u, context, ema_a: float, abar_table: torch.Tensor, *,
                reg_weight: float = 1.0, ema_decay: float = 0.01) -> LossOut:
    """The authors' loss. x0, eps, u: [B,C,H,W]; t: [B] int64; context: [B,L,D]; ema_a: the stored EMA.

    ``u`` is already N(0,I)/sqrt(CHW) (as smooth-jax's ``objective.sample_direction``); it is scaled
    by sqrt(1-abar) here, as in their code.
    """
    abar = abar_table[t]
    sqrt_a, sqrt_1m = _bc(abar.sqrt()), _bc((1.0 - abar).sqrt())
    eps = eps.detach().clone().requires_grad_(True)
    x_t = sqrt_a * x0 + sqrt_1m * eps
    # PyTorch's fused (flash) CPU attention has no double backward; the math kernel does.
    with double_backward_attention():
        eps_pred = unet(x_t, t, context).sample
    x0_hat = (x_t - sqrt_1m * eps_pred) / sqrt_a
    (g,) = torch.autograd.grad(outputs=x0_hat, inputs=eps, grad_outputs=sqrt_1m * u, create_graph=True)
    norms = g.flatten(1).norm(dim=1)
    a_new = ema_a + ema_decay * (norms.mean() - ema_a)
    penalty = ((norms - a_new) ** 2).mean()
    mse = torch.nn.functional.mse_loss(eps_pred, eps.detach())
    return LossOut(mse + reg_weight * penalty, mse, penalty, norms, float(a_new.detach()))


def plain_loss(unet, x0, eps, t, context, ema_a: float, abar_table: torch.Tensor) -> LossOut:
    """Plain LoRA fine-tuning: the diffusion MSE only (lambda = 0)."""
    abar = abar_table[t]
    x_t = _bc(abar.sqrt()) * x0 + _bc((1.0 - abar).sqrt()) * eps
    mse = torch.nn.functional.mse_loss(unet(x_t, t, context).sample, eps)
    zero = torch.zeros(())
    return LossOut(mse, mse, zero, torch.zeros(x0.shape[0]), float(ema_a))


# --- the step ---------------------------------------------------------------------------------


class Trainer:
    """The authors' optimisation step: loss, backward, clip_grad_norm_(1.0), AdamW.

    ``step(...)`` takes the batch's random draws explicitly and updates ``self.ema_a`` as their
    script does (decay 0.01, from 0, never averaged across processes).
    """

    def __init__(self, unet, abar_table: torch.Tensor, *, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, grad_clip: float = 1.0, reg_weight: float = 1.0, ema_decay: float = 0.01):
        self.unet = unet
        self.params = lora_parameters(unet)
        self.abar = abar_table
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.grad_clip, self.reg_weight, self.ema_decay = grad_clip, reg_weight, ema_decay
        self.ema_a = 0.0

    def loss(self, x0, eps, t, u, context, *, regularize: bool) -> LossOut:
        if regularize:
            return smooth_loss(self.unet, x0, eps, t, u, context, self.ema_a, self.abar,
                               reg_weight=self.reg_weight, ema_decay=self.ema_decay)
        return plain_loss(self.unet, x0, eps, t, context, self.ema_a, self.abar)

    def step(self, x0, eps, t, u, context, *, regularize: bool = True) -> dict[str, float]:
        self.opt.zero_grad(set_to_none=True)
        out = self.loss(x0, eps, t, u, context, regularize=regularize)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.ema_a = out.ema_a
        return {"loss": float(out.loss.detach()), "mse": float(out.mse.detach()), "penalty": float(out.penalty.detach()),
                "ema_a": self.ema_a, "grad_norm": float(grad_norm)}


def as_torch(*arrays: Iterable) -> list[torch.Tensor]:
    """numpy/JAX arrays -> CPU torch tensors (integers as int64, floats as float32)."""
    out = []
    for a in arrays:
        a = np.asarray(a)
        out.append(torch.from_numpy(a.astype(np.int64 if np.issubdtype(a.dtype, np.integer) else np.float32)))
    return out
