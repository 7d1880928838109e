"""LoRA as a pure transform of a Flax param tree.

A LoRA tree mirrors the module structure of the base params: for every targeted Dense layer at
module path ``P`` (its kernel at ``P/kernel``, shape ``(in, out)``) the LoRA tree holds
``P/down: (in, r)`` and ``P/up: (r, out)``. Merging gives ``kernel + scale * down @ up`` with
``scale = alpha / r``, which is PyTorch's ``W + scale * B @ A`` with ``A = down.T`` (r, in) and
``B = up.T`` (out, r), transposed into Flax's (in, out) kernel layout.

Init follows the authors' code (diffusers' ``LoRALinearLayer``): ``down ~ N(0, std=1/r)``,
``up = 0``, so a fresh LoRA leaves the model unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Matched against the module path (the kernel's path without '/kernel'). These are the four
# projections of every self- and cross-attention in the UNet: 32 attentions x 4 = 128 for SD-1.5.
DEFAULT_TARGETS: tuple[str, ...] = (r"(^|.*/)attn[12]/(to_q|to_k|to_v|to_out_0)$",)

Tree = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What a LoRA is, apart from its weights.

    rank: r of every module (the file formats allow per-module ranks; ``module_ranks`` reads them).
    alpha: scale = alpha / rank. alpha == rank gives scale 1, the authors' setting.
    targets: regexes matched against module paths.
    """

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)


def flatten(tree: Tree, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{'a/b/c': leaf}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{'a/b/c': leaf}`` -> nested dict."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def find_targets(params: Tree, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Module paths whose ``kernel`` matches one of ``targets``; sorted.

    params: a param tree or a tree of ShapeDtypeStructs (anything with ``.shape``).
    Raises ValueError if a pattern matches a layer that is not a 2-D Dense kernel, or if the
    patterns match nothing at all.
    """
    compiled = [re.compile(t) for t in targets]
    found = []
    for path, leaf in flatten(params).items():
        if not path.endswith("/kernel"):
            continue
        module = path[: -len("/kernel")]
        if not any(c.fullmatch(module) for c in compiled):
            continue
        if len(leaf.shape) != 2:
            raise ValueError(
                f"LoRA target {module!r} has a kernel of shape {tuple(leaf.shape)}; only Dense "
                f"(2-D) kernels are supported. Narrow the target patterns {list(targets)}."
            )
        found.append(module)
    if not found:
        raise ValueError(f"LoRA target patterns {list(targets)} match no Dense kernel in the params.")
    return sorted(found)


def lora_shapes(params: Tree, spec: LoraSpec, dtype=jnp.float32) -> dict[str, Any]:
    """The LoRA tree as ShapeDtypeStructs, from the base param shapes alone."""
    flat = flatten(params)
    out = {}
    for module in find_targets(params, spec.targets):
        d_in, d_out = flat[f"{module}/kernel"].shape
        out[f"{module}/down"] = jax.ShapeDtypeStruct((d_in, spec.rank), dtype)
        out[f"{module}/up"] = jax.ShapeDtypeStruct((spec.rank, d_out), dtype)
    return unflatten(out)


def init(rng: jax.Array, params: Tree, spec: LoraSpec, dtype=jnp.float32) -> dict[str, Any]:
    """A fresh LoRA tree: down ~ N(0, (1/r)^2), up = 0. ``params`` may be shapes only."""
    shapes = flatten(lora_shapes(params, spec, dtype))
    downs = sorted(p for p in shapes if p.endswith("/down"))
    keys = jax.random.split(rng, len(downs))
    out = {}
    for key, path in zip(keys, downs):
        s = shapes[path]
        out[path] = jax.random.normal(key, s.shape, s.dtype) / spec.rank
        up = path[: -len("down")] + "up"
        out[up] = jnp.zeros(shapes[up].shape, shapes[up].dtype)
    return unflatten(out)


def modules(lora: Tree) -> dict[str, tuple[Any, Any]]:
    """``{module_path: (down (in,r), up (r,out))}`` of a LoRA tree."""
    flat = flatten(lora)
    out = {}
    for path, value in flat.items():
        if path.endswith("/down"):
            module = path[: -len("/down")]
            if f"{module}/up" not in flat:
                raise ValueError(f"LoRA module {module!r} has 'down' but no 'up'.")
            out[module] = (value, flat[f"{module}/up"])
        elif not path.endswith("/up"):
            raise ValueError(f"LoRA tree leaf {path!r} is neither '.../down' nor '.../up'.")
        elif f"{path[: -len('/up')]}/down" not in flat:
            raise ValueError(f"LoRA module {path[: -len('/up')]!r} has 'up' but no 'down'.")
    return out


def module_ranks(lora: Tree) -> dict[str, int]:
    return {m: int(down.shape[1]) for m, (down, _) in modules(lora).items()}


def count(lora: Tree) -> int:
    """Number of trainable LoRA parameters (works on arrays or ShapeDtypeStructs)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(lora)))


def check_compatible(params: Tree, lora: Tree, where: str = "LoRA") -> None:
    """Raise ValueError naming the first module that is missing from ``params`` or whose shapes
    disagree with its kernel. ``params`` may be shapes only."""
    flat = flatten(params)
    for module, (down, up) in sorted(modules(lora).items()):
        kernel = flat.get(f"{module}/kernel")
        if kernel is None:
            raise ValueError(f"{where}: module {module!r} does not exist in the base model.")
        if len(kernel.shape) != 2:
            raise ValueError(f"{where}: module {module!r} is not a Dense layer (kernel {tuple(kernel.shape)}).")
        d_in, d_out = kernel.shape
        if len(down.shape) != 2 or len(up.shape) != 2 or down.shape[1] != up.shape[0]:
            raise ValueError(
                f"{where}: module {module!r} has down {tuple(down.shape)} and up {tuple(up.shape)}, "
                "which are not (in, r) and (r, out)."
            )
        if down.shape[0] != d_in or up.shape[1] != d_out:
            raise ValueError(
                f"{where}: module {module!r} maps {down.shape[0]}->{up.shape[1]} features but the base "
                f"model's layer maps {d_in}->{d_out}: the LoRA is for a different architecture."
            )


def merge(params: Tree, lora: Tree, scale: float) -> dict[str, Any]:
    """Base params with every LoRA module folded in: ``kernel + scale * down @ up``.

    Pure and differentiable in both arguments; jit it together with the model apply. The merged
    kernel keeps the base kernel's dtype. Modules not in ``lora`` are passed through untouched.
    """
    mods = modules(lora)

    def rebuild(node: Tree, prefix: str):
        out = {}
        for key, value in node.items():
            path = f"{prefix}/{key}" if prefix else key
            if isinstance(value, Mapping):
                out[key] = rebuild(value, path)
            elif key == "kernel" and prefix in mods:
                down, up = mods[prefix]
                delta = jnp.matmul(down.astype(jnp.float32), up.astype(jnp.float32)) * scale
                out[key] = (value.astype(jnp.float32) + delta).astype(value.dtype)
            else:
                out[key] = value
        return out

    missing = [m for m in mods if not _has_path(params, f"{m}/kernel")]
    if missing:
        raise ValueError(f"LoRA modules not in the base params: {missing[:5]}")
    return rebuild(params, "")


@contextlib.contextmanager
def factored(lora: Tree, scale: float):
    """Run a Flax apply with the LoRA as its own low-rank path, base params untouched.

    Inside the ``with``, every ``nn.Dense`` whose module path (relative to the applied root module)
    has a LoRA module returns ``x @ kernel + scale * (x @ down) @ up``: the same function as
    ``merge``, but its gradient to the LoRA costs rank-sized matmuls, where through a merged kernel
    autodiff first forms the full (in, out) kernel gradient ``x^T dy`` of every targeted layer (as
    many FLOPs as the layer's forward, twice over in the regularized step's double backward).
    The LoRA matmuls run in the layer's output dtype. On exit it checks that every LoRA module was
    reached, so a path mismatch is an error, not a silently LoRA-free model.

        with lora.factored(lora_tree, scale):
            eps = unet.apply({"params": base_params}, x, t, ctx).sample
    """
    import flax.linen as nn

    mods = modules(lora)
    hit: set[str] = set()

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return out
        key = "/".join(module.path)
        if key not in mods:
            return out
        hit.add(key)
        down, up = mods[key]
        x = args[0] if args else kwargs["inputs"]
        delta = jnp.matmul(jnp.matmul(x.astype(out.dtype), down.astype(out.dtype)), up.astype(out.dtype))
        return out + delta * jnp.asarray(scale, out.dtype)

    with nn.intercept_methods(interceptor):
        yield
    missing = sorted(set(mods) - hit)
    if missing:
        raise ValueError(f"lora.factored: {len(missing)} LoRA module(s) matched no Dense layer of the applied "
                         f"model, e.g. {missing[:3]}; the LoRA's paths must be the model's module paths.")


TRAIN_FORMS = ("auto", "factored", "merged")


def factored_is_cheaper(fan_in: int, fan_out: int, rank: int) -> bool:
    """Whether a layer's LoRA gradient costs fewer FLOPs factored than merged.

    Per backward pass over N tokens, merged forms the kernel gradient x^T dy: 2 N in out. Factored
    runs six rank-sized matmuls instead (x down, (x down) up; dy up^T, its @ down^T; the two
    parameter gradients): 6 N r (in + out). Factored wins when 3 r (in + out) < in out: every
    SD-1.5 attention (widths 320-1280, r = 8), not the 32-wide layers of the tiny test model."""
    return 3 * rank * (fan_in + fan_out) < fan_in * fan_out


def split_forms(lora: Tree, form: str = "auto") -> tuple[dict[str, Any], dict[str, Any]]:
    """(merged part, factored part) of a LoRA tree: ``form`` "merged" or "factored" puts every
    module in one part; "auto" picks per module by ``factored_is_cheaper`` (shapes only, so the
    split is static under jit). Train with ``merge(base, merged_part)`` inside
    ``factored(factored_part)``."""
    if form not in TRAIN_FORMS:
        raise ValueError(f"lora.train_form={form!r}: choose one of {TRAIN_FORMS}.")
    merged, fac = {}, {}
    for module, (down, up) in modules(lora).items():
        use_factored = form == "factored" or (
            form == "auto" and factored_is_cheaper(down.shape[0], up.shape[1], down.shape[1]))
        part = fac if use_factored else merged
        part[f"{module}/down"], part[f"{module}/up"] = down, up
    return unflatten(merged), unflatten(fac)


def _has_path(tree: Tree, path: str) -> bool:
    node: Any = tree
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def random_like(rng: jax.Array, lora: Tree, std: float = 0.05) -> dict[str, Any]:
    """A LoRA of the same shapes with every entry N(0, std^2): non-zero ``up`` included. For tests
    and demos, where a fresh (zero-``up``) LoRA would hide errors."""
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(rng, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


def as_numpy(tree: Tree) -> dict[str, Any]:
    return jax.tree_util.tree_map(np.asarray, dict(tree))


def paths(tree: Tree) -> Iterable[str]:
    return flatten(tree).keys()
