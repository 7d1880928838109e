"""CLIP score and CLIP image features (for FID_CLIP), from a local Hugging Face CLIP folder.

The folder is what ``CLIPModel.save_pretrained`` / ``huggingface-cli download`` writes:
``config.json`` plus ``flax_model.msgpack``, ``model.safetensors`` or ``pytorch_model.bin``
(the last needs torch); tokenizer files and ``preprocessor_config.json`` are used when present
(else SD's CLIP tokenizer from ``smooth_jax.models.tokenizer`` and OpenAI CLIP's preprocessing).
The model runs through transformers' Flax CLIP (``load_clip`` is the one place outside
``smooth_jax/models/`` that touches transformers' Flax classes; DESIGN §4 would put it there).

CLIP score (Hessel et al. 2021, torchmetrics' ``CLIPScore``): ``100 * max(cos(image_emb,
text_emb), 0)`` per pair, averaged. The paper's 31.46 -> 31.54 is on this 0-100 scale;
torchmetrics' default model, and the usual one for SD, is openai/clip-vit-large-patch14.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from smooth_jax.metrics.smoothness import to_unit_range
from smooth_jax.metrics.weights import MissingWeightsError, load_torch_state_dict, require_path

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_WEIGHT_FILES = ("flax_model.msgpack", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_WHAT = (
    "CLIP model folder (Hugging Face format: config.json + flax_model.msgpack, model.safetensors or "
    "pytorch_model.bin)"
)
_GET = (
    "the Hugging Face hub on a machine with network, e.g. "
    "`huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR` "
    "(or CLIPModel.from_pretrained(...).save_pretrained(DIR))"
)


def clip_preprocess(images, *, resize_to: int = 224, crop_to: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                    value_range: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """CLIP's image preprocessing in jnp: ``[B, 3, H, W]`` in ``value_range`` -> ``[B, 3, crop, crop]``
    normalised pixel values.

    As ``CLIPImageProcessor``: resize so the shorter side is ``resize_to`` (bicubic, antialiased
    when shrinking, like PIL), center crop ``crop_to`` (top/left offsets rounded down), then
    ``(x - mean) / std``. It differs from the processor only by the processor's uint8 rounding of
    the resized image (about 1/255 per pixel).
    """
    x = to_unit_range(images, value_range)
    b, c, h, w = x.shape
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(resize_to * long / short)
    new_h, new_w = (resize_to, new_long) if h <= w else (new_long, resize_to)
    if (new_h, new_w) != (h, w):
        x = jax.image.resize(x, (b, c, new_h, new_w), method="bicubic", antialias=True)
    top, left = (new_h - crop_to) // 2, (new_w - crop_to) // 2
    if top < 0 or left < 0:
        raise ValueError(f"crop {crop_to} is larger than the resized image {new_h}x{new_w}.")
    x = x[:, :, top : top + crop_to, left : left + crop_to]
    m = jnp.asarray(mean, x.dtype)[None, :, None, None]
    s = jnp.asarray(std, x.dtype)[None, :, None, None]
    return (x - m) / s


def _size(value, key: str) -> int:
    if isinstance(value, dict):
        return int(value.get(key) or value.get("height"))
    return int(value)


@dataclass
class CLIPModelBundle:
    """A loaded Flax CLIP: the transformers model object, its params, tokenizer and preprocessing."""

    model: Any
    params: Any
    tokenizer: Any
    resize_to: int
    crop_to: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_length: int
    source: str
    _image_fn: Any = field(default=None, repr=False)
    _text_fn: Any = field(default=None, repr=False)

    def __post_init__(self):
        model = self.model
        pre = dict(resize_to=self.resize_to, crop_to=self.crop_to, mean=self.mean, std=self.std)

        def image_fn(params, images):
            return model.get_image_features(clip_preprocess(images, **pre), params=params)

        def text_fn(params, input_ids, attention_mask):
            return model.get_text_features(input_ids, attention_mask=attention_mask, params=params)

        self._image_fn = jax.jit(image_fn)
        self._text_fn = jax.jit(text_fn)

    def image_features(self, images, value_range: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
        """Projected CLIP image embeddings (not normalised), float32: ``[B, 3, H, W]`` -> ``[B, E]``."""
        return self._image_fn(self.params, to_unit_range(images, value_range)).astype(jnp.float32)

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, both ``int32 [B, max_length]``: truncated to the text
        model's context (EOS kept), padded to it so every batch has one shape."""
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="np")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    def text_features(self, prompts: Sequence[str]) -> jax.Array:
        """Projected CLIP text embeddings (not normalised), float32: ``B prompts`` -> ``[B, E]``."""
        ids, mask = self.tokenize(prompts)
        return self._text_fn(self.params, ids, mask).astype(jnp.float32)


def _load_flax_clip(folder: Path, config, dtype, how: str):
    """``(FlaxCLIPModel, params)`` from the first weights file found in ``folder``.

    PyTorch weights go through transformers' own PyTorch->Flax key mapping, applied against the
    model's shape tree: building the model with ``_do_init=False`` skips a random init that takes
    tens of seconds on CPU.
    """
    import types

    from flax.traverse_util import flatten_dict
    from transformers import FlaxCLIPModel
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    present = [f for f in _WEIGHT_FILES if (folder / f).is_file()]
    if not present:
        raise MissingWeightsError(
            f"{_WHAT}: {folder} has no weights (looked for {', '.join(_WEIGHT_FILES)}). "
            f"Get them from {_GET}; pass the folder as {how}."
        )
    name = present[0]
    if name == "flax_model.msgpack":
        return FlaxCLIPModel.from_pretrained(
            str(folder), config=config, dtype=dtype, local_files_only=True, _do_init=False
        )
    model = FlaxCLIPModel(config, dtype=dtype, _do_init=False)
    if name == "pytorch_model.bin":
        state = load_torch_state_dict(folder / name, what="CLIP PyTorch weights")
    else:
        from safetensors.flax import load_file

        shards = [name]
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
    shapes = model.params_shape_tree
    params = convert_pytorch_state_dict_to_flax(
        state, types.SimpleNamespace(params=shapes, base_model_prefix=model.base_model_prefix)
    )
    want = {k: tuple(v.shape) for k, v in flatten_dict(shapes).items()}
    got = {k: tuple(v.shape) for k, v in flatten_dict(params).items()}
    if want != got:
        missing = sorted("/".join(k) for k in set(want) - set(got))[:5]
        extra = sorted("/".join(k) for k in set(got) - set(want))[:5]
        raise ValueError(f"{folder / name} does not fit the CLIP config: missing {missing}, unexpected {extra}.")
    return model, params


def load_clip(
    path: str | os.PathLike, *, dtype=jnp.float32, how: str = "CLIPScorer.from_pretrained(path)"
) -> CLIPModelBundle:
    """Load a local Hugging Face CLIP folder (see module docstring) into a ``CLIPModelBundle``.

    Raises ``MissingWeightsError`` naming the folder/file that is missing and where to get it.
    """
    from transformers import CLIPConfig, CLIPTokenizerFast

    folder = require_path(path, what=_WHAT, get=_GET, how=how, is_dir=True)
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(
            f"{_WHAT}: {folder / 'config.json'} is missing. Get the folder from {_GET}; pass it as {how}."
        )
    config = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
    model, params = _load_flax_clip(folder, config, dtype, how)

    if any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        tokenizer = CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    else:
        from smooth_jax.models.tokenizer import load_clip_tokenizer

        tokenizer = load_clip_tokenizer()

    pre: dict = {}
    if (folder / "preprocessor_config.json").is_file():
        pre = json.loads((folder / "preprocessor_config.json").read_text())
    image_size = int(config.vision_config.image_size)
    return CLIPModelBundle(
        model=model,
        params=jax.tree_util.tree_map(jnp.asarray, params),
        tokenizer=tokenizer,
        resize_to=_size(pre.get("size", image_size), "shortest_edge"),
        crop_to=_size(pre.get("crop_size", image_size), "height"),
        mean=tuple(pre.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(pre.get("image_std", OPENAI_CLIP_STD)),
        max_length=int(config.text_config.max_position_embeddings),
        source=str(folder),
    )


def clip_score_from_embeddings(image_embeds, text_embeds) -> jax.Array:
    """``100 * max(cos(image_emb, text_emb), 0)`` per pair: ``[B, E] x2 -> [B]``, in [0, 100]."""
    i = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
    t = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    return 100.0 * jnp.maximum(jnp.sum(i * t, axis=-1), 0.0)


class CLIPScorer:
    """CLIP score of (image, prompt) pairs with a local CLIP model, torchmetrics' definition.

    ``scores(images [B,3,H,W] in [0,1], prompts: B strings) -> [B]`` in [0, 100];
    ``__call__`` returns their mean (a float, the number papers report: 31.5 for SD-1.5).
    Prompts longer than the text context (77 tokens) are truncated, keeping the EOS token.
    """

    def __init__(self, bundle: CLIPModelBundle):
        self.bundle = bundle

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32) -> "CLIPScorer":
        """From a local Hugging Face CLIP folder (e.g. openai/clip-vit-large-patch14)."""
        return cls(load_clip(path, dtype=dtype, how="CLIPScorer.from_pretrained(path)"))

    def scores(self, images, prompts: Sequence[str], value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
        """Per-pair CLIP scores ``[B]`` in [0, 100] for images ``[B, 3, H, W]`` and B prompts."""
        if len(prompts) != np.shape(images)[0]:
            raise ValueError(f"{np.shape(images)[0]} images but {len(prompts)} prompts.")
        img = self.bundle.image_features(images, value_range)
        txt = self.bundle.text_features(prompts)
        return np.asarray(clip_score_from_embeddings(img, txt))

    def __call__(self, images, prompts: Sequence[str], value_range: tuple[float, float] = (0.0, 1.0)) -> float:
        """The mean CLIP score of the batch (0-100 scale)."""
        return float(np.mean(self.scores(images, prompts, value_range)))


class CLIPImageFeatures:
    """``FeatureExtractor`` for FID_CLIP: projected CLIP image embeddings (``get_image_features``,
    not normalised), ``[B, 3, H, W]`` in [0, 1] -> ``[B, E]`` float32 numpy.

    FID on these is FID_CLIP (Kynkäänniemi et al. 2023, who use ViT-B/32), not the Inception FID;
    ``name`` says which folder it came from.
    """

    def __init__(self, bundle: CLIPModelBundle):
        self.bundle = bundle
        self.name = f"FID_CLIP (CLIP image embeddings, {Path(bundle.source).name})"

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32) -> "CLIPImageFeatures":
        """From a local Hugging Face CLIP folder (e.g. openai/clip-vit-base-patch32)."""
        return cls(load_clip(path, dtype=dtype, how="CLIPImageFeatures.from_pretrained(path)"))

    def __call__(self, images) -> np.ndarray:
        return np.asarray(self.bundle.image_features(images), np.float32)
