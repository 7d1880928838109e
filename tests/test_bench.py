"""The correctness anchor of the PyTorch benchmarks: the reference step in ``eval/bench/torch_reference.py``
(the authors' way: diffusers UNet + peft LoRA + ``torch.autograd.grad(create_graph=True)``) computes
what smooth-jax computes, so the timings compare the same work.

Tiny model, the same weights (torch_bridge), the same non-zero LoRA (random up and down, scale 2 so a
loader that ignores alpha is caught), the same x0/eps/t/u/context and a non-zero EMA ``a``. Both sides
use tanh-GELU (``exact_gelu_torch``), so what remains is float32 rounding of differently ordered
computations (PyTorch runs the LoRA as a side branch, smooth-jax merges it): we allow 1e-4 relative on
the loss terms and 1e-4 of the largest gradient entry on the LoRA gradients (second order included).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smooth_jax import lora, objective

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]


def _load_reference():
    """eval/bench is a folder of scripts, not a package: import the reference by path (once)."""
    name = "smooth_jax_bench_torch_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "eval" / "bench" / "torch_reference.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


RANK, ALPHA, EMA_A, DECAY, LAMBDA = 4, 8.0, 0.3, 0.01, 1.0


@pytest.fixture(scope="module")
def same_batch(tiny_sd):
    rng = np.random.default_rng(3)
    s = tiny_sd.configs["unet"]["sample_size"]
    shape = (2, 4, s, s)
    x0 = rng.standard_normal(shape).astype(np.float32)
    eps = rng.standard_normal(shape).astype(np.float32)
    u = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
    t = np.array([37, 640], np.int32)
    ctx = rng.standard_normal((2, tiny_sd.max_length, tiny_sd.context_dim)).astype(np.float32)
    spec = lora.LoraSpec(rank=RANK, alpha=ALPHA)
    tree = lora.random_like(jax.random.PRNGKey(5), lora.init(jax.random.PRNGKey(4), tiny_sd.params["unet"], spec), 0.1)
    return x0, eps, u, t, ctx, lora.as_numpy(tree)


_JAX_RESULTS: dict = {}


def _jax_loss_and_grads(sd, batch, regularize):
    """smooth-jax's loss terms and LoRA gradients (memoised: the tests share them)."""
    if regularize not in _JAX_RESULTS:
        _JAX_RESULTS[regularize] = _jax_compute(sd, batch, regularize)
    return _JAX_RESULTS[regularize]


def _jax_compute(sd, batch, regularize):
    x0, eps, u, t, ctx, tree = batch
    abar = jnp.asarray(sd.schedule.alphas_cumprod, jnp.float32)[t]

    def loss_fn(tr):
        params = lora.merge(sd.params["unet"], tr, ALPHA / RANK)
        eps_fn = lambda x_t: sd.unet_apply(params, x_t, t, ctx)  # noqa: E731
        if regularize:
            out = objective.smooth_loss(eps_fn, x0, eps, abar, u, jnp.float32(EMA_A), reg_weight=LAMBDA, ema_decay=DECAY)
        else:
            out = objective.plain_loss(eps_fn, x0, eps, abar, jnp.float32(EMA_A))
        return out.loss, out

    (_, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(tree)
    return jax.tree_util.tree_map(np.asarray, out), lora.flatten(jax.tree_util.tree_map(np.asarray, grads))


def _torch_loss_and_grads(tr, sd, batch, regularize):
    x0, eps, u, t, ctx, tree = batch
    unet = tr.lora_unet(tr.bridge_unet(sd), rank=RANK, alpha=ALPHA, lora_tree=tree)
    abar = torch.from_numpy(np.asarray(sd.schedule.alphas_cumprod, np.float32))
    x0_t, eps_t, u_t, t_t, ctx_t = tr.as_torch(x0, eps, u, t, ctx)
    if regularize:
        out = tr.smooth_loss(unet, x0_t, eps_t, t_t, u_t, ctx_t, EMA_A, abar, reg_weight=LAMBDA, ema_decay=DECAY)
    else:
        out = tr.plain_loss(unet, x0_t, eps_t, t_t, ctx_t, EMA_A, abar)
    out.loss.backward()
    return out, tr.lora_grads_as_tree(unet), unet


def _close_scalar(ours, theirs, rtol=1e-4):
    ours, theirs = float(ours), float(theirs.detach() if hasattr(theirs, "detach") else theirs)
    assert abs(float(ours) - float(theirs)) <= rtol * abs(float(theirs)) + 1e-7, (float(ours), float(theirs))


@pytest.mark.parametrize("regularize", [True, False], ids=["smooth", "plain"])
def test_torch_reference_matches_smooth_jax_loss_and_lora_grads(regularize, tiny_sd, same_batch, exact_gelu_torch):
    tr = _load_reference()
    ours, our_grads = _jax_loss_and_grads(tiny_sd, same_batch, regularize)
    theirs, their_grads, unet = _torch_loss_and_grads(tr, tiny_sd, same_batch, regularize)

    # The same 2 x (to_q, to_k, to_v, to_out) x attentions of the tiny UNet on both sides.
    assert len(tr.target_modules(unet)) == len(lora.modules(same_batch[-1]))
    assert sorted(their_grads) == sorted(our_grads)
    _close_scalar(ours.mse, theirs.mse)
    _close_scalar(ours.loss, theirs.loss)
    if regularize:
        assert float(theirs.penalty) > 1e-3  # the regularizer really contributes
        _close_scalar(ours.penalty, theirs.penalty)
        np.testing.assert_allclose(ours.norms, theirs.norms.detach().numpy(), rtol=1e-4)
        _close_scalar(ours.ema_a, theirs.ema_a)
    scale = max(np.abs(g).max() for g in their_grads.values())
    for path, g in their_grads.items():
        np.testing.assert_allclose(our_grads[path], g, rtol=1e-4, atol=1e-4 * scale, err_msg=path)
    if regularize:  # the penalty's (second-order) part of the gradient is checked, not only the MSE's
        _, plain_grads = _jax_loss_and_grads(tiny_sd, same_batch, False)
        diff = max(np.abs(our_grads[p] - plain_grads[p]).max() for p in our_grads)
        assert diff > 1e-2 * scale


def test_torch_trainer_step_matches_optax_adamw(tiny_sd, same_batch, exact_gelu_torch):
    """One full step (clip 1.0, AdamW): the same updated LoRA and EMA as smooth-jax's optimizer."""
    import ml_collections
    import optax

    from smooth_jax import train
    from smooth_jax.models import naming

    tr = _load_reference()
    x0, eps, u, t, ctx, tree = same_batch
    unet = tr.lora_unet(tr.bridge_unet(tiny_sd), rank=RANK, alpha=ALPHA, lora_tree=tree)
    abar = torch.from_numpy(np.asarray(tiny_sd.schedule.alphas_cumprod, np.float32))
    # Adam's first step is lr * g / (|g| + eps): with eps = 1e-8 a gradient entry within rounding
    # of 0 maps to +-lr either way, so a larger eps keeps the comparison about the maths.
    lr, wd, adam_eps = 1e-3, 1e-2, 1e-3
    trainer = tr.Trainer(unet, abar, lr=lr, weight_decay=wd, eps=adam_eps)
    trainer.ema_a = EMA_A
    metrics = trainer.step(*tr.as_torch(x0, eps, t, u, ctx), regularize=True)

    ours, grads = _jax_loss_and_grads(tiny_sd, same_batch, True)
    cfg = ml_collections.ConfigDict(dict(lr=lr, warmup_steps=0, b1=0.9, b2=0.999, eps=adam_eps, weight_decay=wd, grad_clip=1.0))
    tx = train.make_optimizer(cfg)
    updates, _ = tx.update(lora.unflatten(grads), tx.init(tree), tree)
    new_tree = lora.flatten(optax.apply_updates(tree, updates))

    _close_scalar(metrics["ema_a"], ours.ema_a)
    assert metrics["grad_norm"] > 1.0  # clipping is active, so its scaling is part of what is compared
    for layer_name, layer in tr._lora_layers(unet).items():
        path = naming.torch_to_flax(layer_name)
        np.testing.assert_allclose(layer.lora_A["default"].weight.detach().numpy().T, new_tree[f"{path}/down"],
                                   rtol=0, atol=lr * 1e-2, err_msg=path)
        np.testing.assert_allclose(layer.lora_B["default"].weight.detach().numpy().T, new_tree[f"{path}/up"],
                                   rtol=0, atol=lr * 1e-2, err_msg=path)
