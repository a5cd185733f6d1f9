"""ghindex: image retrieval with learned binary codes (GreedyHash), HDF5 code stores and FAISS."""
from importlib.metadata import PackageNotFoundError, version as _version

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

try:
    __version__ = _version("ghindex")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "ConfigError", "DataError", "Encoder", "EncoderConfig", "GhindexError", "ImageError",
    "IndexFileError", "ModelFileError", "SearchError", "StoreError", "WeightsError",
    "greedy_sign", "pack_bits", "pack_signs", "quantization_penalty", "train", "unpack_bits", "unpack_signs",
]
