"""FAISS binary indexes over packed codes: build from a code store in chunks, search by id, CPU or GPU.

An index on disk is a directory::

    INDEX/index.faiss   the FAISS binary index, always written from its CPU form
    INDEX/meta.json     what it is: bits, padding, index key and parameters, ntotal, and the
                        fingerprints of the code store and encoder it was built from

Facts this package relies on (see DESIGN.md):

- FAISS has fast Hamming kernels for 4, 8, 16, 20, 32 and 64-byte codes only. Codes of another width
  up to 64 bytes (e.g. 48-bit = 6 bytes) are zero-padded to the next fast width inside the index, for
  the database and the queries alike: the padding bits are equal on both sides, so every distance is
  unchanged. Callers always pass and see codes at their true width.
- Ids are the code store's ids. Indexes that cannot store ids themselves (flat, HNSW, multi-hash) are
  wrapped in ``IndexBinaryIDMap``; IVF and single-hash indexes keep ids in their lists.
- FAISS fills missing results with id -1 (distance 2**31-1, or -2**31 for HNSW). `Index.search` never
  asks for more than ``ntotal`` neighbours, and any slot that is still empty (approximate indexes can
  find fewer than k) has id -1 AND distance -1.
- FAISS range search is strict (``distance < r``); here a radius r means ``distance <= r``.
- Only flat indexes run on GPU (``GpuIndexBinaryFlat``, k <= 2048). Constructing a GPU index on a
  machine without one aborts the process, so every GPU path is guarded by ``faiss.get_num_gpus() > 0``.

Modules, one job each (none imports this package's ``__init__``):

- `keys`: index keys (`IndexSpec`, `parse_index_key`, `auto_index_key`, ...) and `name=value` parameters
- `codes`: padding codes to the fast widths; checks of codes and ids passed in
- `memory`: `estimate_memory`, and the size strings `max_memory` takes
- `gpu`: GPU count, the gpu='auto'|'on'|'off' choice, copies to GPUs
- `structures`: constructing, unwrapping and configuring FAISS index objects
- `files`: index directories (atomic writes, `read_meta`, `describe_index`)
- `core`: the `Index` class
- `builder`: `build` (from a code store, to disk) and `build_from_arrays` (in memory)
- `tuning`: tie-aware recall against exact search; the smallest nprobe / efSearch for a recall target
- `lifecycle`: `add` and `remove` codes in place, with the code store, crash-safely; IVF drift
"""
from __future__ import annotations

import sys
import types

from . import builder, codes, core, files, gpu, keys, memory, structures  # noqa: E402
from .builder import ChunkSource, build, build_from_arrays  # noqa: E402
from .codes import FAST_WIDTHS, pad_codes, padded_width  # noqa: E402
from .core import ENGINES, QUERY_BATCH, Index  # noqa: E402
from .files import FORMAT, FORMAT_VERSION, INDEX_FILE, META_FILE, describe_index, read_meta  # noqa: E402
from .gpu import GPU_MAX_K, _gpu_clustering_index, _to_gpu, gpu_count  # noqa: E402
from .lifecycle import add, remove  # noqa: E402
from .keys import (  # noqa: E402
    AUTO_FLAT_MAX,
    MIN_POINTS_PER_LIST,
    TRAIN_POINTS_PER_LIST,
    IndexSpec,
    auto_index_key,
    auto_nlist,
    default_nprobe,
    parse_index_key,
    parse_index_params,
    resolve_index_key,
)
from .memory import CHUNK_ROWS, estimate_memory, format_size, parse_size  # noqa: E402
from .structures import FLAT_QUERY_BATCH  # noqa: E402

__all__ = [
    "AUTO_FLAT_MAX", "CHUNK_ROWS", "ChunkSource", "ENGINES", "FAST_WIDTHS", "FLAT_QUERY_BATCH", "FORMAT",
    "FORMAT_VERSION", "GPU_MAX_K", "INDEX_FILE", "Index", "IndexSpec", "META_FILE", "MIN_POINTS_PER_LIST",
    "QUERY_BATCH", "TRAIN_POINTS_PER_LIST", "add", "auto_index_key", "auto_nlist", "build", "build_from_arrays",
    "default_nprobe", "describe_index", "estimate_memory", "format_size", "gpu_count", "pad_codes",
    "padded_width", "parse_index_key", "parse_index_params", "parse_size", "read_meta", "remove",
    "resolve_index_key",
]

_SUBMODULES = (keys, codes, memory, gpu, structures, files, core, builder)


class _Package(types.ModuleType):
    """Setting a name on the package rebinds it in every submodule that holds the same object.

    The code that calls `gpu_count`, `_to_gpu` or `_gpu_clustering_index` lives in the submodules, which
    bound those names at import; tests replace them on the package (``monkeypatch.setattr(ghindex.index,
    "gpu_count", ...)``, as when this package was one module), and the replacement (and its undo) must
    reach the callers.
    """

    def __setattr__(self, name: str, value) -> None:
        missing = object()
        old = self.__dict__.get(name, missing)
        if old is not missing and not isinstance(old, types.ModuleType):
            for module in _SUBMODULES:
                if module.__dict__.get(name, missing) is old:
                    setattr(module, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
