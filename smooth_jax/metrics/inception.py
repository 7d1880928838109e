"""pytorch-fid's FID InceptionV3 in Flax: the network behind the standard FID number.

This is the TF-2015 Inception graph that pytorch-fid (and TTUR's original FID) uses, not
torchvision's ImageNet InceptionV3: its A/C/E blocks average-pool without counting padding, and
the last E block max-pools. Features are the 2048-d pool3 activations. Inputs ``[B, 3, H, W]`` in
[0, 1] are resized to 299x299 (bilinear, half-pixel, no antialias: ``F.interpolate(...,
align_corners=False)``) and scaled to [-1, 1], as ``pytorch_fid.inception.InceptionV3``'s defaults.

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (PyTorch state dict; reading it
needs torch), from
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smooth_jax.metrics.weights import load_torch_state_dict, require_path

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
BN_EPS = 1e-3
INPUT_SIZE = 299
_HIGHEST = jax.lax.Precision.HIGHEST


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """torchvision ``BasicConv2d``: conv (no bias) -> BatchNorm (eps 1e-3, running stats) -> ReLU. NHWC."""

    features: int
    kernel: Any = 1
    stride: Any = 1
    padding: Any = 0

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride), padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=_HIGHEST, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg3(x):
    """3x3 stride-1 average pool that ignores padding (``count_include_pad=False``)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max3s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, name="branch1x1")(x)
        b5 = BasicConv2d(48, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max3s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, name="branch1x1")(x)
        b7 = BasicConv2d(c7, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max3s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """``pool="avg"``: pytorch-fid's FIDInceptionE_1 (Mixed_7b); ``"max"``: FIDInceptionE_2 (Mixed_7c)."""

    pool: str

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, name="branch1x1")(x)
        b3 = BasicConv2d(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
        ], axis=-1)
        bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
        ], axis=-1)
        if self.pool == "avg":
            p = _avg3(x)
        else:
            p = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = BasicConv2d(192, name="branch_pool")(p)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
    """``[B, C, H, W] -> [B, C, size, size]``, as ``F.interpolate(mode="bilinear", align_corners=False)``
    (half-pixel centres, no antialiasing when shrinking)."""
    b, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    return jax.image.resize(images, (b, c, size, size), method="bilinear", antialias=False)


class FIDInceptionV3(nn.Module):
    """``[B, 3, H, W]`` in [0, 1] -> pool3 features ``[B, 2048]``. Param names follow the PyTorch
    module names (``Conv2d_1a_3x3/conv/kernel``, ``Mixed_5b/branch1x1/bn/scale``, ...); running
    BatchNorm statistics live in the ``batch_stats`` collection. ``resize_input=False`` skips the
    resize to 299 (inputs must then be at least 75x75)."""

    resize_input: bool = True

    @nn.compact
    def __call__(self, x):
        if self.resize_input:
            x = resize_bilinear(x, INPUT_SIZE)
        x = jnp.transpose(2.0 * x - 1.0, (0, 2, 3, 1))
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max3s2(x)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max3s2(x)
        x = FIDInceptionA(32, name="Mixed_5b")(x)
        x = FIDInceptionA(64, name="Mixed_5c")(x)
        x = FIDInceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = FIDInceptionC(128, name="Mixed_6b")(x)
        x = FIDInceptionC(160, name="Mixed_6c")(x)
        x = FIDInceptionC(160, name="Mixed_6d")(x)
        x = FIDInceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE("avg", name="Mixed_7b")(x)
        x = FIDInceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def variables_from_torch(
    state: Mapping[str, np.ndarray], shapes: Mapping[str, Any], source: str = "state dict"
) -> dict:
    """Flax variables of ``FIDInceptionV3`` from pytorch-fid's state dict (numpy arrays).

    ``X.conv.weight [O, I, kh, kw]`` -> ``params/X/conv/kernel [kh, kw, I, O]``; ``X.bn.{weight,
    bias, running_mean, running_var}`` -> ``params/X/bn/{scale, bias}``, ``batch_stats/X/bn/{mean,
    var}``. The classifier (``fc.*``) and ``num_batches_tracked`` are not used. shapes: the
    variables' shape tree (``jax.eval_shape`` of init), checked leaf by leaf.
    """
    from flax.traverse_util import flatten_dict, unflatten_dict

    want = {"/".join(k): v.shape for k, v in flatten_dict(dict(shapes), keep_empty_nodes=False).items()}
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("fc", "AuxLogits") or parts[-1] == "num_batches_tracked":
            continue
        *mods, layer, leaf = parts
        if layer == "conv" and leaf == "weight":
            path, v = "/".join(["params", *mods, "conv", "kernel"]), np.transpose(value, (2, 3, 1, 0))
        elif layer == "bn" and leaf in _BN_LEAVES:
            col, name = _BN_LEAVES[leaf]
            path, v = "/".join([col, *mods, "bn", name]), value
        else:
            raise ValueError(f"{source}: unexpected key {key!r}: not pytorch-fid's FID Inception weights.")
        if path not in want or tuple(want[path]) != tuple(np.shape(v)):
            raise ValueError(f"{source}: key {key!r} (shape {np.shape(value)}) fits no FID Inception parameter.")
        out[path] = np.asarray(v, np.float32)
    missing = sorted(set(want) - set(out))
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} parameters missing, e.g. {missing[:4]}: not the FID Inception file."
        )
    return unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


class InceptionV3Features:
    """``FeatureExtractor`` for standard FID: ``[B, 3, H, W]`` in [0, 1] -> pool3 ``[B, 2048]``
    float32 numpy, with pytorch-fid's FID Inception weights (numbers comparable to pytorch-fid's)."""

    name = "FID (InceptionV3 pool3, pytorch-fid FID weights)"

    def __init__(self, variables: Any, resize_input: bool = True):
        self.module = FIDInceptionV3(resize_input=resize_input)
        self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
        self._apply = jax.jit(self.module.apply)

    @staticmethod
    def variable_shapes(resize_input: bool = True, size: int = INPUT_SIZE) -> Any:
        x = jax.ShapeDtypeStruct((1, 3, size, size), jnp.float32)
        return jax.eval_shape(FIDInceptionV3(resize_input=resize_input).init, jax.random.PRNGKey(0), x)

    @classmethod
    def from_path(cls, weights: str | os.PathLike, resize_input: bool = True) -> "InceptionV3Features":
        """From pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (needs torch to read)."""
        p = require_path(weights, what=f"FID InceptionV3 weights {FID_WEIGHTS_FILE} (pytorch-fid)",
                         get=f"{FID_WEIGHTS_URL} (what pytorch_fid.inception.fid_inception_v3() downloads)",
                         how="InceptionV3Features.from_path(path)")
        state = load_torch_state_dict(p, what="pytorch-fid FID Inception weights")
        return cls(variables_from_torch(state, cls.variable_shapes(), source=str(p)), resize_input)

    def __call__(self, images) -> np.ndarray:
        x = jnp.asarray(images, jnp.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got shape {x.shape}.")
        return np.asarray(self._apply(self.variables, x), np.float32)

