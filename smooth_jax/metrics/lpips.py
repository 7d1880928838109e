"""LPIPS (Zhang et al. 2018, the ``lpips`` package, version 0.1) in Flax, from local weight files.

``d(x, y) = sum_l mean_hw( w_l . (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2 )``: f_l are the ReLU outputs
of 5 stages of an ImageNet backbone (AlexNet or VGG16, torchvision's weights), normalised over
channels, and w_l >= 0 the learned 1x1 "lin" heads. Inputs go through the package's scaling layer
``(x - shift) / scale`` on the [-1, 1] scale first. Two files are needed, both PyTorch ``.pth``
(read with torch):

- the backbone: torchvision's ``alexnet-owt-7be5be79.pth`` (or ``vgg16-397923af.pth``), from
  https://download.pytorch.org/models/ ;
- the heads: ``alex.pth`` (or ``vgg.pth``) from the lpips package, ``lpips/weights/v0.1/`` in the
  pip package or https://github.com/richzhang/PerceptualSimilarity .
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smooth_jax.metrics.smoothness import to_unit_range
from smooth_jax.metrics.weights import load_torch_state_dict, require_path

# lpips.pretrained_networks ScalingLayer: applied to images in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPS = 1e-10

# torchvision ``features`` layouts, by module index: ("conv", index, out_ch, kernel, stride, pad),
# ("pool", kernel, stride), ("tap",) after the ReLU whose output is an LPIPS feature (ReLU is
# applied after every conv).
_ALEX = (
    ("conv", 0, 64, 11, 4, 2), ("tap",),
    ("pool", 3, 2), ("conv", 3, 192, 5, 1, 2), ("tap",),
    ("pool", 3, 2), ("conv", 6, 384, 3, 1, 1), ("tap",),
    ("conv", 8, 256, 3, 1, 1), ("tap",),
    ("conv", 10, 256, 3, 1, 1), ("tap",),
)
_VGG16 = (
    ("conv", 0, 64, 3, 1, 1), ("conv", 2, 64, 3, 1, 1), ("tap",),
    ("pool", 2, 2), ("conv", 5, 128, 3, 1, 1), ("conv", 7, 128, 3, 1, 1), ("tap",),
    ("pool", 2, 2), ("conv", 10, 256, 3, 1, 1), ("conv", 12, 256, 3, 1, 1), ("conv", 14, 256, 3, 1, 1), ("tap",),
    ("pool", 2, 2), ("conv", 17, 512, 3, 1, 1), ("conv", 19, 512, 3, 1, 1), ("conv", 21, 512, 3, 1, 1), ("tap",),
    ("pool", 2, 2), ("conv", 24, 512, 3, 1, 1), ("conv", 26, 512, 3, 1, 1), ("conv", 28, 512, 3, 1, 1), ("tap",),
)
BACKBONES = {"alex": _ALEX, "vgg": _VGG16}

# net -> (torchvision backbone file, its architecture, lpips heads file)
_FILES = {
    "alex": ("alexnet-owt-7be5be79.pth", "AlexNet", "alex.pth"),
    "vgg": ("vgg16-397923af.pth", "VGG16", "vgg.pth"),
}
_BACKBONE_GET = (
    "https://download.pytorch.org/models/{file} (the file torchvision.models.{arch}(weights='DEFAULT') downloads)"
)
_HEADS_GET = (
    "the lpips package (pip install lpips; the file is lpips/weights/v0.1/{file} inside it) or "
    "https://github.com/richzhang/PerceptualSimilarity/tree/master/lpips/weights/v0.1"
)


def _normalize(f: jax.Array) -> jax.Array:
    """lpips ``normalize_tensor``: unit L2 norm over channels (last axis here), eps added to the norm."""
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + NORMALIZE_EPS)


class LPIPSNet(nn.Module):
    """Backbone + lin heads. ``__call__(x, y)``: two ``[B, 3, H, W]`` batches in [-1, 1] -> ``[B]``.

    Params: ``features_{i}/{kernel,bias}`` (torchvision module index i) and ``lin{l}/kernel``
    (``[1, 1, C_l, 1]``). Convs run at full float32 precision on every backend.
    """

    net: str = "alex"

    def setup(self):
        spec = BACKBONES[self.net]
        p = jax.lax.Precision.HIGHEST
        self.convs = [
            nn.Conv(s[2], (s[3], s[3]), strides=(s[4], s[4]), padding=((s[5], s[5]),) * 2, precision=p,
                    name=f"features_{s[1]}")
            for s in spec if s[0] == "conv"
        ]
        taps = sum(1 for s in spec if s[0] == "tap")
        self.lins = [nn.Conv(1, (1, 1), use_bias=False, precision=p, name=f"lin{i}") for i in range(taps)]

    def features(self, x: jax.Array) -> list[jax.Array]:
        """ReLU features at the taps, NHWC, for ``x`` NCHW in [-1, 1] (scaling layer applied here)."""
        shift = jnp.asarray(LPIPS_SHIFT, x.dtype)[None, :, None, None]
        scale = jnp.asarray(LPIPS_SCALE, x.dtype)[None, :, None, None]
        h = jnp.transpose((x - shift) / scale, (0, 2, 3, 1))
        out, convs = [], iter(self.convs)
        for s in BACKBONES[self.net]:
            if s[0] == "conv":
                h = nn.relu(next(convs)(h))
            elif s[0] == "pool":
                h = nn.max_pool(h, (s[1], s[1]), strides=(s[2], s[2]), padding="VALID")
            else:
                out.append(h)
        return out

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        n = x.shape[0]
        total = 0.0
        for lin, f in zip(self.lins, self.features(jnp.concatenate([x, y]))):
            d = (_normalize(f[:n]) - _normalize(f[n:])) ** 2
            total = total + jnp.mean(lin(d), axis=(1, 2, 3))
        return total


def params_from_torch(backbone: Mapping[str, np.ndarray], heads: Mapping[str, np.ndarray], net: str = "alex",
                      source: str = "") -> dict:
    """Flax params of ``LPIPSNet(net)`` from PyTorch state dicts (numpy arrays).

    backbone: torchvision's ``features.{i}.weight`` ``[O, I, k, k]`` / ``features.{i}.bias`` (classifier
    keys are ignored); heads: lpips' ``lin{l}.model.1.weight`` ``[1, C, 1, 1]``.
    """
    if net not in BACKBONES:
        raise ValueError(f"net must be one of {sorted(BACKBONES)}, got {net!r}.")
    params: dict[str, Any] = {}
    for s in BACKBONES[net]:
        if s[0] != "conv":
            continue
        wk, bk = f"features.{s[1]}.weight", f"features.{s[1]}.bias"
        if wk not in backbone or bk not in backbone:
            raise ValueError(f"{source or 'backbone state dict'}: {wk!r} missing: not the torchvision {net} file.")
        w = np.asarray(backbone[wk], np.float32)
        if w.shape[0] != s[2] or w.shape[2:] != (s[3], s[3]):
            raise ValueError(f"{source or 'backbone'}: {wk} has shape {w.shape}, expected out={s[2]}, kernel {s[3]}.")
        params[f"features_{s[1]}"] = {
            "kernel": np.transpose(w, (2, 3, 1, 0)),
            "bias": np.asarray(backbone[bk], np.float32),
        }
    lins = {}
    for key, value in heads.items():
        m = re.fullmatch(r"lin(\d+)(?:\.model\.\d+)?\.weight", key)
        if m:
            lins[int(m.group(1))] = np.asarray(value, np.float32)
    taps = sum(1 for s in BACKBONES[net] if s[0] == "tap")
    if sorted(lins) != list(range(taps)):
        raise ValueError(f"{source or 'heads state dict'}: expected lin0..lin{taps - 1} weights, found {sorted(lins)}.")
    for i, w in lins.items():
        params[f"lin{i}"] = {"kernel": np.transpose(w, (2, 3, 1, 0))}
    return {"params": params}


class LPIPS:
    """LPIPS distance per image pair: ``__call__(x, y)`` with ``[B, 3, H, W]`` in ``value_range``
    ((0, 1) default) -> ``[B]`` float32, unitless, >= 0 (0 for identical images). H, W >= 32 for
    AlexNet, >= 16 for VGG. Versions: LPIPS v0.1 with the ``net`` backbone ("alex" is the
    package's default and the usual reported variant)."""

    def __init__(self, params: Any, net: str = "alex"):
        self.net = net
        self.module = LPIPSNet(net)
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self._apply = jax.jit(self.module.apply)

    @classmethod
    def from_paths(cls, backbone_weights: str | os.PathLike, lpips_weights: str | os.PathLike,
                   net: str = "alex") -> "LPIPS":
        """From the two ``.pth`` files (see the module docstring); needs torch to read them.
        Missing files raise ``MissingWeightsError`` naming the file and where to get it."""
        if net not in _FILES:
            raise ValueError(f"net must be one of {sorted(_FILES)}, got {net!r}.")
        backbone_file, arch, heads_file = _FILES[net]
        how = "LPIPS.from_paths(backbone_weights=..., lpips_weights=...)"
        b = require_path(backbone_weights, what=f"LPIPS backbone: torchvision {arch} ImageNet weights {backbone_file}",
                         get=_BACKBONE_GET.format(file=backbone_file, arch=arch.lower()), how=how)
        h = require_path(lpips_weights, what=f"LPIPS {net} heads {heads_file} from the lpips package (v0.1)",
                         get=_HEADS_GET.format(file=heads_file), how=how)
        backbone = load_torch_state_dict(b, what="LPIPS backbone weights")
        heads = load_torch_state_dict(h, what="LPIPS lin heads")
        return cls(params_from_torch(backbone, heads, net, source=f"{b} / {h}"), net)

    @classmethod
    def random(cls, rng: jax.Array, net: str = "alex") -> "LPIPS":
        """Randomly initialised weights (for tests and shape checks only: the numbers mean nothing)."""
        module = LPIPSNet(net)
        x = jnp.zeros((1, 3, 64, 64), jnp.float32)
        return cls(jax.jit(module.init)(rng, x, x), net)

    def __call__(self, x, y, value_range: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
        x, y = to_unit_range(x, value_range), to_unit_range(y, value_range)
        if x.shape != y.shape or x.ndim != 4:
            raise ValueError(f"expected two [B, 3, H, W] batches of the same shape, got {x.shape} and {y.shape}.")
        return self._apply(self.params, 2.0 * x - 1.0, 2.0 * y - 1.0)
