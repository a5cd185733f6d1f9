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
- `sampling`: the live rows of a code store as chunks; seeded samples gathered in one pass
- `drift`: IVF drift, the codes' distance to their centroids (recorded at build, measured by `add`)
- `transaction`: the crash-safe change of an index with its code store (lock, recovery, commit)

Growing and shrinking an index (`add`, `remove`) encodes images, so it sits above this package, in
`ghindex.lifecycle`. Names are looked up where they live: to replace one (in a test), patch its module
(e.g. ``ghindex.index.gpu.gpu_count``); this package's names are re-exports for callers.
"""
from __future__ import annotations

from .builder import build, build_from_arrays
from .codes import FAST_WIDTHS, pad_codes, padded_width
from .core import ENGINES, QUERY_BATCH, Index
from .files import FORMAT, FORMAT_VERSION, INDEX_FILE, META_FILE, describe_index, read_meta
from .gpu import GPU_MAX_K, gpu_count
from .keys import (
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
from .memory import CHUNK_ROWS, estimate_memory, format_size, parse_size
from .sampling import ChunkSource
from .structures import FLAT_QUERY_BATCH

__all__ = [
    "AUTO_FLAT_MAX", "CHUNK_ROWS", "ChunkSource", "ENGINES", "FAST_WIDTHS", "FLAT_QUERY_BATCH", "FORMAT",
    "FORMAT_VERSION", "GPU_MAX_K", "INDEX_FILE", "Index", "IndexSpec", "META_FILE", "MIN_POINTS_PER_LIST",
    "QUERY_BATCH", "TRAIN_POINTS_PER_LIST", "auto_index_key", "auto_nlist", "build", "build_from_arrays",
    "default_nprobe", "describe_index", "estimate_memory", "format_size", "gpu_count", "pad_codes",
    "padded_width", "parse_index_key", "parse_index_params", "parse_size", "read_meta",
    "resolve_index_key",
]
