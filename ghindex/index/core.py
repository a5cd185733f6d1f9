"""The `Index` class: a loaded or built FAISS binary index with its metadata; search, range search, add, save."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import faiss
import numpy as np

from .. import flatscan
from ..errors import ConfigError, IndexFileError, SearchError
from .codes import _check_codes, _check_ids, pad_codes
from .files import INDEX_FILE, META_FILE, _atomic_dir, _faiss_reason, read_meta, write_meta
from . import gpu as faiss_gpu  # looked up at call time: tests replace its functions
from .gpu import GPU_MAX_K
from .structures import _apply_params, _inner, _kind_of

log = logging.getLogger(__name__)

#: Queries per FAISS call: big enough for FAISS's per-query threads, small enough to bound memory.
QUERY_BATCH = 65_536
#: Who scans a flat index on the CPU: "ghindex" (`ghindex.flatscan`: faster, ties ranked by database
#: position) or "faiss" (FAISS's own scan, ties in its heap's order). IVF, HNSW and hash indexes and
#: GPUs always search with FAISS.
ENGINES = ("ghindex", "faiss")
DEFAULT_ENGINE = "ghindex"


def check_engine(engine) -> str:
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return engine


class Index:
    """A FAISS binary index over packed codes with its metadata; searches return the store's ids.

    Load with `Index.load(path)`, build with `build(...)` (on disk) or `build_from_arrays(...)`.
    Codes passed in are at their true width (`code_bytes`); padding to fast widths is internal.
    `engine` (settable): who scans a flat index on the CPU, see ENGINES.
    """

    def __init__(self, faiss_index: faiss.IndexBinary, meta: dict, *, path: str | os.PathLike | None = None,
                 mmap: bool = False, engine: str = DEFAULT_ENGINE):
        self.engine = engine
        self._cpu = faiss_index
        self.meta = meta
        self.path = Path(path) if path is not None else None
        self.mmap = bool(mmap)
        self._gpu = None  # (gpu_index, resources, position -> id array) when on GPU
        self._gpu_shard = False

    # ---- loading and saving
    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = False, gpu: str = "auto",
             gpu_shard: bool = False, engine: str = DEFAULT_ENGINE) -> "Index":
        """Load an index directory. `mmap=True` maps flat codes (IO_FLAG_MMAP_IFC) or IVF lists
        (IO_FLAG_MMAP) from the file instead of reading them into RAM (the index is then read-only).
        `gpu='auto'` puts flat indexes on all GPUs when FAISS has any (replicas, or shards with
        `gpu_shard=True`); 'on' requires it; 'off' stays on CPU. `engine`: who scans a flat index on
        the CPU, 'ghindex' (default) or 'faiss' (see ENGINES)."""
        check_engine(engine)
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
        index = cls(faiss_index, meta, path=path, mmap=mmap, engine=engine)
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
            write_meta(tmp, self.meta, target, self.path)  # the store link relative to target
        self.path = target
        return target

    # ---- GPU
    def to_gpu(self, gpu: str = "on", shard: bool = False) -> bool:
        """Search on all GPUs (flat indexes only). Returns whether the index now runs on GPU."""
        if not faiss_gpu._resolve_gpu(gpu, "searching"):
            return False
        if self.kind != "flat":
            if gpu == "on":
                raise ConfigError(f"only flat indexes run on GPU; this index is {self.index_key}")
            log.info("%s has no GPU version: searching on CPU", self.index_key)
            return False
        flat = _inner(self._cpu)
        positions_to_ids = faiss.vector_to_array(self._cpu.id_map).astype(np.int64)
        gpu_index, resources = faiss_gpu._to_gpu(flat, shard)
        self._gpu = (gpu_index, resources, positions_to_ids)
        self._gpu_shard = bool(shard)
        log.info("searching on %d GPU(s) (%s)", faiss_gpu.gpu_count(), "shards" if shard else "replicas")
        return True

    def to_cpu(self) -> None:
        """Drop the GPU copy; searches run on the CPU index again."""
        self._gpu = None

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    # ---- engine
    @property
    def engine(self) -> str:
        """Who scans a flat index on the CPU: 'ghindex' or 'faiss' (see ENGINES)."""
        return self._engine

    @engine.setter
    def engine(self, value: str) -> None:
        self._engine = check_engine(value)

    def _flatscan(self):
        """(codes, position -> id) when CPU searches go through ghindex.flatscan, else None. Both are
        views of FAISS's own arrays (no copy); ids None when positions are the ids (no id map)."""
        if self._engine != "ghindex" or not flatscan.SUPPORTED:
            return None
        inner = _inner(self._cpu)
        if not isinstance(inner, faiss.IndexBinaryFlat):
            return None
        ids = None
        if isinstance(self._cpu, faiss.IndexBinaryIDMap):
            id_map = self._cpu.id_map
            ids = faiss.rev_swig_ptr(id_map.data(), id_map.size()) if id_map.size() else np.zeros(0, np.int64)
        return flatscan.faiss_codes(inner), ids

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
    def search(self, codes: np.ndarray, k: int, *, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k nearest codes by Hamming distance: (distances int32 (Q, k'), ids int64 (Q, k')).

        k' = min(k, ntotal): asking for more neighbours than exist returns all of them. Rows are sorted
        by distance. A flat index on the CPU with engine 'ghindex' (the default) ranks ties by database
        position (the order codes were added), the rule `ghindex eval` uses: a row is the first k' of a
        stable sort of the exact distances. Otherwise ties come in FAISS's order. Slots an approximate
        index could not fill have id -1 and distance -1. `threads`: threads of that exact scan (default:
        FAISS's, `faiss.omp_get_max_threads()`).
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
        scan = None if self.on_gpu else self._flatscan()
        for start in range(0, len(queries), QUERY_BATCH):
            batch = pad_codes(queries[start:start + QUERY_BATCH], self.padded_bytes)
            if self.on_gpu:
                gpu_index, _resources, positions_to_ids = self._gpu
                d, positions = gpu_index.search(batch, k)
                i = np.where(positions >= 0, positions_to_ids[np.maximum(positions, 0)], -1)
            elif scan is not None:
                d, positions = flatscan.knn(scan[0], batch, k, threads=threads or faiss.omp_get_max_threads())
                i = positions if scan[1] is None else scan[1][positions]
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
        lists; HNSW indexes have no range search. Runs on the CPU index even when on GPU (a flat one
        with `ghindex.flatscan` unless engine is 'faiss'; the results are the same).
        """
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
            raise SearchError(f"radius must be a non-negative integer number of bits, got {radius!r}")
        if self.kind == "hnsw":
            raise SearchError(f"{self.index_key} indexes have no range search; use BFlat, BIVF or BHash")
        queries = _check_codes(codes, self.code_bytes, "query codes")
        parts_lims, parts_d, parts_i = [np.zeros(1, dtype=np.int64)], [], []
        offset = 0
        scan = self._flatscan()
        # flatscan sorts by (distance, position): that is (distance, id) when ids grow with position
        presorted = scan is not None and (scan[1] is None or bool(np.all(scan[1][1:] > scan[1][:-1])))
        for start in range(0, len(queries), QUERY_BATCH):
            batch = pad_codes(queries[start:start + QUERY_BATCH], self.padded_bytes)
            # distance <= radius  <=>  distance < radius + 1 (distances are integers)
            strict = int(min(radius, self.padded_bytes * 8)) + 1
            if scan is not None:
                lims, d, positions = flatscan.range_search(scan[0], batch, strict, threads=faiss.omp_get_max_threads())
                i = positions if scan[1] is None else scan[1][positions]
            else:
                lims, d, i = self._cpu.range_search(batch, strict)
            lims = lims.astype(np.int64)
            d = d.astype(np.int32)
            if not presorted:
                query_of = np.repeat(np.arange(len(batch)), np.diff(lims))
                order = np.lexsort((i, d, query_of))
                d, i = d[order], i[order]
            parts_lims.append(lims[1:] + offset)
            parts_d.append(d)
            parts_i.append(i.astype(np.int64))
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

    # ---- remove
    #: Index kinds FAISS can remove codes from (flat through its id map, IVF from its lists).
    REMOVABLE_KINDS = ("flat", "ivf")

    def remove(self, ids) -> int:
        """Remove the codes with these ids (ids not in the index are ignored); returns how many went.

        Flat and IVF indexes only (FAISS has no removal for HNSW and hash indexes: rebuild those). Other
        ids keep their codes and ids. Call `save` to keep the change.
        """
        if self.mmap:
            raise IndexFileError(
                f"index {self.path} was loaded with mmap=True and is read-only; load it without mmap to remove codes"
            )
        if self.kind not in self.REMOVABLE_KINDS:
            raise ConfigError(f"FAISS cannot remove codes from {self.index_key} indexes; rebuild without them")
        ids = np.unique(_check_ids(np.asarray(ids).reshape(-1), np.asarray(ids).size, "ids to remove"))
        if not len(ids):
            return 0
        removed = int(self._cpu.remove_ids(faiss.IDSelectorBatch(ids)))
        self.meta["ntotal"] = self.ntotal
        if self.on_gpu and removed:
            self._gpu = None
            self.to_gpu("on", shard=self._gpu_shard)
        return removed
