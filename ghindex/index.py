"""FAISS binary indexes over packed codes: build from a code store in chunks, search by id, CPU or GPU.

An index on disk is a directory::

    INDEX/index.faiss   the FAISS binary index, always written from its CPU form
    INDEX/meta.json     what it is: bits, padding, index key and parameters, ntotal, and the
                        fingerprints of the code store and encoder it was built from

Facts this module relies on (see DESIGN.md):

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
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

# FAISS logs which CPU build it loads at INFO; the CLI's stderr log is for ghindex's own progress.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from .errors import ConfigError, IndexFileError, SearchError, StoreError  # noqa: E402
from .hashing import check_bits  # noqa: E402
from .io import remove_stale_temps  # noqa: E402

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
FORMAT = "ghindex-index"
FORMAT_VERSION = 1

#: Code widths (bytes) with a specialised FAISS Hamming kernel.
FAST_WIDTHS = (4, 8, 16, 20, 32, 64)
#: Largest k GpuIndexBinaryFlat can return.
GPU_MAX_K = 2048
#: Below this many codes, `index_key="auto"` picks exact flat search.
AUTO_FLAT_MAX = 1_000_000
#: IVF needs this many training points per list (FAISS warns below it).
MIN_POINTS_PER_LIST = 39
#: Default IVF training sample: this many points per list (capped by the store size).
TRAIN_POINTS_PER_LIST = 64
#: Queries per FAISS call: big enough for FAISS's per-query threads, small enough to bound memory.
QUERY_BATCH = 65_536
#: Queries IndexBinaryFlat scans the database for at once (FAISS's default, 32, re-reads the whole
#: database every 32 queries; 1024 searched 2.5x faster on 1M 64-bit codes, benchmarks/RESULTS.md).
FLAT_QUERY_BATCH = 1024
#: Rows read from the code store per chunk while building.
CHUNK_ROWS = 262_144

# Index-parameter names accepted per index kind (`--index-param name=value`).
_PARAMS = {
    "flat": {},
    "ivf": {
        "nprobe": "lists visited per query (1..nlist)",
        "train_size": "codes sampled to train the coarse quantizer",
        "kmeans_iters": "k-means iterations",
    },
    "hnsw": {"efSearch": "search breadth", "efConstruction": "construction breadth"},
    "hash": {"nflip": "bits flipped around each query's hash"},
    "multihash": {"nflip": "bits flipped around each query's hash"},
}
_BUILD_ONLY_PARAMS = {"train_size", "kmeans_iters"}


# --------------------------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class IndexSpec:
    """A parsed, validated index key. `nlist` is None for `BIVF` with the list count left to N."""

    kind: str  # flat | ivf | hnsw | hash | multihash
    nlist: int | None = None
    quantizer_m: int | None = None  # BIVF{n}_HNSW{M}: HNSW coarse quantizer
    m: int | None = None  # BHNSW{M}
    b: int | None = None  # BHash{b}, BHash{nhash}x{b}
    nhash: int | None = None

    @property
    def key(self) -> str:
        """The canonical FAISS factory string."""
        if self.kind == "flat":
            return "BFlat"
        if self.kind == "ivf":
            key = f"BIVF{self.nlist if self.nlist is not None else ''}"
            return key + (f"_HNSW{self.quantizer_m}" if self.quantizer_m else "")
        if self.kind == "hnsw":
            return f"BHNSW{self.m}"
        if self.kind == "hash":
            return f"BHash{self.b}"
        return f"BHash{self.nhash}x{self.b}"


_KEY_FORMS = "auto, BFlat, BIVF<nlist>, BIVF, BIVF<nlist>_HNSW<M>, BHNSW<M>, BHash<b>, BHash<nhash>x<b>"
_KEY_PATTERNS = [
    ("flat", re.compile(r"BFlat")),
    ("ivf", re.compile(r"BIVF(?P<nlist>[1-9]\d*)?(?:_HNSW(?P<qm>[1-9]\d*))?")),
    ("hnsw", re.compile(r"BHNSW(?P<m>[1-9]\d*)")),
    ("multihash", re.compile(r"BHash(?P<nhash>[1-9]\d*)x(?P<b>[1-9]\d*)")),
    ("hash", re.compile(r"BHash(?P<b>[1-9]\d*)")),
]


def parse_index_key(index_key: str, bits: int) -> IndexSpec:
    """Parse a binary factory string strictly (FAISS's own parser ignores trailing junk).

    `bits` is the true code length; hash widths are checked against it, never against padding.
    """
    bits = check_bits(bits)
    text = str(index_key).strip()
    for kind, pattern in _KEY_PATTERNS:
        match = pattern.fullmatch(text)
        if not match:
            continue
        groups = {k: int(v) for k, v in match.groupdict().items() if v is not None}
        if kind == "ivf":
            return IndexSpec("ivf", nlist=groups.get("nlist"), quantizer_m=groups.get("qm"))
        if kind == "hnsw":
            if groups["m"] < 2:
                raise ConfigError(f"index key {text!r}: HNSW needs M >= 2 neighbours per node")
            return IndexSpec("hnsw", m=groups["m"])
        if kind == "hash":
            if groups["b"] > min(bits, 64):
                raise ConfigError(
                    f"index key {text!r}: the hash uses {groups['b']} bits but codes have {bits} "
                    f"(at most {min(bits, 64)})"
                )
            return IndexSpec("hash", b=groups["b"])
        if kind == "multihash":
            nhash, b = groups["nhash"], groups["b"]
            if b > 64 or nhash * b > bits:
                raise ConfigError(
                    f"index key {text!r}: {nhash} hashes of {b} bits need {nhash * b} bits "
                    f"(at most 64 each) but codes have {bits}"
                )
            return IndexSpec("multihash", b=b, nhash=nhash)
        return IndexSpec("flat")
    hint = ""
    if text.startswith("IDMap"):
        hint = " (ids are kept automatically: drop the IDMap prefix)"
    raise ConfigError(f"unknown index key {text!r}{hint}; expected one of: {_KEY_FORMS}")


def auto_nlist(n: int) -> int:
    """IVF list count for `n` codes: the power of two nearest sqrt(n), with >= 39 training points per list.

    sqrt(n) rather than FAISS's 4-16 sqrt(n) for float vectors: binary k-means runs on float copies of
    the bits, and more lists make training quadratically slower for little search gain on 64-bit codes.
    """
    target = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    cap = max(1, n // MIN_POINTS_PER_LIST)
    return int(max(1, min(target, 2 ** int(math.log2(cap)))))


def default_nprobe(nlist: int) -> int:
    """Lists visited per query by default (see benchmarks/RESULTS.md for the recall it buys)."""
    return int(min(nlist, max(1, nlist // 32)))


def auto_index_key(n: int) -> str:
    """Exact `BFlat` up to AUTO_FLAT_MAX codes, else `BIVF<auto_nlist(n)>`."""
    return "BFlat" if n <= AUTO_FLAT_MAX else f"BIVF{auto_nlist(n)}"


def resolve_index_key(index_key: str, n: int, bits: int) -> IndexSpec:
    """Turn `auto`/`BIVF` into a concrete spec for `n` codes; refuse IVF list counts that cannot train."""
    if str(index_key).strip().lower() == "auto":
        index_key = auto_index_key(n)
    spec = parse_index_key(index_key, bits)
    if spec.kind != "ivf":
        return spec
    if spec.nlist is None:
        return IndexSpec("ivf", nlist=auto_nlist(n), quantizer_m=spec.quantizer_m)
    if n < MIN_POINTS_PER_LIST * spec.nlist:
        fit = auto_nlist(n)
        raise ConfigError(
            f"index key {spec.key!r} needs at least {MIN_POINTS_PER_LIST * spec.nlist:,} codes to train "
            f"({MIN_POINTS_PER_LIST} per list) but there are {n:,}: use BIVF{fit} or fewer lists, "
            f"'BIVF' (lists chosen from N) or 'auto'"
        )
    return spec


# ------------------------------------------------------------------------------------------ params
def parse_index_params(index_param: Iterable[str] | dict | None, spec: IndexSpec) -> dict[str, int]:
    """`["nprobe=32", ...]` (or a dict) -> {"nprobe": 32}, checked against the index kind."""
    if index_param is None:
        return {}
    items = index_param.items() if isinstance(index_param, dict) else []
    if not isinstance(index_param, dict):
        if isinstance(index_param, str):
            index_param = [index_param]
        parsed = []
        for item in index_param:
            if "=" not in str(item):
                raise ConfigError(f"index parameter {item!r} must look like name=value (e.g. nprobe=32)")
            name, value = str(item).split("=", 1)
            parsed.append((name.strip(), value.strip()))
        items = parsed
    allowed = _PARAMS[spec.kind]
    params: dict[str, int] = {}
    for name, value in items:
        if name not in allowed:
            names = ", ".join(allowed) or "none"
            raise ConfigError(f"index parameter {name!r} does not apply to {spec.key} (accepted: {names})")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"index parameter {name}={value!r} must be an integer") from None
        low = 0 if name == "nflip" else 1
        if number < low:
            raise ConfigError(f"index parameter {name}={number} must be >= {low}")
        params[name] = number
    if spec.kind == "ivf" and spec.nlist is not None and params.get("nprobe", 1) > spec.nlist:
        raise ConfigError(f"index parameter nprobe={params['nprobe']} exceeds nlist={spec.nlist}")
    return params


def parse_size(text: str | int | None) -> int | None:
    """'8G', '512M', '1.5GiB', '100000' -> bytes (powers of 1024). None stays None."""
    if text is None or isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        return None if text is None else int(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"memory size {text!r} not understood; use e.g. 8G, 512M or a byte count")
    scale = 1024 ** " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * scale)


def format_size(n_bytes: float) -> str:
    """Bytes as a short human string with binary units."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n_bytes) < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError  # unreachable


# ------------------------------------------------------------------------------------------ widths
def padded_width(code_bytes: int) -> int:
    """Byte width FAISS will search at: the next fast width (codes wider than 64 bytes stay as they are)."""
    for width in FAST_WIDTHS:
        if code_bytes <= width:
            return width
    return int(code_bytes)


def pad_codes(codes: np.ndarray, width: int) -> np.ndarray:
    """Zero-pad packed codes on the right to `width` bytes (C-contiguous uint8 for FAISS)."""
    n, code_bytes = codes.shape
    if code_bytes == width:
        return np.ascontiguousarray(codes)
    out = np.zeros((n, width), dtype=np.uint8)
    out[:, :code_bytes] = codes
    return out


def _check_codes(codes, code_bytes: int, what: str) -> np.ndarray:
    """Packed codes as a 2-d uint8 array of the right width, or a SearchError that says what is wrong."""
    arr = np.asarray(codes)
    if arr.dtype != np.uint8:
        raise SearchError(
            f"{what} must be packed uint8 codes (N, {code_bytes}), got dtype {arr.dtype}"
            + ("; pack 0/1 or +-1 values with ghindex.pack_bits / pack_signs" if arr.ndim == 2 else "")
        )
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise SearchError(f"{what} must be a 2-d array (N, {code_bytes}), got shape {arr.shape}")
    if arr.shape[1] != code_bytes:
        raise SearchError(
            f"{what} are {arr.shape[1]} bytes ({arr.shape[1] * 8} bits) wide but the index holds "
            f"{code_bytes}-byte ({code_bytes * 8}-bit) codes"
        )
    return arr


def _check_ids(ids, n: int, what: str, error=ConfigError) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or len(arr) != n:
        raise error(f"{what}: expected {n} ids in a 1-d array, got shape {arr.shape}")
    if n and not np.issubdtype(arr.dtype, np.integer):
        raise error(f"{what}: ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if n and arr.min() < 0:
        raise error(f"{what}: ids must be >= 0 (FAISS uses -1 for 'no result'), found {arr.min()}")
    return np.ascontiguousarray(arr)


# ------------------------------------------------------------------------------------------ memory
def estimate_memory(spec: IndexSpec, n: int, bits: int, params: dict | None = None,
                    chunk_rows: int = CHUNK_ROWS) -> dict[str, int]:
    """About how many bytes the index holds (`resident`) and needs at most while building (`peak`).

    Counts padded codes, ids and the index structure, plus the build's transients: chunk buffers, the
    id uniqueness check (8 bytes per code) and, for IVF, the k-means sample as float32 bits.
    """
    params = params or {}
    width = padded_width(bits // 8)
    per_code = {
        "flat": width + 8,  # codes + id map
        "ivf": width + 8,  # codes + ids in inverted lists
        "hnsw": width + 8 + 8 * (spec.m or 32) * 1.1 + 12,  # + level-0/upper links, offsets, levels
        "hash": (width + 8) * 1.25,  # lists grow by doubling; buckets counted below
        "multihash": width + 8 + 8 * (spec.nhash or 1) * 1.25,
    }[spec.kind]
    resident = n * per_code
    transient = 8 * n + min(n, chunk_rows) * (bits // 8 + width + 16)
    if spec.kind == "ivf":
        nlist = spec.nlist or auto_nlist(n)
        resident += nlist * (width + 48)  # centroids + per-list vector headers
        train = min(n, params.get("train_size", TRAIN_POINTS_PER_LIST * nlist))
        transient += train * (width + 8 * width * 4 + 8) + nlist * 8 * width * 4
    elif spec.kind in ("hash", "multihash"):
        buckets = min(n, 2 ** (spec.b or 0)) * (spec.nhash or 1)
        resident += buckets * 96  # hash-map node + two vector headers
    return {"resident": int(resident), "peak": int(resident + transient)}


# --------------------------------------------------------------------------------------------- GPU
def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _resolve_gpu(gpu: str, what: str) -> bool:
    """'auto' | 'on' | 'off' -> use a GPU? Never True unless FAISS reports one."""
    if gpu not in ("auto", "on", "off"):
        raise ConfigError(f"gpu must be 'auto', 'on' or 'off', got {gpu!r}")
    if gpu == "off":
        return False
    if gpu_count() > 0:
        return True
    if gpu == "on":
        raise ConfigError(
            "gpu='on' but FAISS sees no GPU (faiss.get_num_gpus() == 0; faiss-gpu and a CUDA device are "
            "needed); use gpu='auto' or 'off'"
        )
    log.info("no GPU visible to FAISS: %s on CPU", what)
    return False


def _to_gpu(flat: faiss.IndexBinaryFlat, shard: bool):
    """Copy a CPU IndexBinaryFlat to all GPUs (replicas, or shards with successive ids).

    Returns (gpu_index, resources); the resources must outlive the index. Only call when gpu_count() > 0.
    """
    ngpu = gpu_count()
    resources = [faiss.StandardGpuResources() for _ in range(ngpu)]
    options = faiss.GpuMultipleClonerOptions()
    options.shard = bool(shard)
    gpu_index = faiss.index_cpu_to_gpu_multiple_py(resources, flat, options, list(range(ngpu)))
    return gpu_index, resources


def _gpu_clustering_index(dim: int):
    """A float L2 index on all GPUs for IVF k-means: (index, resources), both to be kept alive while
    training. Only call when gpu_count() > 0."""
    ngpu = gpu_count()
    resources = [faiss.StandardGpuResources() for _ in range(ngpu)]
    return faiss.index_cpu_to_gpu_multiple_py(resources, faiss.IndexFlatL2(dim), None, list(range(ngpu))), resources


# ------------------------------------------------------------------------------- faiss structures
def _new_faiss_index(spec: IndexSpec, width: int) -> faiss.IndexBinary:
    """Construct via the factory, then check FAISS built what the key says (it can silently misparse)."""
    dim = width * 8
    try:
        index = faiss.index_binary_factory(dim, spec.key)
    except RuntimeError as exc:
        raise ConfigError(f"FAISS cannot build index {spec.key!r}: {str(exc).splitlines()[-1]}") from None
    expected = {
        "flat": faiss.IndexBinaryFlat, "ivf": faiss.IndexBinaryIVF, "hnsw": faiss.IndexBinaryHNSW,
        "hash": faiss.IndexBinaryHash, "multihash": faiss.IndexBinaryMultiHash,
    }[spec.kind]
    problems = []
    if not isinstance(index, expected):
        problems.append(f"got {type(index).__name__}, expected {expected.__name__}")
    elif index.d != dim:
        problems.append(f"dimension {index.d} != {dim}")
    elif spec.kind == "ivf":
        quantizer = faiss.downcast_IndexBinary(index.quantizer)
        want_q = faiss.IndexBinaryHNSW if spec.quantizer_m else faiss.IndexBinaryFlat
        if index.nlist != spec.nlist:
            problems.append(f"nlist {index.nlist} != {spec.nlist}")
        if not isinstance(quantizer, want_q):
            problems.append(f"quantizer {type(quantizer).__name__} != {want_q.__name__}")
        elif spec.quantizer_m and quantizer.hnsw.nb_neighbors(1) != spec.quantizer_m:
            problems.append(f"quantizer M {quantizer.hnsw.nb_neighbors(1)} != {spec.quantizer_m}")
    elif spec.kind == "hnsw" and index.hnsw.nb_neighbors(1) != spec.m:
        problems.append(f"M {index.hnsw.nb_neighbors(1)} != {spec.m}")
    elif spec.kind == "hash" and index.b != spec.b:
        problems.append(f"b {index.b} != {spec.b}")
    elif spec.kind == "multihash" and (index.b != spec.b or index.nhash != spec.nhash):
        problems.append(f"{index.nhash}x{index.b} != {spec.nhash}x{spec.b}")
    if problems:
        raise ConfigError(f"FAISS built a different index than {spec.key!r}: {'; '.join(problems)}")
    _batch_queries(index)
    if spec.kind in ("flat", "hnsw", "multihash"):  # no add_with_ids of their own
        index = faiss.IndexBinaryIDMap(index)  # keeps a Python reference to the inner index
    return index


def _inner(index: faiss.IndexBinary) -> faiss.IndexBinary:
    """The index under an id map (or the index itself), downcast to its concrete class."""
    if isinstance(index, faiss.IndexBinaryIDMap):
        return faiss.downcast_IndexBinary(index.index)
    return index


def _batch_queries(index: faiss.IndexBinary) -> None:
    """Flat scans (the index itself, or an IVF's coarse quantizer, which assigns every added code and
    every query) take FLAT_QUERY_BATCH queries per pass. Each batch is one OpenMP region: with FAISS's
    32, adding 5,000 codes to a BIVF64 took 15 s on a busy 2-core machine, almost all in thread sync."""
    if isinstance(index, faiss.IndexBinaryIVF):
        index = faiss.downcast_IndexBinary(index.quantizer)
    if isinstance(index, faiss.IndexBinaryFlat):
        index.query_batch_size = FLAT_QUERY_BATCH


def _apply_params(index: faiss.IndexBinary, spec_kind: str, params: dict) -> None:
    """Set search parameters (and settings FAISS does not save, so this runs after every load)."""
    inner = _inner(index)
    _batch_queries(inner)
    for name, value in params.items():
        if name in _BUILD_ONLY_PARAMS:
            continue
        if name == "nprobe":
            inner.nprobe = int(value)
        elif name in ("efSearch", "efConstruction"):
            setattr(inner.hnsw, name, int(value))
        elif name == "nflip":
            inner.nflip = int(value)
        else:  # parse_index_params already refused it; meta.json from elsewhere may not have
            raise IndexFileError(f"unknown index parameter {name!r} for a {spec_kind} index")


def _kind_of(index: faiss.IndexBinary) -> str:
    inner = _inner(index)
    for kind, cls in (("ivf", faiss.IndexBinaryIVF), ("hnsw", faiss.IndexBinaryHNSW),
                      ("multihash", faiss.IndexBinaryMultiHash), ("hash", faiss.IndexBinaryHash),
                      ("flat", faiss.IndexBinaryFlat)):
        if isinstance(inner, cls):
            return kind
    return type(inner).__name__


# ------------------------------------------------------------------------------------------ build
ChunkSource = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


class _IndexBuilder:
    """Plans (key, params, memory), trains and fills one FAISS index from chunks of (codes, ids)."""

    def __init__(self, n: int, bits: int, index_key: str = "auto", index_param=(), gpu: str = "off",
                 max_memory=None, seed: int = 0, chunk_rows: int = CHUNK_ROWS):
        self.bits = check_bits(bits)
        self.n = int(n)
        if self.n <= 0:
            raise ConfigError("there are no codes to index")
        self.code_bytes = self.bits // 8
        self.width = padded_width(self.code_bytes)
        self.spec = resolve_index_key(index_key, self.n, self.bits)
        self.params = parse_index_params(index_param, self.spec)
        if self.spec.kind == "ivf":
            self.params.setdefault("nprobe", default_nprobe(self.spec.nlist))
            self.train_size = min(self.n, self.params.get("train_size", TRAIN_POINTS_PER_LIST * self.spec.nlist))
            if self.train_size < MIN_POINTS_PER_LIST * self.spec.nlist:
                raise ConfigError(
                    f"train_size={self.train_size:,} is below {MIN_POINTS_PER_LIST} points per list "
                    f"for nlist={self.spec.nlist}"
                )
        else:
            self.train_size = 0
        self.seed = int(seed)
        self.chunk_rows = int(chunk_rows)
        self.memory = estimate_memory(self.spec, self.n, self.bits, self.params, self.chunk_rows)
        # Only IVF k-means has GPU work to do at build time (a flat index goes to the GPU when loaded).
        self.use_gpu = _resolve_gpu(gpu, "building") and self.spec.kind == "ivf"
        limit = parse_size(max_memory)
        log.info(
            "%s over %s codes of %d bits (searched at %d bytes): needs about %s (peak %s while building)",
            self.spec.key, f"{self.n:,}", self.bits, self.width,
            format_size(self.memory["resident"]), format_size(self.memory["peak"]),
        )
        if limit is not None and self.memory["peak"] > limit:
            raise ConfigError(
                f"{self.spec.key} over {self.n:,} codes needs about {format_size(self.memory['peak'])} "
                f"while building, more than max_memory={format_size(limit)}"
            )

    def build(self, chunks: ChunkSource) -> faiss.IndexBinary:
        index = _new_faiss_index(self.spec, self.width)
        if self.spec.kind == "hnsw" and "efConstruction" in self.params:
            _inner(index).hnsw.efConstruction = self.params["efConstruction"]
        if not index.is_trained:
            self._train(index, chunks)
        all_ids = np.empty(self.n, dtype=np.int64)
        added = 0
        progress = _progress(self.n, "adding codes")
        try:
            for codes, ids in chunks():
                if added + len(codes) > self.n:
                    raise StoreError(f"the code source yielded more than the {self.n:,} codes it declared")
                index.add_with_ids(pad_codes(codes, self.width), ids)
                all_ids[added:added + len(ids)] = ids
                added += len(ids)
                progress.update(len(ids))
        finally:
            progress.close()
        if added != self.n:
            raise StoreError(f"the code source yielded {added:,} codes, not the {self.n:,} it declared")
        all_ids.sort()
        duplicates = np.flatnonzero(all_ids[1:] == all_ids[:-1])
        if len(duplicates):
            raise StoreError(f"ids must be unique; id {all_ids[duplicates[0]]} occurs more than once")
        _apply_params(index, self.spec.kind, self.params)
        return index

    def _train(self, index: faiss.IndexBinary, chunks: ChunkSource) -> None:
        sample = _sample_codes(chunks, self.n, self.train_size, self.code_bytes, self.seed)
        ivf = _inner(index)
        ivf.cp.seed = self.seed
        if "kmeans_iters" in self.params:
            ivf.cp.niter = self.params["kmeans_iters"]
        # SWIG does not keep a Python reference for clustering_index: hold it here until training ends.
        clustering = _gpu_clustering_index(self.width * 8) if self.use_gpu else None
        if clustering is not None:
            ivf.clustering_index = clustering[0]
        log.info("training %s on %s sampled codes%s", self.spec.key, f"{len(sample):,}",
                 " (k-means on GPU)" if clustering is not None else "")
        start = time.perf_counter()
        try:
            index.train(pad_codes(sample, self.width))
        finally:
            ivf.clustering_index = None
            del clustering
        log.info("trained in %.1f s", time.perf_counter() - start)


def _sample_codes(chunks: ChunkSource, n: int, size: int, code_bytes: int, seed: int) -> np.ndarray:
    """`size` codes drawn uniformly without replacement, in one sequential pass over the chunks."""
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)
    sample = np.empty((len(picks), code_bytes), dtype=np.uint8)
    start = filled = 0
    for codes, _ids in chunks():
        lo, hi = np.searchsorted(picks, [start, start + len(codes)])
        sample[filled:filled + hi - lo] = codes[picks[lo:hi] - start]
        filled += hi - lo
        start += len(codes)
        if filled == len(picks):
            break
    if filled != len(picks):
        raise StoreError(f"the code source ended after {start:,} codes, expected {n:,}")
    return sample


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="code", unit_scale=True, file=sys.stderr,
                disable=None, leave=False)


def build_from_arrays(codes: np.ndarray, ids: np.ndarray | None = None, index_key: str = "auto",
                      index_param=(), gpu: str = "off", max_memory=None, *, bits: int | None = None,
                      seed: int = 0, chunk_rows: int = CHUNK_ROWS) -> "Index":
    """Build an in-memory `Index` from packed codes (N, bits/8) already in RAM (ids default to 0..N-1).

    Same keys, parameters and checks as `build`; nothing is written (use `Index.save`).
    """
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ConfigError(f"codes must be a 2-d uint8 array of packed bits, got {codes.dtype} {codes.shape}")
    bits = codes.shape[1] * 8 if bits is None else check_bits(bits)
    if bits != codes.shape[1] * 8:
        raise ConfigError(f"bits={bits} does not match codes {codes.shape[1]} bytes wide ({codes.shape[1] * 8} bits)")
    ids = np.arange(len(codes), dtype=np.int64) if ids is None else _check_ids(ids, len(codes), "ids")

    def chunks():
        for start in range(0, len(codes), chunk_rows):
            yield codes[start:start + chunk_rows], ids[start:start + chunk_rows]

    builder = _IndexBuilder(len(codes), bits, index_key, index_param, gpu, max_memory, seed, chunk_rows)
    faiss_index = builder.build(chunks)
    meta = _make_meta(builder, faiss_index, store=None)
    return Index(faiss_index, meta)


def build(codes: str | os.PathLike, out: str | os.PathLike, index_key: str = "auto", index_param=(),
          gpu: str = "auto", max_memory=None, *, overwrite: bool = False, seed: int = 0,
          chunk_rows: int | None = None) -> dict:
    """Build a FAISS binary index directory `out` from the HDF5 code store `codes`.

    The store is read in chunks of `chunk_rows` rows (default: the store's, about 32 MiB; memory stays
    bounded); its ids are kept. `index_key` is
    `auto` (flat up to 1M codes, else IVF with lists chosen from N) or a binary factory string (see
    `parse_index_key`); `index_param` holds `name=value` strings (nprobe, train_size, kmeans_iters,
    efSearch, efConstruction, nflip). The memory the index needs is estimated and logged first; the
    build stops before reading codes when it exceeds `max_memory` ('8G', bytes). `gpu='auto'|'on'|'off'`
    runs IVF k-means on GPU when FAISS has one. `out` is written as a temp directory then renamed; an
    existing index there is replaced only with `overwrite=True`. Returns the index's metadata.
    """
    from .store import CodeStore  # imported late: the store module pulls in h5py

    out = Path(out)
    _check_out(out, overwrite)
    start = time.perf_counter()
    with CodeStore.open(codes) as store:
        n, bits = len(store), int(store.bits)
        if n == 0:
            raise StoreError(f"code store {codes} holds no codes")
        if int(store.code_bytes) * 8 != bits:
            raise StoreError(f"code store {codes}: {store.code_bytes} bytes per code do not hold {bits} bits")

        chunk_rows = int(chunk_rows or store.default_iter_rows())

        def chunks():
            for batch in store.iter_chunks(rows=chunk_rows, paths=False):
                batch_codes = np.asarray(batch.codes, dtype=np.uint8)
                yield batch_codes, _check_ids(batch.ids, len(batch_codes), f"code store {codes}", StoreError)

        builder = _IndexBuilder(n, bits, index_key, index_param, gpu, max_memory, seed, chunk_rows)
        faiss_index = builder.build(chunks)
        meta = _make_meta(builder, faiss_index, store=store, store_path=codes)
    meta["build_seconds"] = round(time.perf_counter() - start, 3)
    index = Index(faiss_index, meta)
    index.save(out, overwrite=overwrite)
    log.info("wrote %s (%s codes, %s) in %.1f s", out, f"{index.ntotal:,}", meta["index_key"], meta["build_seconds"])
    return dict(index.meta, path=str(out))


def _make_meta(builder: _IndexBuilder, faiss_index, store, store_path=None) -> dict:
    from . import __version__

    encoder_fp = (store.encoder_fingerprint or None) if store is not None else None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bits": builder.bits,
        "code_bytes": builder.code_bytes,
        "padded_bytes": builder.width,
        "index_key": builder.spec.key,
        "index_kind": builder.spec.kind,
        "faiss_class": type(_inner(faiss_index)).__name__,
        "id_map": isinstance(faiss_index, faiss.IndexBinaryIDMap),
        "params": dict(builder.params),
        "train_size": builder.train_size,
        "ntotal": int(faiss_index.ntotal),
        "store_path": str(Path(store_path).resolve()) if store_path is not None else None,
        "store_fingerprint": store.fingerprint if store is not None else None,
        "encoder_fingerprint": encoder_fp,
        "estimated_memory": builder.memory,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "faiss_version": faiss.__version__,
        "ghindex_version": __version__,
    }


# ------------------------------------------------------------------------------------------- files
def _is_index_dir(path: Path) -> bool:
    try:
        return json.loads((path / META_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not (out.is_dir() and _is_index_dir(out)):
        raise IndexFileError(f"{out} exists and is not a ghindex index directory; refusing to replace it")
    if not overwrite:
        raise IndexFileError(f"index {out} already exists; use overwrite=True (--overwrite) to replace it")


@contextlib.contextmanager
def _atomic_dir(final: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temp directory next to `final`; on success it replaces `final` by renames."""
    _check_out(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.iterdir():
            with open(child, "rb+") as f:
                os.fsync(f.fileno())
        if final.exists():
            os.replace(final, old)  # the old index survives under `old` if the next rename fails
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    remove_stale_temps(final, (".tmp", ".old"))  # left by builds that were killed


def _faiss_reason(exc: Exception) -> str:
    """The useful part of a FAISS C++ error: without its function signature, source line and assertion."""
    text = str(exc).strip()
    text = text.splitlines()[-1] if text else type(exc).__name__
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", text)
    text = re.sub(r"^Error: '.*?' failed: ", "", text)
    if text.startswith("read error"):
        text = f"the file ends too early: truncated? {text}"
    return text[:200]


def read_meta(path: str | os.PathLike) -> dict:
    """meta.json of an index directory, checked to be a ghindex index."""
    path = Path(path)
    if not path.exists():
        raise IndexFileError(f"index {path} does not exist")
    if not path.is_dir():
        raise IndexFileError(f"{path} is not an index directory (expected {INDEX_FILE} and {META_FILE} inside)")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise IndexFileError(f"{path} has no {META_FILE}: not a ghindex index directory") from None
    except ValueError as exc:
        raise IndexFileError(f"{path / META_FILE} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexFileError(f"{path / META_FILE} is not ghindex index metadata")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise IndexFileError(
            f"index {path} has format version {meta['format_version']}; this ghindex reads up to {FORMAT_VERSION}"
        )
    for field in ("bits", "code_bytes", "padded_bytes", "index_key", "ntotal"):
        if field not in meta:
            raise IndexFileError(f"{path / META_FILE} lacks {field!r}")
    return meta


def describe_index(path: str | os.PathLike) -> dict:
    """What an index directory holds, from meta.json and the file size (the index is not loaded)."""
    path = Path(path)
    meta = read_meta(path)
    index_file = path / INDEX_FILE
    if not index_file.is_file():
        raise IndexFileError(f"index {path} lacks {INDEX_FILE}")
    return {
        "kind": "index",
        "path": str(path),
        "index_key": meta["index_key"],
        "faiss_class": meta.get("faiss_class"),
        "bits": meta["bits"],
        "code_bytes": meta["code_bytes"],
        "padded_bytes": meta["padded_bytes"],
        "ntotal": meta["ntotal"],
        "params": meta.get("params", {}),
        "id_map": meta.get("id_map"),
        "store_path": meta.get("store_path"),
        "store_fingerprint": meta.get("store_fingerprint"),
        "encoder_fingerprint": meta.get("encoder_fingerprint"),
        "index_file_bytes": index_file.stat().st_size,
        "created": meta.get("created"),
        "faiss_version": meta.get("faiss_version"),
        "ghindex_version": meta.get("ghindex_version"),
    }


# ------------------------------------------------------------------------------------------- Index
class Index:
    """A FAISS binary index over packed codes with its metadata; searches return the store's ids.

    Load with `Index.load(path)`, build with `build(...)` (on disk) or `build_from_arrays(...)`.
    Codes passed in are at their true width (`code_bytes`); padding to fast widths is internal.
    """

    def __init__(self, faiss_index: faiss.IndexBinary, meta: dict, *, path: str | os.PathLike | None = None,
                 mmap: bool = False):
        self._cpu = faiss_index
        self.meta = meta
        self.path = Path(path) if path is not None else None
        self.mmap = bool(mmap)
        self._gpu = None  # (gpu_index, resources, position -> id array) when on GPU
        self._gpu_shard = False

    # ---- loading and saving
    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = False, gpu: str = "auto",
             gpu_shard: bool = False) -> "Index":
        """Load an index directory. `mmap=True` maps flat codes (IO_FLAG_MMAP_IFC) or IVF lists
        (IO_FLAG_MMAP) from the file instead of reading them into RAM (the index is then read-only).
        `gpu='auto'` puts flat indexes on all GPUs when FAISS has any (replicas, or shards with
        `gpu_shard=True`); 'on' requires it; 'off' stays on CPU."""
        path = Path(path)
        meta = read_meta(path)
        index_file = path / INDEX_FILE
        if not index_file.is_file():
            raise IndexFileError(f"index {path} lacks {INDEX_FILE}")
        flags = 0
        if mmap:
            flags = faiss.IO_FLAG_MMAP if meta.get("index_kind") == "ivf" else faiss.IO_FLAG_MMAP_IFC
        try:
            faiss_index = faiss.read_index_binary(str(index_file), flags)
        except RuntimeError as exc:
            raise IndexFileError(f"{index_file} is not a readable FAISS binary index ({_faiss_reason(exc)})") from None
        expected_dim = int(meta["padded_bytes"]) * 8
        if faiss_index.d != expected_dim or faiss_index.ntotal != int(meta["ntotal"]):
            raise IndexFileError(
                f"{index_file} does not match {META_FILE}: d={faiss_index.d}, ntotal={faiss_index.ntotal} "
                f"vs d={expected_dim}, ntotal={meta['ntotal']}"
            )
        kind = _kind_of(faiss_index)
        if meta.get("index_kind", kind) != kind:
            raise IndexFileError(f"{index_file} holds a {kind} index but {META_FILE} says {meta['index_kind']}")
        _apply_params(faiss_index, kind, meta.get("params", {}))
        index = cls(faiss_index, meta, path=path, mmap=mmap)
        if gpu != "off" or gpu_shard:
            index.to_gpu(gpu, shard=gpu_shard)
        return index

    def save(self, path: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
        """Write the index (its CPU form) and meta.json as a directory, atomically."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ConfigError("no path to save the index to")
        if target == self.path:
            overwrite = True
        self.meta["ntotal"] = int(self._cpu.ntotal)
        with _atomic_dir(target, overwrite) as tmp:
            faiss.write_index_binary(self._cpu, str(tmp / INDEX_FILE))
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2, sort_keys=True) + "\n")
        self.path = target
        return target

    # ---- GPU
    def to_gpu(self, gpu: str = "on", shard: bool = False) -> bool:
        """Search on all GPUs (flat indexes only). Returns whether the index now runs on GPU."""
        if not _resolve_gpu(gpu, "searching"):
            return False
        if self.kind != "flat":
            if gpu == "on":
                raise ConfigError(f"only flat indexes run on GPU; this index is {self.index_key}")
            log.info("%s has no GPU version: searching on CPU", self.index_key)
            return False
        flat = _inner(self._cpu)
        positions_to_ids = faiss.vector_to_array(self._cpu.id_map).astype(np.int64)
        gpu_index, resources = _to_gpu(flat, shard)
        self._gpu = (gpu_index, resources, positions_to_ids)
        self._gpu_shard = bool(shard)
        log.info("searching on %d GPU(s) (%s)", gpu_count(), "shards" if shard else "replicas")
        return True

    def to_cpu(self) -> None:
        """Drop the GPU copy; searches run on the CPU index again."""
        self._gpu = None

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    # ---- properties
    @property
    def bits(self) -> int:
        return int(self.meta["bits"])

    @property
    def code_bytes(self) -> int:
        return int(self.meta["code_bytes"])

    @property
    def padded_bytes(self) -> int:
        return int(self.meta["padded_bytes"])

    @property
    def index_key(self) -> str:
        return str(self.meta["index_key"])

    @property
    def kind(self) -> str:
        return str(self.meta.get("index_kind") or _kind_of(self._cpu))

    @property
    def ntotal(self) -> int:
        return int(self._cpu.ntotal)

    @property
    def faiss_index(self) -> faiss.IndexBinary:
        """The CPU FAISS index (padded codes; ids mapped)."""
        return self._cpu

    @property
    def nprobe(self) -> int:
        """IVF lists visited per query."""
        return int(self._ivf().nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        ivf = self._ivf()
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= ivf.nlist:
            raise ConfigError(f"nprobe must be an integer in 1..{ivf.nlist}, got {value!r}")
        ivf.nprobe = int(value)
        self.meta.setdefault("params", {})["nprobe"] = int(value)

    def _ivf(self):
        inner = _inner(self._cpu)
        if not isinstance(inner, faiss.IndexBinaryIVF):
            raise ConfigError(f"nprobe applies to IVF indexes only; this index is {self.index_key}")
        return inner

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        where = "gpu" if self.on_gpu else ("cpu, mmap" if self.mmap else "cpu")
        return f"Index({self.index_key}, bits={self.bits}, ntotal={self.ntotal:,}, {where})"

    # ---- search
    def search(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest codes by Hamming distance: (distances int32 (Q, k'), ids int64 (Q, k')).

        k' = min(k, ntotal): asking for more neighbours than exist returns all of them. Rows are sorted
        by distance; ties come in FAISS's order. Slots an approximate index could not fill have id -1
        and distance -1.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise SearchError(f"k must be a positive integer, got {k!r}")
        queries = _check_codes(codes, self.code_bytes, "query codes")
        k = int(min(k, self.ntotal))
        if self.on_gpu and k > GPU_MAX_K:
            raise SearchError(f"k={k} exceeds the GPU limit of {GPU_MAX_K}; search on CPU (gpu='off') for larger k")
        distances = np.empty((len(queries), k), dtype=np.int32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        if k == 0:
            return distances, ids
        for start in range(0, len(queries), QUERY_BATCH):
            batch = pad_codes(queries[start:start + QUERY_BATCH], self.padded_bytes)
            if self.on_gpu:
                gpu_index, _resources, positions_to_ids = self._gpu
                d, positions = gpu_index.search(batch, k)
                i = np.where(positions >= 0, positions_to_ids[np.maximum(positions, 0)], -1)
            else:
                d, i = self._cpu.search(batch, k)
            missing = i < 0
            if missing.any():
                d = np.where(missing, -1, d)
            distances[start:start + len(batch)] = d
            ids[start:start + len(batch)] = i
        return distances, ids

    def range_search(self, codes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All codes within Hamming distance <= radius (inclusive, unlike FAISS's strict `<`).

        Returns (lims int64 (Q+1,), distances int32, ids int64): query q's results are
        ``ids[lims[q]:lims[q+1]]``, sorted by distance then id. IVF indexes only look in `nprobe`
        lists; HNSW indexes have no range search. Runs on the CPU index even when on GPU.
        """
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
            raise SearchError(f"radius must be a non-negative integer number of bits, got {radius!r}")
        if self.kind == "hnsw":
            raise SearchError(f"{self.index_key} indexes have no range search; use BFlat, BIVF or BHash")
        queries = _check_codes(codes, self.code_bytes, "query codes")
        parts_lims, parts_d, parts_i = [np.zeros(1, dtype=np.int64)], [], []
        offset = 0
        for start in range(0, len(queries), QUERY_BATCH):
            batch = pad_codes(queries[start:start + QUERY_BATCH], self.padded_bytes)
            # distance <= radius  <=>  distance < radius + 1 (distances are integers)
            lims, d, i = self._cpu.range_search(batch, int(min(radius, self.padded_bytes * 8)) + 1)
            lims = lims.astype(np.int64)
            d = d.astype(np.int32)
            query_of = np.repeat(np.arange(len(batch)), np.diff(lims))
            order = np.lexsort((i, d, query_of))
            parts_lims.append(lims[1:] + offset)
            parts_d.append(d[order])
            parts_i.append(i[order].astype(np.int64))
            offset += int(lims[-1])
        return (
            np.concatenate(parts_lims),
            np.concatenate(parts_d) if parts_d else np.zeros(0, np.int32),
            np.concatenate(parts_i) if parts_i else np.zeros(0, np.int64),
        )

    # ---- add
    def add(self, codes: np.ndarray, ids: np.ndarray) -> None:
        """Add codes with their ids (>= 0; not checked against ids already in the index). Call `save` to keep them."""
        if self.mmap:
            raise IndexFileError(
                f"index {self.path} was loaded with mmap=True and is read-only; load it without mmap to add codes"
            )
        codes = _check_codes(codes, self.code_bytes, "codes to add")
        ids = _check_ids(ids, len(codes), "ids to add")
        if len(np.unique(ids)) != len(ids):
            raise ConfigError("ids to add must be unique")
        if not len(codes):
            return
        self._cpu.add_with_ids(pad_codes(codes, self.padded_bytes), ids)
        self.meta["ntotal"] = self.ntotal
        if self.on_gpu:  # re-copy: shards keep contiguous position ranges only when built from scratch
            self._gpu = None
            self.to_gpu("on", shard=self._gpu_shard)
