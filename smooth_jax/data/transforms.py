"""Per-record preprocessing, as the authors' training script does it.

Their torchvision chain is ``Resize(res, BILINEAR) -> RandomCrop(res) | CenterCrop(res) ->
ToTensor() -> Normalize([0.5], [0.5])`` on a PIL image, and captions tokenized to 77 ids. The
functions here reproduce each step on numpy (resizing with PIL, as torchvision does for PIL
input), and the classes wrap them as grain transformations:

    record {"image": uint8 [H,W,3], "caption": str, ...}
      -> ResizeShorterSide -> RandomCrop | CenterCrop
      -> ToModelInputs -> {"images": float32 [3,S,S] in [-1,1], "input_ids": int32 [77]}

``RandomCrop`` is a ``grain.transforms.RandomMap``: grain hands it a generator seeded from the
sampler seed and the record's position in the (global, multi-epoch) read order, so crops are
reproducible after a restore and differ between epochs.
"""

from __future__ import annotations

import grain
import numpy as np
from PIL import Image

from smooth_jax.models.tokenizer import tokenize


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side ``size``; the longer one truncated as torchvision's
    ``Resize(int)`` computes it: ``int(size * long / short)``."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3] with min(h, w) == size, PIL bilinear (antialiased)."""
    new_h, new_w = resized_size(image.shape[0], image.shape[1], size)
    if (new_h, new_w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop``: ``int(round((dim - size) / 2))``."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def random_crop_offsets(height: int, width: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) uniform over every crop that fits, as torchvision's ``RandomCrop``."""
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def crop(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    return image[top : top + size, left : left + size]


def to_model_image(image: np.ndarray) -> np.ndarray:
    """uint8 [S, S, 3] -> float32 [3, S, S] in [-1, 1] (``ToTensor`` then ``Normalize(0.5, 0.5)``)."""
    return (np.transpose(image, (2, 0, 1)).astype(np.float32) / 127.5 - 1.0).astype(np.float32)


class ResizeShorterSide(grain.transforms.Map):
    def __init__(self, resolution: int):
        self.resolution = int(resolution)

    def map(self, record: dict) -> dict:
        return {**record, "image": resize_shorter_side(record["image"], self.resolution)}


class CenterCrop(grain.transforms.Map):
    def __init__(self, resolution: int):
        self.resolution = int(resolution)

    def map(self, record: dict) -> dict:
        img = record["image"]
        top, left = center_crop_offsets(img.shape[0], img.shape[1], self.resolution)
        return {**record, "image": crop(img, top, left, self.resolution)}


class RandomCrop(grain.transforms.RandomMap):
    def __init__(self, resolution: int):
        self.resolution = int(resolution)

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        img = record["image"]
        top, left = random_crop_offsets(img.shape[0], img.shape[1], self.resolution, rng)
        return {**record, "image": crop(img, top, left, self.resolution)}


class ToModelInputs(grain.transforms.Map):
    """Record -> ``{"images": float32 [3,S,S], "input_ids": int32 [77]}`` (the batch contract)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def map(self, record: dict) -> dict:
        return {
            "images": to_model_image(record["image"]),
            "input_ids": tokenize(self.tokenizer, [record["caption"]])[0],
        }


class DropSkipped(grain.transforms.Filter):
    """Drops the ``None`` that sources return for records skipped as bad."""

    def filter(self, record) -> bool:
        return record is not None


def image_transforms(resolution: int, center_crop: bool) -> list:
    """Resize then crop, as a list of grain transformations."""
    return [ResizeShorterSide(resolution), CenterCrop(resolution) if center_crop else RandomCrop(resolution)]
