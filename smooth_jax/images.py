"""Images out of the model, onto disk: uint8 conversion, PNG grids and GIFs, written atomically.

Model images are NCHW float in [-1, 1] (``StableDiffusion.decode_latents``); files are HWC uint8.
Every writer takes either form.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from smooth_jax.fileio import atomic_write


def to_uint8(images) -> np.ndarray:
    """``[N, 3, H, W]`` float in [-1, 1] -> ``uint8 [N, H, W, 3]``.

    As diffusers' postprocessing: ``clip(x / 2 + 0.5, 0, 1) * 255``, rounded to nearest.
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got shape {x.shape}.")
    x = np.clip(x / 2.0 + 0.5, 0.0, 1.0)
    return np.round(x * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def _as_hwc_uint8(images) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` passes through; anything else is float NCHW in [-1, 1]."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be [N, H, W, 3], got shape {x.shape}.")
        return x
    return to_uint8(x)


def make_grid(images, nrow: int, padding: int = 0, fill: int = 255) -> np.ndarray:
    """Tile N images into one ``uint8 [rows*H + pad, nrow*W + pad, 3]`` array, row-major.

    ``nrow`` images per row (torchvision's convention); ``rows = ceil(N / nrow)``; empty cells and
    the ``padding`` pixels between and around cells are ``fill``.
    """
    x = _as_hwc_uint8(images)
    n, h, w, _ = x.shape
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}.")
    ncol = min(nrow, n)
    rows = -(-n // nrow)
    grid = np.full((rows * (h + padding) + padding, ncol * (w + padding) + padding, 3), fill, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        y0, x0 = padding + r * (h + padding), padding + c * (w + padding)
        grid[y0 : y0 + h, x0 : x0 + w] = x[i]
    return grid


def save_grid(images, path: str | os.PathLike, nrow: int, padding: int = 0) -> Path:
    """Write ``images`` as one PNG grid at ``path`` (see ``make_grid``), atomically; creates parent folders."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(make_grid(images, nrow, padding)).save(buf, format="PNG")
    path = Path(path)
    atomic_write(path, buf.getvalue())
    return path


def save_gif(frames, path: str | os.PathLike, duration_ms: int = 100, loop: int = 0) -> Path:
    """Write ``frames`` (``[N, ...]`` as ``to_uint8`` takes, or uint8 ``[N, H, W, 3]``) as an animated GIF.

    duration_ms: display time of each frame; loop: 0 repeats forever. Atomic; creates parent folders.
    GIF has a 256-colour palette per frame, so pixels are quantized: use PNG for exact values.
    """
    from PIL import Image

    pics = [Image.fromarray(f) for f in _as_hwc_uint8(frames)]
    if not pics:
        raise ValueError("save_gif needs at least one frame.")
    buf = io.BytesIO()
    pics[0].save(buf, format="GIF", save_all=True, append_images=pics[1:], duration=int(duration_ms), loop=loop)
    path = Path(path)
    atomic_write(path, buf.getvalue())
    return path


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """An image file -> float32 ``[3, size, size]`` in [-1, 1], the model's input.

    Preprocessed as the training data (``data.transforms``, the authors' torchvision chain with a
    centre crop): any PIL mode to RGB (EXIF rotation applied, 16-bit grey scaled), shorter side
    resized to ``size`` (PIL bilinear), centre-cropped to ``size`` x ``size``, ``x / 127.5 - 1``.
    Raises FileNotFoundError for a missing file and ValueError naming ``path`` for an unreadable one.
    """
    from smooth_jax.data import sources, transforms

    path = Path(path)
    if not path.is_file():
        what = "is a folder, not an image file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"image {str(path)!r} {what}.")
    if size < 1:
        raise ValueError(f"image size must be >= 1, got {size}.")
    try:
        rgb = sources.decode_image(str(path), str(path))
    except sources.BadRecordError as e:
        raise ValueError(f"image {str(path)!r}: {e.reason}.") from None
    rgb = transforms.resize_shorter_side(rgb, size)
    top, left = transforms.center_crop_offsets(rgb.shape[0], rgb.shape[1], size)
    return transforms.to_model_image(transforms.crop(rgb, top, left, size))
