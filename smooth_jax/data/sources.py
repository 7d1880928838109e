"""Random-access image-caption sources: TFDS datasets, image folders, scikit-learn digits.

Every source is a grain ``RandomAccessDataSource`` (``__len__`` + ``__getitem__``) whose records
are ``{"image": uint8 [H, W, 3] RGB, "caption": str, "path": str}``. ``path`` names the record for
error messages: a file path for folders, ``tfds:<name>/<split>[<i>]`` for TFDS, ``digits[<i>]``.

Bad records (missing or unreadable file, corrupt image, missing caption, an image mode PIL cannot
turn into RGB, a bad ``metadata.jsonl`` line) follow the ``on_bad`` policy:

- ``"raise"``: raise :class:`BadRecordError`, whose message names the path (``file:line`` for
  metadata lines) and the reason;
- ``"skip"``: ``__getitem__`` returns ``None`` (the pipeline filters it out), the path and reason
  are recorded in ``bad_records`` (``bad_count`` distinct records, ``skipped_reads`` reads in all,
  since a bad record is met again each epoch) and a warning naming the path is logged once.

The counters live in the process that reads: with ``num_workers > 0`` each grain worker holds
its own copy of the source, so the main process's counters stay at 0 (the warnings still name
every path, once per worker).

``__repr__`` is deterministic on purpose: grain stores ``repr(data_source)`` in the iterator
state and refuses to restore a state into a loader whose source has a different repr.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

ON_BAD = ("skip", "raise")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class BadRecordError(ValueError):
    """A record that cannot be used; ``path`` names it, ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"bad record {path}: {reason}")
        self.path = path
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Decoding


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def image_to_rgb(img: Image.Image, path: str) -> np.ndarray:
    """A PIL image of any mode -> uint8 [H, W, 3] RGB, or :class:`BadRecordError`.

    Like the authors' ``Image.open(p).convert("RGB")``: alpha is dropped, palette, grayscale,
    CMYK and YCbCr are converted by PIL. 16-bit grayscale (``I;16``/``I``, e.g. 16-bit PNG) is
    scaled by 255/65535 first, because PIL's own conversion clips it to 255 (a white image).
    Float images (mode ``F``) have no defined 0..255 range and are reported as bad.
    """
    try:
        img.load()
        img = ImageOps.exif_transpose(img)  # phone photos store their rotation in EXIF
        if img.mode in _SIXTEEN_BIT_MODES:
            arr = np.asarray(img).astype(np.int64)
            if arr.min() < 0 or arr.max() > 65535:
                raise BadRecordError(path, f"{img.mode} image with values outside 0..65535")
            gray = np.round(arr * (255.0 / 65535.0)).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=-1)
        if img.mode == "F":
            raise BadRecordError(path, "32-bit float image (mode F) has no defined 0..255 range")
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except BadRecordError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise BadRecordError(path, f"unreadable image ({type(e).__name__}: {e})") from e
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise BadRecordError(path, f"image has unusable shape {rgb.shape}")
    return rgb


def decode_image(data: bytes | str | os.PathLike, path: str) -> np.ndarray:
    """Encoded bytes or a file path -> uint8 [H, W, 3] RGB, or :class:`BadRecordError`."""
    try:
        fp = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        with Image.open(fp) as img:
            return image_to_rgb(img, path)
    except BadRecordError:
        raise
    except FileNotFoundError as e:
        raise BadRecordError(path, "file not found") from e
    except (OSError, ValueError, SyntaxError, EOFError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise BadRecordError(path, f"unreadable image ({type(e).__name__}: {e})") from e


def caption_to_str(value: Any) -> str | None:
    """A caption feature -> str; lists/arrays give their first element, bytes are UTF-8 decoded.

    ``None`` when there is no usable caption (missing, empty, not text).
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", errors="replace")
    if not isinstance(value, str) or not value.strip():
        return None
    return value


# --------------------------------------------------------------------------------------------
# The bad-record policy, shared by every source


class ImageCaptionSource:
    """Base class: ``_read(index)`` returns a record or raises :class:`BadRecordError`."""

    def __init__(self, on_bad: str = "skip"):
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
        self.on_bad = on_bad
        self.bad_records: dict[str, str] = {}  # path -> reason, in the order they were met
        self.skipped_reads = 0
        self._unreadable: set[int] = set()  # indices that failed in _read
        self._lock = threading.Lock()  # grain reads records from a thread pool

    # Locks do not pickle; grain pickles the source into its worker processes.
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def bad_count(self) -> int:
        """Distinct bad records met so far (metadata lines included)."""
        return len(self.bad_records)

    def __len__(self) -> int:
        raise NotImplementedError

    def _read(self, index: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, index) -> dict | None:
        index = int(index)
        try:
            return self._read(index)
        except BadRecordError as err:
            self._report(err, index)
            return None

    def _report(self, err: BadRecordError, index: int | None = None) -> None:
        """Raise, or record + warn once per path (``index`` None: found before reading)."""
        if self.on_bad == "raise":
            raise err
        with self._lock:
            if index is not None:
                self.skipped_reads += 1
                self._unreadable.add(index)
            first = err.path not in self.bad_records
            if first:
                self.bad_records[err.path] = err.reason
            all_bad = len(self._unreadable) >= len(self)
        if first:
            log.warning("skipping bad record %s: %s", err.path, err.reason)
        if all_bad:  # otherwise an infinite pipeline would spin forever without a batch
            raise RuntimeError(f"every record of {self!r} is bad; the last: {err}")


# --------------------------------------------------------------------------------------------
# Sources


def _get_nested(example: dict, key: str) -> Any:
    """``example["captions"]["text"]`` for key ``"captions/text"``; KeyError names the key."""
    value: Any = example
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def _feature_at(features: Any, key: str) -> Any:
    """The tfds feature at a nested key; a ``Sequence`` is looked through to its element."""
    for part in key.split("/"):
        features = getattr(features, "feature", features)  # tfds.features.Sequence wraps one
        features = features[part]
    return features


def _nest(key: str, leaf: Any) -> dict:
    """``{"a": {"b": leaf}}`` for key ``"a/b"`` (the shape tfds ``decoders=`` expects)."""
    out: Any = leaf
    for part in reversed(key.split("/")):
        out = {part: out}
    return out


class TfdsSource(ImageCaptionSource):
    """A prepared TFDS dataset (array_record files), read without TensorFlow.

    ``name`` (e.g. ``"coco_captions"``, ``"my_set/config:1.0.0"``) is looked up in ``data_dir``
    with ``tfds.data_source``; with an empty ``name``, ``data_dir`` is the dataset's version
    folder (the one holding ``dataset_info.json``) and is read with
    ``tfds.builder_from_directory``. The image feature is read undecoded
    (``tfds.decode.SkipDecoding``) and decoded with PIL, so every source shares one decoder and
    one bad-record policy. ``image_key``/``caption_key`` may be nested (``"captions/text"``);
    a sequence of captions gives its first.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
        *,
        image_key: str = "image",
        caption_key: str = "caption",
        on_bad: str = "skip",
    ):
        super().__init__(on_bad)
        import tensorflow_datasets as tfds  # heavy; only when a TFDS source is used

        self.name, self.split, self.data_dir = name, split, str(data_dir) if data_dir else ""
        self.image_key, self.caption_key = image_key, caption_key
        decoders = _nest(image_key, tfds.decode.SkipDecoding())
        if name:
            builder = tfds.builder(name, data_dir=self.data_dir or None)
        elif self.data_dir:
            builder = tfds.builder_from_directory(self.data_dir)
        else:
            raise ValueError("TfdsSource needs a dataset name or the dataset's data_dir")
        features = builder.info.features
        for key in (image_key, caption_key):
            try:
                _feature_at(features, key)
            except (KeyError, TypeError):
                raise KeyError(
                    f"TFDS dataset {name or self.data_dir!r} has no feature {key!r}; its features: {features}"
                ) from None
        self._ds = builder.as_data_source(split=split, decoders=decoders)
        self._label = f"tfds:{name or self.data_dir}/{split}"

    def __len__(self) -> int:
        return len(self._ds)

    def __repr__(self) -> str:
        return (
            f"TfdsSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, "
            f"image_key={self.image_key!r}, caption_key={self.caption_key!r}, num_records={len(self)})"
        )

    def _read(self, index: int) -> dict:
        path = f"{self._label}[{index}]"
        try:
            example = self._ds[index]
        except Exception as e:  # a corrupt record fails inside tfds with any exception type
            raise BadRecordError(path, f"unreadable record ({type(e).__name__}: {e})") from e
        caption = caption_to_str(_get_nested(example, self.caption_key))
        if caption is None:
            raise BadRecordError(path, f"missing caption ({self.caption_key!r})")
        raw = _get_nested(example, self.image_key)
        if isinstance(raw, np.ndarray) and raw.dtype != object:  # stored as a raw tensor
            image = image_to_rgb(
                Image.fromarray(raw.squeeze(-1) if raw.ndim == 3 and raw.shape[-1] == 1 else raw), path
            )
        else:
            image = decode_image(bytes(raw), path)
        return {"image": image, "caption": caption, "path": path}


class ImageFolderSource(ImageCaptionSource):
    """A folder of images plus ``metadata.jsonl`` (the diffusers / authors' convention).

    Each line is a JSON object ``{"file_name": <path relative to folder>, "caption": <text>}``;
    ``caption_keys`` are tried in order (default ``caption``, then ``text``). Metadata problems
    (bad JSON, no ``file_name``, no caption) are found here, at construction, and are named
    ``<metadata.jsonl>:<line>``; missing or corrupt image files are found when read.
    Images without a metadata line are not used.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        on_bad: str = "skip",
        caption_keys: Sequence[str] = ("caption", "text"),
        metadata_name: str = "metadata.jsonl",
    ):
        super().__init__(on_bad)
        self.folder = Path(folder)
        self.metadata = self.folder / metadata_name
        if not self.metadata.is_file():
            raise FileNotFoundError(
                f"{self.metadata} not found: an image folder needs a {metadata_name} with one "
                '{"file_name": ..., "caption": ...} object per line'
            )
        self.caption_keys = tuple(caption_keys)
        self.entries: list[tuple[str, str]] = []  # (image path, caption)
        with open(self.metadata, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    self.entries.append(self._parse_line(line, lineno))
                except BadRecordError as err:
                    self._report(err)
        if not self.entries:
            raise ValueError(f"{self.metadata} lists no usable image-caption pairs")

    def _parse_line(self, line: str, lineno: int) -> tuple[str, str]:
        where = f"{self.metadata}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadRecordError(where, f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise BadRecordError(where, f"expected a JSON object, got {type(obj).__name__}")
        file_name = obj.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise BadRecordError(where, "no 'file_name'")
        path = str(self.folder / file_name)
        caption = next((c for c in (caption_to_str(obj.get(k)) for k in self.caption_keys) if c is not None), None)
        if caption is None:
            raise BadRecordError(path, f"missing caption (no non-empty {' / '.join(self.caption_keys)} at {where})")
        return path, caption

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"ImageFolderSource(metadata={str(self.metadata)!r}, num_records={len(self)})"

    def _read(self, index: int) -> dict:
        path, caption = self.entries[index]
        return {"image": decode_image(path, path), "caption": caption, "path": path}


class DigitsSource(ImageCaptionSource):
    """scikit-learn's bundled ``load_digits()``: 1797 real 8x8 handwritten digits.

    Pixel values 0..16 are scaled to 0..255 (``round(v * 255 / 16)``) and repeated to RGB; the
    caption is ``"a handwritten digit <name>"`` (zero..nine).
    """

    def __init__(self, on_bad: str = "skip"):
        super().__init__(on_bad)
        from sklearn.datasets import load_digits

        digits = load_digits()
        gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
        self.images = np.repeat(gray[..., None], 3, axis=-1)  # [N, 8, 8, 3]
        self.labels = digits.target.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"DigitsSource(num_records={len(self)})"

    def _read(self, index: int) -> dict:
        caption = f"a handwritten digit {DIGIT_NAMES[self.labels[index]]}"
        return {"image": self.images[index], "caption": caption, "path": f"digits[{index}]"}
