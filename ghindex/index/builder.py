"""Building an index: plan (key, params, memory), train IVF on a sample, add codes in chunks, write metadata."""
from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from ..errors import ConfigError, StoreError
from ..hashing import check_bits
from ..store import CodeStore
from ..version import __version__
from . import gpu as faiss_gpu  # looked up at call time: tests replace its functions
from .codes import _check_ids, pad_codes, padded_width
from .core import Index
from .drift import drift_reference
from .files import FORMAT, FORMAT_VERSION, _check_out
from .keys import (
    MIN_POINTS_PER_LIST,
    TRAIN_POINTS_PER_LIST,
    default_nprobe,
    parse_index_params,
    resolve_index_key,
)
from .memory import CHUNK_ROWS, estimate_memory, format_size, parse_size
from .sampling import ChunkSource, gather, live_chunks, sample_positions
from .structures import _apply_params, _inner, _new_faiss_index
from .tuning import TUNE_QUERIES, TUNED_PARAM, check_target, tune_from_database

log = logging.getLogger(__name__)


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
        self.use_gpu = faiss_gpu._resolve_gpu(gpu, "building") and self.spec.kind == "ivf"
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
        clustering = faiss_gpu._gpu_clustering_index(self.width * 8) if self.use_gpu else None
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
    return gather(chunks, sample_positions(n, size, seed), code_bytes, n)[0]


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="code", unit_scale=True, file=sys.stderr,
                disable=None, leave=False)


def build_from_arrays(codes: np.ndarray, ids: np.ndarray | None = None, index_key: str = "auto",
                      index_param=(), gpu: str = "off", max_memory=None, *, bits: int | None = None,
                      seed: int = 0, chunk_rows: int = CHUNK_ROWS, target_recall: float | None = None,
                      target_k: int = 10, tune_queries: int = TUNE_QUERIES) -> "Index":
    """Build an in-memory `Index` from packed codes (N, bits/8) already in RAM (ids default to 0..N-1).

    Same keys, parameters, recall target and checks as `build`; nothing is written (use `Index.save`).
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
    _check_tuning(builder, index_param, target_recall, target_k)
    faiss_index = builder.build(chunks)
    meta = _make_meta(builder, faiss_index, store=None)
    index = Index(faiss_index, meta)
    meta.update(_lifecycle_meta(builder, index, chunks, target_recall, target_k, tune_queries))
    return index


def build(codes: str | os.PathLike, out: str | os.PathLike, index_key: str = "auto", index_param=(),
          gpu: str = "auto", max_memory=None, *, overwrite: bool = False, seed: int = 0,
          chunk_rows: int | None = None, target_recall: float | None = None, target_k: int = 10,
          tune_queries: int = TUNE_QUERIES) -> dict:
    """Build a FAISS binary index directory `out` from the HDF5 code store `codes`.

    The store is read in chunks of `chunk_rows` rows (default: the store's, about 32 MiB; memory stays
    bounded); its ids are kept. `index_key` is
    `auto` (flat up to 1M codes, else IVF with lists chosen from N) or a binary factory string (see
    `parse_index_key`); `index_param` holds `name=value` strings (nprobe, train_size, kmeans_iters,
    efSearch, efConstruction, nflip). The memory the index needs is estimated and logged first; the
    build stops before reading codes when it exceeds `max_memory` ('8G', bytes). `gpu='auto'|'on'|'off'`
    runs IVF k-means on GPU when FAISS has one. `out` is written as a temp directory then renamed; an
    existing index there is replaced only with `overwrite=True`. Returns the index's metadata.

    Rows the store marks deleted (`remove`) are left out. `target_recall` (IVF, HNSW) sets the smallest
    nprobe / efSearch whose tie-aware recall@`target_k` on `tune_queries` database codes sampled as
    queries reaches it (`ghindex.index.tuning`); meta.json's `tuning` records the value, the measured
    recall and queries/s. IVF indexes also record how far their codes sit from their lists' centroids
    (`drift`), against which `add` measures new codes.
    """
    out = Path(out)
    _check_out(out, overwrite)
    start = time.perf_counter()
    with CodeStore.open(codes) as store:
        n, bits = len(store) - store.num_deleted, int(store.bits)
        if n == 0:
            raise StoreError(f"code store {codes} holds no codes" + (" (all deleted)" if len(store) else ""))
        if int(store.code_bytes) * 8 != bits:
            raise StoreError(f"code store {codes}: {store.code_bytes} bytes per code do not hold {bits} bits")

        chunk_rows = int(chunk_rows or store.default_iter_rows())
        chunks = live_chunks(store, codes, chunk_rows)
        builder = _IndexBuilder(n, bits, index_key, index_param, gpu, max_memory, seed, chunk_rows)
        _check_tuning(builder, index_param, target_recall, target_k)
        faiss_index = builder.build(chunks)
        meta = _make_meta(builder, faiss_index, store=store, store_path=codes)
        index = Index(faiss_index, meta)
        meta.update(_lifecycle_meta(builder, index, chunks, target_recall, target_k, tune_queries))
    meta["build_seconds"] = round(time.perf_counter() - start, 3)
    index.save(out, overwrite=overwrite)
    log.info("wrote %s (%s codes, %s) in %.1f s", out, f"{index.ntotal:,}", meta["index_key"], meta["build_seconds"])
    return dict(index.meta, path=str(out))


def _check_tuning(builder: _IndexBuilder, index_param, target_recall, target_k) -> None:
    """Refuse a recall target the index cannot be tuned for, before any work."""
    if target_recall is None:
        return
    check_target(target_recall, target_k, builder.spec.kind, builder.spec.key)
    name = TUNED_PARAM[builder.spec.kind]
    given = parse_index_params(index_param, builder.spec)
    if name in given:
        raise ConfigError(f"a recall target chooses {name} itself: drop the index parameter {name}="
                          f"{given[name]} or the target")


def _lifecycle_meta(builder: _IndexBuilder, index: Index, chunks: ChunkSource, target_recall, target_k,
                    tune_queries) -> dict:
    """IVF: the codes' distance to their centroids (for `add`); with a target: the tuned setting."""
    extra = {}
    if builder.spec.kind == "ivf":
        extra["drift"] = drift_reference(index, chunks, builder.n, builder.seed)
    if target_recall is not None:
        extra["tuning"] = tune_from_database(index, chunks, builder.n, target_recall, target_k, tune_queries,
                                             seed=builder.seed)
    return extra


def _make_meta(builder: _IndexBuilder, faiss_index, store, store_path=None) -> dict:
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
