"""Input pipelines (grain): image-caption sources, preprocessing, sharded checkpointable batches.

``make_train_iterator`` is the entry point; see ``pipeline.py`` for the batch contract, sharding
and checkpointing (including orbax), ``sources.py`` for the bad-record policy and ``cache.py``
for cached VAE latents / text embeddings.
"""

from smooth_jax.data.cache import CachedSource, cache_encodings
from smooth_jax.data.pipeline import (
    BatchIterator,
    default_data_config,
    make_single_pass_iterator,
    make_source,
    make_train_iterator,
)
from smooth_jax.data.sources import BadRecordError, DigitsSource, ImageFolderSource, TfdsSource

__all__ = [
    "BadRecordError",
    "BatchIterator",
    "CachedSource",
    "DigitsSource",
    "ImageFolderSource",
    "TfdsSource",
    "cache_encodings",
    "default_data_config",
    "make_single_pass_iterator",
    "make_source",
    "make_train_iterator",
]
