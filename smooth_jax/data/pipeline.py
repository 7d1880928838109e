"""The training input pipeline: source -> grain ``DataLoader`` -> per-host numpy batches.

    it = make_train_iterator(data_config, tokenizer, global_batch_size=96, seed=0)
    batch = next(it)  # {"images": float32 [b, 3, S, S] in [-1, 1], "input_ids": int32 [b, 77]}

``b = global_batch_size // process_count``; the trainer assembles global arrays from the
per-host batches. With ``data_config.cache_dir`` set, batches are instead ``{"latents": float32
[b, 4, h, w], "context": float32 [b, 77, D]}`` read from a cache built by
:func:`smooth_jax.data.cache.cache_encodings`.

Order and sharding (grain 0.2.18 ``IndexSampler``): the records are split into
``process_count`` contiguous, equal shards (``ShardOptions(process_index, process_count,
drop_remainder=True)``; up to ``process_count - 1`` trailing records are never read), each host
shuffles its own shard with a new permutation every epoch, and the iterator never ends. Random
crops draw from a generator grain seeds with ``seed`` + the record's global read position, so
they are reproducible and change every epoch. With ``num_workers = W > 0`` each of W worker
processes builds whole batches from every W-th record, so the batch order depends on W.
Bad records skipped under ``on_bad="skip"`` are filtered out before batching.

Checkpointing: ``BatchIterator.get_state() -> bytes`` (grain's JSON: the last sampler index
each worker consumed, plus ``repr`` of sampler and source) and ``set_state(bytes | str | dict)``
on a freshly built iterator with the same config, seed, ``num_workers`` and process layout
restore the exact following batches, crops included; grain rejects a state whose sampler or
source ``repr`` differs. With orbax (0.12.x) grain registers an orbax ``CheckpointHandler``
(``grain.checkpoint.CheckpointHandler``), so a ``BatchIterator`` goes into a
``CheckpointManager`` as a named item::

    import grain, orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(workdir, item_names=(..., "data_iter"))
    mngr.save(step, args=ocp.args.Composite(..., data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(..., data_iter=grain.checkpoint.CheckpointRestore(it)))

(``grain.python.PyGrainCheckpointSave``/``PyGrainCheckpointRestore`` are the same classes under
their older names.) The handler writes one ``process_<i>-of-<n>.json`` per host from
``get_state().decode()`` and restores with ``set_state`` then ``start_prefetch``; the host's
index and count come from ``jax.process_index()/process_count()``.
"""

from __future__ import annotations

import json

import grain
import ml_collections
import numpy as np

from smooth_jax.data import transforms
from smooth_jax.data.cache import CachedSource
from smooth_jax.data.sources import DigitsSource, ImageFolderSource, TfdsSource

SOURCES = ("digits", "folder", "tfds")


def default_data_config() -> ml_collections.ConfigDict:
    """Every field of ``config.data``, with the defaults used by tests and the tiny setting."""
    c = ml_collections.ConfigDict()
    c.source = "digits"  # "digits" | "folder" | "tfds"
    c.path = ""  # folder with metadata.jsonl, or the TFDS data_dir
    c.tfds_name = ""  # e.g. "coco_captions"; empty with source="tfds": path is the version folder
    c.split = "train"  # TFDS split, slicing allowed ("train[:1000]")
    c.image_key = "image"  # TFDS image feature ("a/b" for nested)
    c.caption_key = "caption"  # TFDS caption feature; for folders tried before "caption"/"text"
    c.resolution = 32  # output side S; the authors train at 512
    c.center_crop = False  # False: random crop, as the authors
    c.on_bad = "skip"  # "skip" | "raise"
    c.num_workers = 0  # grain worker processes; 0 = read in this process
    c.shuffle = True
    c.cache_dir = ""  # a cache_encodings() folder; "" = encode images and captions every step
    return c


def make_source(data_config):
    """The image-caption source the config names (``cache_dir`` is not considered here)."""
    c = data_config
    if c.source == "digits":
        return DigitsSource(on_bad=c.on_bad)
    if c.source == "folder":
        if not c.path:
            raise ValueError("data.source='folder' needs data.path (the folder with metadata.jsonl)")
        keys = tuple(dict.fromkeys(k for k in (c.caption_key, "caption", "text") if k))
        return ImageFolderSource(c.path, on_bad=c.on_bad, caption_keys=keys)
    if c.source == "tfds":
        return TfdsSource(
            c.tfds_name,
            c.split,
            c.path or None,
            image_key=c.image_key,
            caption_key=c.caption_key,
            on_bad=c.on_bad,
        )
    raise ValueError(f"data.source must be one of {SOURCES}, got {c.source!r}")


class BatchIterator:
    """Iterator over per-host batches whose position can be saved and restored.

    ``get_state()`` returns bytes (grain's JSON state); ``set_state`` takes that, or its str or
    parsed-dict form. ``start_prefetch`` is what grain's orbax handler calls after a restore.
    ``source`` is the underlying source (its ``bad_count``/``bad_records`` for the skip policy).
    """

    def __init__(self, loader: grain.DataLoader, source, local_batch_size: int):
        self._loader = loader
        self._it = iter(loader)
        self.source = source
        self.local_batch_size = local_batch_size

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> bytes:
        return self._it.get_state()

    def set_state(self, state: bytes | str | dict) -> None:
        if isinstance(state, dict):
            state = json.dumps(state)
        if isinstance(state, str):
            state = state.encode()
        self._it.set_state(state)

    def start_prefetch(self) -> None:
        self._it.start_prefetch()

    def close(self) -> None:
        """Stop grain's worker processes and free their shared memory (no-op in-process)."""
        # DataLoaderIterator has no public close(); its dataset iterator has.
        close = getattr(getattr(self._it, "_iterator", None), "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def bad_count(self) -> int:
        """Distinct bad records skipped so far, as counted in this process (see sources.py)."""
        return self.source.bad_count

    @property
    def bad_records(self) -> dict[str, str]:
        return self.source.bad_records


def _record_ops(data_config, tokenizer, source) -> list:
    if isinstance(source, CachedSource):
        return []
    ops = [transforms.DropSkipped()] if data_config.on_bad == "skip" else []
    ops += transforms.image_transforms(data_config.resolution, data_config.center_crop)
    return ops + [transforms.ToModelInputs(tokenizer)]


def _loader(source, sampler, ops, num_workers: int, shard=None) -> grain.DataLoader:
    if num_workers > 0:
        # grain 0.2.18 reads an absl flag when it starts worker processes and fails unless flags
        # were parsed (google/grain#1355, fixed after 0.2.18). Scripts run under absl.app have
        # parsed them; elsewhere mark the defaults as parsed.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(
        data_source=source, sampler=sampler, operations=ops, worker_count=num_workers, shard_options=shard
    )


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < 2**32:  # grain's IndexSampler takes a non-negative 32-bit seed
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return seed


def make_train_iterator(
    data_config,
    tokenizer,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """Infinite, sharded, checkpointable iterator of this host's batches (see module docstring).

    ``process_index``/``process_count`` default to ``jax.process_index()``/``process_count()``.
    ``tokenizer`` may be None when ``data_config.cache_dir`` is set.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
    local_batch = global_batch_size // process_count
    source = CachedSource(data_config.cache_dir) if data_config.cache_dir else make_source(data_config)
    shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True)
    if len(source) < process_count:
        raise ValueError(f"{source!r} has fewer records than the {process_count} processes to shard it over")
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=shard,
        shuffle=bool(data_config.shuffle),
        num_epochs=None,  # repeat forever, reshuffled each epoch
        seed=_check_seed(seed),  # also seeds the per-record rng of RandomCrop
    )
    ops = _record_ops(data_config, tokenizer, source)
    ops.append(grain.transforms.Batch(batch_size=local_batch, drop_remainder=True))
    loader = _loader(source, sampler, ops, int(data_config.num_workers), shard)
    return BatchIterator(loader, source, local_batch)


def make_single_pass_iterator(data_config, tokenizer, *, batch_size: int, seed: int = 0) -> BatchIterator:
    """Every (good) record once, in source order, last batch possibly short; one process.

    For building a cache with :func:`cache_encodings` or for evaluation. ``seed`` only matters
    for random crops.
    """
    source = make_source(data_config)
    sampler = grain.samplers.IndexSampler(num_records=len(source), shuffle=False, num_epochs=1, seed=_check_seed(seed))
    ops = _record_ops(data_config, tokenizer, source)
    ops.append(grain.transforms.Batch(batch_size=batch_size, drop_remainder=False))
    loader = _loader(source, sampler, ops, int(data_config.num_workers))
    return BatchIterator(loader, source, batch_size)
