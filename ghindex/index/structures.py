"""FAISS binary index objects: construct one from an IndexSpec, unwrap id maps, apply search parameters."""
from __future__ import annotations

import faiss

from ..errors import ConfigError, IndexFileError
from .keys import _BUILD_ONLY_PARAMS, IndexSpec

#: Queries IndexBinaryFlat scans the database for at once (FAISS's default, 32, re-reads the whole
#: database every 32 queries; 1024 searched 2.5x faster on 1M 64-bit codes, benchmarks/RESULTS.md).
FLAT_QUERY_BATCH = 1024


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
