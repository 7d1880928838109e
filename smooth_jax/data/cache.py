"""One-time caching of VAE latents and text-encoder outputs, and a source that reads them back.

With the VAE and text encoder frozen, each training step recomputes the same encodings; caching
them once trades disk for that compute. The cost: the image crop (and, if ``encode_fn`` samples
the VAE posterior, its noise) is frozen at caching time, so build the cache with
``center_crop=True`` or accept one fixed random crop per image.

Layout of a cache folder::

    meta.json      {"format": 1, "num_records": N, "latents_shape": [4, h, w],
                    "context_shape": [77, D], "dtype": "float32"}
    latents.bin    float32 little-endian [N, 4, h, w], C order
    context.bin    float32 little-endian [N, 77, D], C order

Raw arrays plus a JSON header, so writing streams batch by batch (N is not known up front) and
reading is a ``np.memmap``: random access without loading the cache into memory. The cache is
written by one process over the whole dataset; every host then reads its own shard of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

FORMAT_VERSION = 1
_DTYPE = np.dtype("<f4")


def cache_encodings(
    batches: Iterable[dict],
    encode_fn: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    out_path: str | os.PathLike,
) -> int:
    """Encode every batch once and write the cache folder ``out_path``; returns N.

    ``batches``: a finite iterable of ``{"images": [b,3,S,S], "input_ids": [b,77]}``, e.g.
    ``pipeline.make_single_pass_iterator(...)``. ``encode_fn(images, input_ids) -> (latents
    [b,4,h,w], context [b,77,D])`` is given by the trainer (VAE latent x 0.18215, text encoder
    hidden states). The folder is written under a temporary name and renamed into place, so an
    interrupted run never leaves a cache that looks complete.
    """
    out = Path(out_path)
    if out.exists():
        raise FileExistsError(f"cache {out} already exists; remove it to rebuild")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    n, shapes = 0, None
    try:
        with open(tmp / "latents.bin", "wb") as f_lat, open(tmp / "context.bin", "wb") as f_ctx:
            for batch in batches:
                latents, context = encode_fn(batch["images"], batch["input_ids"])
                latents, context = np.asarray(latents, _DTYPE), np.asarray(context, _DTYPE)
                b = len(batch["images"])
                if latents.shape[0] != b or context.shape[0] != b:
                    raise ValueError(
                        f"encode_fn returned {latents.shape[0]} latents and {context.shape[0]} contexts for a batch of {b}"
                    )
                if shapes is None:
                    shapes = (latents.shape[1:], context.shape[1:])
                elif (latents.shape[1:], context.shape[1:]) != shapes:
                    raise ValueError(
                        f"encode_fn output shapes changed: {shapes} then {(latents.shape[1:], context.shape[1:])}"
                    )
                f_lat.write(np.ascontiguousarray(latents).tobytes())
                f_ctx.write(np.ascontiguousarray(context).tobytes())
                n += b
        if n == 0:
            raise ValueError("no batches to cache")
        meta = {
            "format": FORMAT_VERSION,
            "num_records": n,
            "latents_shape": list(shapes[0]),
            "context_shape": list(shapes[1]),
            "dtype": "float32",
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return n


class CachedSource:
    """Random-access source over a cache folder: records ``{"latents": float32 [4,h,w],
    "context": float32 [77,D]}``. Memmaps open lazily, so the source pickles into grain workers.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: not a cache written by cache_encodings")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{meta_file}: unknown cache format {self.meta.get('format')!r}")
        n = self.meta["num_records"]
        self._shapes = {
            "latents": (n, *self.meta["latents_shape"]),
            "context": (n, *self.meta["context_shape"]),
        }
        for name, shape in self._shapes.items():
            expected = int(np.prod(shape)) * _DTYPE.itemsize
            size = (self.path / f"{name}.bin").stat().st_size
            if size != expected:
                raise ValueError(f"{self.path / (name + '.bin')} has {size} bytes, meta.json implies {expected}")
        self._arrays: dict[str, np.memmap] | None = None
        self.bad_records: dict[str, str] = {}  # same interface as the image sources
        self.bad_count = 0

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return self.meta["num_records"]

    def __repr__(self) -> str:
        return f"CachedSource(path={str(self.path)!r}, num_records={len(self)})"

    def __getitem__(self, index) -> dict:
        if self._arrays is None:
            self._arrays = {
                name: np.memmap(self.path / f"{name}.bin", dtype=_DTYPE, mode="r", shape=shape)
                for name, shape in self._shapes.items()
            }
        i = int(index)
        return {name: np.array(arr[i], dtype=np.float32) for name, arr in self._arrays.items()}
