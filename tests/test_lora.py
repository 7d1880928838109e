"""LoRA as a param-tree transform: targets, counts, init, merge, compatibility errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smooth_jax import lora
from smooth_jax.models import preset_param_shapes


def test_sd15_rank8_count_from_shapes_alone():
    shapes = preset_param_shapes("sd15")["unet"]
    spec = lora.LoraSpec(rank=8, alpha=8)
    targets = lora.find_targets(shapes, spec.targets)
    # 16 transformer blocks (6 down, 1 mid, 9 up) x 2 attentions x 4 projections.
    assert len(targets) == 128
    assert lora.count(lora.lora_shapes(shapes, spec)) == 1_594_368


def test_targets_by_name_and_bad_patterns(tiny_sd):
    shapes = tiny_sd.param_shapes()["unet"]
    only_q = lora.find_targets(shapes, (r".*/attn1/to_q",))
    assert len(only_q) == 4 and all(p.endswith("attn1/to_q") for p in only_q)
    with pytest.raises(ValueError, match="conv_in.*only Dense"):
        lora.find_targets(shapes, (r"conv_in",))
    with pytest.raises(ValueError, match="match no Dense kernel"):
        lora.find_targets(shapes, (r"nothing_here",))


def test_init_statistics_and_fresh_lora_is_identity(tiny_sd):
    spec = lora.LoraSpec(rank=8, alpha=8)
    tree = lora.init(jax.random.PRNGKey(1), tiny_sd.params["unet"], spec)
    mods = lora.modules(tree)
    assert len(mods) == 32
    downs = np.concatenate([np.ravel(d) for d, _ in mods.values()])
    assert all(not np.any(u) for _, u in mods.values())
    # down ~ N(0, std 1/r), as diffusers' LoRALinearLayer (the authors' code) initialises it.
    assert abs(downs.std() - 1 / 8) < 0.01 and abs(downs.mean()) < 0.01
    merged = lora.merge(tiny_sd.params["unet"], tree, spec.scale)
    a, b = lora.flatten(merged), lora.flatten(tiny_sd.params["unet"])
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_merge_matches_explicit_formula(tiny_sd):
    spec = lora.LoraSpec(rank=4, alpha=8)  # scale 2
    tree = lora.random_like(jax.random.PRNGKey(2), lora.init(jax.random.PRNGKey(1), tiny_sd.params["unet"], spec))
    merged = lora.flatten(lora.merge(tiny_sd.params["unet"], tree, spec.scale))
    base = lora.flatten(tiny_sd.params["unet"])
    for module, (down, up) in lora.modules(tree).items():
        k = f"{module}/kernel"
        expected = np.asarray(base[k], np.float64) + 2.0 * np.asarray(down, np.float64) @ np.asarray(up, np.float64)
        np.testing.assert_allclose(merged[k], expected, rtol=1e-5, atol=1e-6)
    untouched = [k for k in base if not any(k.startswith(m + "/") for m in lora.modules(tree))]
    assert untouched and all(np.array_equal(merged[k], base[k]) for k in untouched)


def test_merged_unet_equals_unmerged_lora_forward(tiny_sd, unet_inputs):
    """Folding the LoRA into the kernels must equal running y = xW + b + scale * (x down) up
    layer by layer, computed here by intercepting every targeted Dense call."""
    spec = lora.LoraSpec(rank=4, alpha=2)
    tree = lora.random_like(jax.random.PRNGKey(3), lora.init(jax.random.PRNGKey(1), tiny_sd.params["unet"], spec), 0.2)
    mods = lora.modules(tree)
    latents, t, ctx = unet_inputs

    def side_branch(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            path = "/".join(context.module.path)
            if path in mods:
                down, up = mods[path]
                y = y + spec.scale * (args[0] @ down) @ up
        return y

    def unmerged(params):
        with nn.intercept_methods(side_branch):
            return tiny_sd.unet_apply(params, latents, t, ctx)

    merged = jax.jit(tiny_sd.unet_apply)(lora.merge(tiny_sd.params["unet"], tree, spec.scale), latents, t, ctx)
    reference = unmerged(tiny_sd.params["unet"])
    base = jax.jit(tiny_sd.unet_apply)(tiny_sd.params["unet"], latents, t, ctx)
    assert float(jnp.abs(merged - base).max()) > 1e-2  # the LoRA really changes the output
    np.testing.assert_allclose(merged, reference, atol=1e-4, rtol=1e-4)


def test_check_compatible_names_the_module(tiny_sd):
    shapes = tiny_sd.param_shapes()["unet"]
    tree = lora.as_numpy(lora.init(jax.random.PRNGKey(0), shapes, lora.LoraSpec(rank=4, alpha=4)))
    lora.check_compatible(shapes, tree)
    flat = lora.flatten(tree)
    name = sorted(lora.modules(tree))[0]
    bad = dict(flat)
    bad[f"{name}/down"] = np.zeros((7, 4), np.float32)
    with pytest.raises(ValueError, match=f"{name}.*different architecture"):
        lora.check_compatible(shapes, lora.unflatten(bad), where="x.safetensors")
    bad = dict(flat)
    bad["down_blocks_9/attn1/to_q/down"] = np.zeros((32, 4), np.float32)
    bad["down_blocks_9/attn1/to_q/up"] = np.zeros((4, 32), np.float32)
    with pytest.raises(ValueError, match="down_blocks_9/attn1/to_q.*does not exist"):
        lora.check_compatible(shapes, lora.unflatten(bad))
    sd15_lora = lora.lora_shapes(preset_param_shapes("sd15")["unet"], lora.LoraSpec(rank=8))
    with pytest.raises(ValueError, match="different architecture|does not exist"):
        lora.check_compatible(shapes, sd15_lora)
    bad = dict(flat)
    del bad[f"{name}/up"]
    with pytest.raises(ValueError, match=f"{name}.*no 'up'"):
        lora.check_compatible(shapes, lora.unflatten(bad))
