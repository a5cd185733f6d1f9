"""ghindex: image retrieval with learned binary codes (GreedyHash), HDF5 code stores and FAISS.

Layers. A module imports only from its own layer and the layers below it, at module level and inside
functions alike, and no two modules import each other, even indirectly (tests/test_layers.py reads
this table and checks every import). An import inside a function only defers a heavy dependency
(faiss, h5py, torch), never breaks a cycle; a helper that two layers need lives in the lower one.

  8 package     ghindex (this file: the public names)
  7 serve       serve, serve.*
  6 tasks       evaluate, query, info, lifecycle, dedup, dedup_output, demo
  5 train       train, train_*
  4 encode      encode, encode_state, local_encode, sharded_encode, runtime
  3 models      backbones, encoder, data, losses, batching, augment, database_views
  2 storage     store, store_format, store_write, index, index.*
  1 kernels     flatscan, flatscan_kernels, metric_kernels, metrics, dedup_kernels, dedup_join, pixel_kernels
  0 base        errors, version, io, popcount, hashing, ids, device, distributed, images, journal, allocator

`lifecycle` (add, remove) encodes new images, so it sits above `encode`, not inside `index`.
"""
from .encoder import Encoder, EncoderConfig
from .errors import (
    ConfigError,
    DataError,
    GhindexError,
    ImageError,
    IndexFileError,
    ModelFileError,
    SearchError,
    StoreError,
    WeightsError,
)
from .hashing import greedy_sign, pack_bits, pack_signs, quantization_penalty, unpack_bits, unpack_signs
from .train import train
from .version import __version__

__all__ = [
    "ConfigError", "DataError", "Encoder", "EncoderConfig", "GhindexError", "ImageError",
    "IndexFileError", "ModelFileError", "SearchError", "StoreError", "WeightsError",
    "greedy_sign", "pack_bits", "pack_signs", "quantization_penalty", "train", "unpack_bits", "unpack_signs",
]
