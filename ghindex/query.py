"""`query`: nearest neighbours from an index for images, stored codes or stored ids.

Results come back per query, ranked by Hamming distance with ties by database position (the same
rule as the metrics), with each neighbour's id, distance, and its path and label when the code store
the index was built from (index meta `store_path`) keeps them. Image queries re-rank their nearest
`RERANK` codes by weighted Hamming distance (the query's hash outputs weigh its bits, see `query`).
Images are encoded with the given model, which must be the model the index's codes came from: its
file fingerprint must equal the index's `encoder_fingerprint` unless `force=True`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass

import numpy as np

from .encoder import Encoder
from .errors import ConfigError, DataError, ImageError, ModelFileError, SearchError, StoreError
from .hashing import pack_signs, surest_confidences, weighted_hamming
from .ids import StoreLookup, parse_ids
from .images import load_image
from .io import atomic_path, file_fingerprint
from .runtime import use_runtime
from .store import CodeStore
from .store import resolve_radius

log = logging.getLogger(__name__)

# Image queries: candidates re-ranked by weighted Hamming distance. On the copies validation split (64
# bits, 5,000 database images) re-ranking the first 50 by Hamming distance found as many originals as
# ranking all 5,000 that way; 100 leaves room for larger databases. Their distances take ~0.01-0.02 ms
# per query.
RERANK = 100

#: Largest grid the retrieval picture draws (rows = queries, columns = neighbours).
GRID_MAX_QUERIES = 32
GRID_MAX_NEIGHBOURS = 20
GRID_CELL = 96


class _Store:
    """The index's code store, read lazily: rows by id, labels, paths, class names."""

    def __init__(self, store):
        self.store = store
        self.lookup = StoreLookup(store.ids())
        self.labels = store.labels()
        self.class_names = store.class_names
        self.has_paths = store.has_paths  # asked for every result: an HDF5 lookup each time otherwise
        self._paths = None

    def paths(self, rows) -> list[str | None]:
        if not self.has_paths:
            return [None] * len(rows)
        rows = [int(r) for r in rows]
        if self._paths is None and len(set(rows)) * 50 > len(self.store):
            self._paths = self.store.paths()
        if self._paths is not None:
            return [self._paths[r] if r >= 0 else None for r in rows]
        cache = {r: self.store.read(r, r + 1).paths[0] for r in set(rows) if r >= 0}
        return [cache.get(r) for r in rows]

    def label(self, row: int):
        if self.labels is None or row < 0:
            return None
        return _label_value(self.labels[row])

    def label_name(self, value):
        return _label_name(value, self.class_names)


def _label_value(raw):
    """int for single-label rows, list of class indices for multi-hot rows."""
    raw = np.asarray(raw)
    if raw.ndim == 0:
        return int(raw)
    return [int(i) for i in np.flatnonzero(raw)]


def _label_name(value, class_names):
    if value is None or not class_names:
        return None
    if isinstance(value, list):
        return [class_names[i] if 0 <= i < len(class_names) else str(i) for i in value]
    return class_names[value] if 0 <= value < len(class_names) else str(value)


def _relevant(a, b) -> bool | None:
    if a is None or b is None:
        return None
    sa = set(a) if isinstance(a, list) else {a}
    sb = set(b) if isinstance(b, list) else {b}
    return bool(sa & sb)


class Searcher:
    """An index with its code store and, optionally, the model its codes came from: loaded once, then
    answering any number of searches. `query` makes one per call; `ghindex serve` one for its lifetime.

    `index`: an index directory or a loaded `Index`. The code store the index was built from (meta
    `store_path`) supplies neighbours' paths and labels and the codes of stored ids; without it results
    carry ids and distances only (`need_store=True`: StoreError instead). `model`: encodes query
    images; it must be the index's encoder (same file fingerprint) unless `force`. `force` also accepts
    a code store changed since the index was built. `close()` (or `with`) closes the store.
    The store is found by `ghindex.index.files.store_path_of` (next to the index first, so a copied
    folder works); `root` replaces the folder its image paths are relative to (`CodeStore.open`).
    `runtime`: where image queries run the backbone (`ghindex.runtime.use_runtime`); ``torch`` by default,
    since exporting pays off only over many images (`ghindex serve` asks for ``auto``).
    """

    def __init__(self, index, model=None, *, force: bool = False, gpu: str = "auto", gpu_shard: bool = False,
                 device=None, need_store: bool = False, root=None, engine: str = "ghindex",
                 runtime: str = "torch"):
        from .index import Index  # faiss: loaded when a searcher opens an index
        from .index.files import store_path_of
        from .index.lookup import CodesById
        self.index = index if isinstance(index, Index) else Index.load(index, gpu=gpu, gpu_shard=gpu_shard,
                                                                       engine=engine)
        self.name = str(self.index.path) if self.index.path is not None else "<in memory>"
        self.force = force
        self.store, self.db = None, None
        self.encoder, self.model_path = None, None
        self.codes_by_id = None  # ids -> codes from memory (ghindex.index.lookup), with the store
        self._confidences: np.ndarray | None = None  # the store's bit confidences, read at the first re-ranking
        self._confidences_lock = threading.Lock()
        meta = self.index.meta
        self.store_path = store_path_of(self.index.path, meta)
        if self.store_path and os.path.exists(self.store_path):
            store = CodeStore.open(self.store_path, root=root)
            recorded = meta.get("store_fingerprint")
            if recorded and recorded != store.fingerprint and not force:
                store.close()
                raise StoreError(
                    f"code store {self.store_path} has changed since index {self.name} was built (fingerprint "
                    "differs), so its paths and labels may not match the index: rebuild the index, or pass force"
                )
            self.store, self.db = store, _Store(store)
            self.codes_by_id = CodesById(self.index, store, self.db.lookup)
        elif need_store:
            raise StoreError(
                f"index {self.name} has no code store to look ids up in (recorded: {self.store_path or 'none'})")
        else:
            log.warning("code store of index %s not found (%s): results have ids and distances only",
                        self.name, self.store_path or "none recorded")
        if model is not None:
            try:
                self._load_model(model, device, runtime)
            except BaseException:
                self.close()
                raise

    def copy_radius(self) -> int:
        """The copy radius the index's code store recorded from its model (`radius='auto'`)."""
        if self.store is None:
            raise ConfigError(f"index {self.name} has no code store to read its copy radius from "
                              f"(recorded: {self.store_path or 'none'}): pass --radius N")
        return resolve_radius("auto", self.store.attrs, self.index.bits, f"code store {self.store_path}")

    def _load_model(self, model, device, runtime: str) -> None:
        idx, index_encoder = self.index, self.index.meta.get("encoder_fingerprint")
        # The header first: a missing, foreign or unsafe file, or a model of other bits, is named as such
        # rather than as "not the index's model".
        config = Encoder.read_config(model)
        if config.bits != idx.bits:
            raise ModelFileError(f"model {model} makes {config.bits}-bit codes but the index holds {idx.bits}-bit codes")
        fingerprint = file_fingerprint(model)
        if not self.force:
            if not index_encoder:
                raise ModelFileError(
                    f"index {idx.path} records no encoder fingerprint, so model {model} cannot be checked "
                    "against it; pass force to encode with it anyway"
                )
            if fingerprint != index_encoder:
                raise ModelFileError(
                    f"model {model} (sha256 {fingerprint[:12]}...) is not the model index {idx.path} was built "
                    f"with (sha256 {index_encoder[:12]}...): its codes would not be comparable; use that model, "
                    "or pass force"
                )
        self.encoder = Encoder.load(model, device=device or "cpu")
        use_runtime(self.encoder, runtime)  # where image queries run the backbone (`ghindex.runtime`)
        self.model_path = os.fspath(model)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store, self.db, self.codes_by_id = None, None, None
            self._confidences = None

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def class_names(self) -> list[str] | None:
        return self.db.class_names if self.db is not None else None

    def row(self, id_: int) -> int:
        """Row of a stored id in the code store, -1 when absent (or when there is no store)."""
        if self.db is None or not -(2 ** 63) <= int(id_) < 2 ** 63:
            return -1
        return int(self.db.lookup.rows(np.asarray([id_], np.int64))[0])

    def stored_ids(self) -> np.ndarray:
        """Every id of the code store, sorted (empty without a store)."""
        return self.db.lookup.sorted_ids if self.db is not None else np.zeros(0, np.int64)

    def item(self, id_: int) -> dict | None:
        """{"id", "label", "label_name", "path"} of a stored id; None when the store lacks it."""
        row = self.row(id_)
        if row < 0:
            return None
        label = self.db.label(row)
        return {"id": int(id_), "label": label, "label_name": self.db.label_name(label),
                "path": self.db.paths([row])[0]}

    def cache_paths(self, max_rows: int = 2_000_000) -> bool:
        """Keep every path of the code store in memory (a long-lived searcher's neighbours then need no
        HDF5 read) when it holds paths and at most `max_rows` rows. Returns whether it did."""
        if self.db is None or not self.store.has_paths or len(self.store) > max_rows:
            return False
        if self.db._paths is None:
            self.db._paths = self.store.paths()
        return True

    def hash_outputs(self, images, batch_size: int = 64) -> np.ndarray:
        """The model's continuous hash outputs H of images (paths or PIL images): their codes are H >= 0
        (`pack_signs`), and |H| weighs the bits when re-ranking (`rerank_distances`)."""
        if self.encoder is None:
            raise ConfigError("images need a model to encode them (--model)")
        return self.encoder.hash_outputs(list(images), batch_size=batch_size)

    def bit_confidences(self) -> np.ndarray | None:
        """Every stored row's packed bit confidences (`ghindex.hashing.pack_confidences`), read from the store
        once and kept (bits/4 bytes a row); None when the store keeps none (codes made before them)."""
        with self._confidences_lock:
            if self._confidences is None and self.store is not None and self.store.has_confidences:
                self._confidences = self.store.confidences()
            return self._confidences

    def rerank_distances(self, projections: np.ndarray, found: np.ndarray) -> np.ndarray:
        """(Q, K) weighted Hamming distances (`ghindex.hashing.weighted_hamming`) of the queries whose hash
        outputs are `projections` to the neighbours `found` (ids; -1: none, at infinity), whose codes come
        from memory (`codes_by_id`), each differing bit also weighed by the neighbour's confidence in it
        where the store keeps them (`bit_confidences`)."""
        if self.codes_by_id is None:
            raise StoreError(f"index {self.name} has no code store to read the neighbours' codes from for "
                             f"re-ranking (recorded: {self.store_path or 'none'}): pass rerank=0")
        valid = found >= 0
        bits = self.index.bits
        codes = np.zeros(found.shape + (bits // 8,), np.uint8)
        stored = self.bit_confidences()
        # rows without one (none found, or a row the store gained after it was read): sure of every bit
        sure = None if stored is None else surest_confidences(found.size, bits).reshape(found.shape + (-1,))
        if valid.any():
            looked_up = self.codes_by_id(found[valid])
            codes[valid] = looked_up.codes
            if sure is not None:
                rows = looked_up.rows
                known = rows < len(stored)
                picked = surest_confidences(len(rows), bits)
                picked[known] = stored[rows[known]]
                sure[valid] = picked
        return np.where(valid, weighted_hamming(projections, codes, sure), np.inf).astype(np.float32)

    def codes_for_ids(self, ids) -> "Queries":
        """The stored codes of `ids` and their query records, looked up from memory in one call
        (ConfigError for an id not stored). Ids the index holds are its `self_ids`."""
        if self.db is None:
            raise StoreError(f"index {self.name} has no code store to look ids up in (recorded: {self.store_path or 'none'})")
        ids = parse_ids(ids)
        found = self.codes_by_id(ids)  # ConfigError "id X is not in code store PATH" for the first unknown
        rows = found.rows.tolist()
        paths = self.db.paths(rows)
        q_meta = []
        for i, r, p in zip(ids, rows, paths):
            label = self.db.label(r)
            q_meta.append({"query": f"id:{i}", "query_id": int(i), "query_path": p, "query_label": label,
                           "query_label_name": self.db.label_name(label)})
        self_ids = np.where(found.in_index, np.asarray(ids, np.int64), -1)
        return Queries(found.codes, q_meta, self_ids)

    def search(self, q_codes: np.ndarray, k: int, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids) of the k nearest codes: `Index.search` (`threads`: of its exact scan)."""
        return self.index.search(q_codes, int(k), threads=threads)

    def records(self, q_meta: list[dict], dist: np.ndarray, found: np.ndarray, radius: int | None = None, *,
                k: int | None = None, self_ids: np.ndarray | None = None, exclude_self: bool = False,
                scores: np.ndarray | None = None) -> list[dict]:
        """Search output -> one result per query: its q_meta record plus "neighbors" ranked by distance,
        ties by database position, within `radius` when given, at most `k` (default: all found).

        `self_ids` (queries by stored id, see `codes_for_ids`): each query's own id in the index, -1
        for none. The item itself comes first among its ties (it is put first at distance 0 when the
        search left it out behind k other exact copies), or is left out with `exclude_self` (search
        `search_depth(k, True)` neighbours for that, so that k others remain). `scores`: re-ranking
        distances (`rerank_distances`) that order the neighbours instead, then Hamming, then position."""
        return _assemble(q_meta, dist, found, self.db, radius, k, self_ids, exclude_self, scores)


@dataclass
class Queries:
    """Query codes with their records (`Searcher.records`' q_meta); `self_ids`: for queries by stored
    id, each query's own id where the index holds it, else -1 (None: no query is a stored id)."""

    codes: np.ndarray
    meta: list[dict]
    self_ids: np.ndarray | None = None


def search_depth(k: int, exclude_self: bool) -> int:
    """Neighbours to search for k results: one more when the item itself is to be left out."""
    return int(k) + (1 if exclude_self else 0)


def query_record(name: str, path: str | None = None) -> dict:
    """The query fields of a result for a query that is not a stored id (an image or a bare code)."""
    return {"query": name, "query_id": None, "query_path": path, "query_label": None, "query_label_name": None}


def query(index, model=None, images=(), codes=None, ids=(), k: int = 10, radius: int | str | None = None,
          force: bool = False, grid=None, batch_size: int = 64, device=None, gpu: str = "auto",
          gpu_shard: bool = False, root=None, engine: str = "ghindex", exclude_self: bool = False,
          rerank: int | None = None) -> list[dict]:
    """Search `index` for each query and return one dict per query.

    Queries are exactly one of: `images` (paths, encoded with `model`), `codes` (a code store: all
    its codes, with its labels and paths), `ids` (ids in the index's code store, e.g. "3,17"; their
    codes come from memory: the flat index's own, or the store's read once).
    `k`: neighbours per query; `radius`: keep only neighbours within this Hamming distance (still at
    most k); 'auto': the copy radius the index's code store recorded from its model (ConfigError when
    it has none). A query by id finds its own item first among its ties (at distance 0, before exact
    copies stored earlier); `exclude_self` leaves it out instead (k other neighbours; ids only).
    `force`: accept a model or query store whose encoder differs from the index's, and a
    code store that changed since the index was built. `grid`: write a PNG with each query image and
    its neighbours, framed green (relevant) / red (not) when labels are known. `gpu`, `gpu_shard`: as
    `Index.load` (a flat index goes on all GPUs FAISS sees: a replica on each, or shards). `root`: the
    folder the index's code store's image paths are relative to, instead of the one it records
    (images moved on their own). `engine`: who scans a flat index on the CPU, as `Index.load`.
    `rerank` (image queries): the `rerank` nearest codes by Hamming distance are ranked again by the
    query's weighted Hamming distance (`ghindex.hashing.weighted_hamming`: bits weighed by how sure the
    query image is of each, times how sure the stored code is where the store keeps bit confidences,
    `Searcher.rerank_distances`), and the first k kept; None: `RERANK` for image queries (needs the index's
    code store), 0: plain Hamming ranking. Edited copies of database images come first far more often
    (benchmarks/RESULTS.md, "Copies"). Queries by codes or ids have no hash outputs: Hamming only.

    Each result: {"query", "query_id", "query_path", "query_label", "query_label_name",
    "neighbors": [{"rank", "id", "distance", "path", "label", "label_name", "relevant"}]}; neighbours
    of re-ranked queries also have "weighted_distance" and are ordered by it ("distance" stays the
    Hamming distance, which `radius` limits).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    auto_radius = isinstance(radius, str) and radius.strip().lower() == "auto"
    if radius is not None and not auto_radius and (
            isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0):
        raise ConfigError(f"radius must be a non-negative integer number of bits or 'auto', got {radius!r}")
    images = [images] if isinstance(images, (str, os.PathLike)) else list(images or ())
    ids = parse_ids(ids or ())
    given = [name for name, value in (("images", images), ("codes", codes), ("ids", ids)) if value]
    if len(given) != 1:
        raise ConfigError("give exactly one kind of query: images (with a model), codes (a code store) or ids"
                          + (f"; got {' and '.join(given)}" if given else ""))
    if images and model is None:
        raise ConfigError("images need a model to encode them (--model)")
    if model is not None and not images:
        raise ConfigError("a model is only used to encode query images; give images too")
    if exclude_self and not ids:
        raise ConfigError("exclude_self leaves out a query's own item: it applies to queries by id only")
    if rerank is not None and (isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 0):
        raise ConfigError(f"rerank must be a non-negative number of candidates, got {rerank!r}")
    if rerank and not images:
        raise ConfigError("rerank weighs the query image's own hash outputs: it applies to image queries only")

    with Searcher(index, model, force=force, gpu=gpu, gpu_shard=gpu_shard, device=device,
                  need_store=bool(ids), root=root, engine=engine) as searcher:
        idx = searcher.index
        if auto_radius:
            radius = searcher.copy_radius()
        self_ids = None  # queries by id: their own ids in the index
        projections = None  # image queries: hash outputs, for re-ranking
        if images:
            projections = searcher.hash_outputs([os.fspath(p) for p in images], batch_size=batch_size)
            q_codes = pack_signs(projections)
            if rerank is None and searcher.codes_by_id is None:
                log.warning("no code store: image queries are ranked by Hamming distance, without re-ranking")
                rerank = 0
            rerank = RERANK if rerank is None else int(rerank)
            q_meta = [query_record(os.fspath(p), os.path.abspath(p)) for p in images]
        elif codes is not None:
            with CodeStore.open(codes) as q_store:
                if q_store.bits != idx.bits:  # before the encoder check: the more basic mismatch
                    raise SearchError(
                        f"code store {codes} holds {q_store.bits}-bit codes but index {searcher.name} holds "
                        f"{idx.bits}-bit codes"
                    )
                enc, index_encoder = q_store.encoder_fingerprint, idx.meta.get("encoder_fingerprint")
                if enc and index_encoder and enc != index_encoder and not force:
                    raise ModelFileError(
                        f"code store {codes} was encoded with another model than index {searcher.name} "
                        "(encoder fingerprints differ); pass force to search anyway"
                    )
                if len(q_store) == 0:
                    raise DataError(f"code store {codes} holds no codes: nothing to query")
                batch = q_store.read()
                q_codes = batch.codes
                q_paths = batch.paths or [None] * len(q_codes)
                labels = batch.labels
                q_meta = []
                for j, (i, p) in enumerate(zip(batch.ids, q_paths)):
                    label = None if labels is None else _label_value(labels[j])
                    q_meta.append({"query": f"id:{int(i)}", "query_id": int(i), "query_path": p,
                                   "query_label": label, "query_label_name": _label_name(label, q_store.class_names)})
        else:
            by_id = searcher.codes_for_ids(ids)
            q_codes, q_meta, self_ids = by_id.codes, by_id.meta, by_id.self_ids
        depth = search_depth(k, exclude_self)
        dist, found = searcher.search(q_codes, max(depth, rerank or 0))
        scores = searcher.rerank_distances(projections, found) if rerank else None
        results = searcher.records(q_meta, dist, found, radius, k=int(k), self_ids=self_ids,
                                   exclude_self=exclude_self, scores=scores)
    if grid is not None:
        write_grid(results, grid)
    return results


def _assemble(q_meta, dist, found, db, radius, k=None, self_ids=None, exclude_self=False, scores=None) -> list[dict]:
    results = []
    # store rows of every neighbour at once (one lookup per call, not per query)
    all_rows = db.lookup.rows(found) if db is not None else np.full(np.shape(found), -1, np.int64)
    for qi, m in enumerate(q_meta):
        d, i, rows = dist[qi], found[qi], all_rows[qi]
        w = scores[qi] if scores is not None else None  # re-ranking distances (image queries: no own item)
        own = int(self_ids[qi]) if self_ids is not None else -1
        keep = i >= 0
        if radius is not None:
            keep &= d <= radius
        if own >= 0 and exclude_self:
            keep &= i != own
        if not keep.all():
            d, i, rows = d[keep], i[keep], rows[keep]
            w = w[keep] if w is not None else None
        if own >= 0 and not exclude_self and not (i == own).any():
            # left out behind k exact copies that come before it in the database: it is at distance 0
            # from its own code, so it goes first
            d, i = np.concatenate([[0], d]), np.concatenate([[own], i])
            rows = np.concatenate([db.lookup.rows(np.array([own], np.int64)), rows])
        # ties by database position (the store row), whatever order the index returned them in; the
        # query's own item first among its ties
        tie = np.where(rows >= 0, rows, i)
        if w is not None:
            order = np.lexsort((tie, d, w))
        else:
            order = np.lexsort((tie, i != own, d)) if own >= 0 else np.lexsort((tie, d))
        if k is not None:
            order = order[:k]
        weighted = w[order].tolist() if w is not None else None
        d, i, rows = d[order].tolist(), i[order].tolist(), rows[order].tolist()
        paths = db.paths(rows) if db is not None else [None] * len(i)
        neighbours = []
        q_label = m["query_label"]
        for rank, (dd, ii, rr, pp) in enumerate(zip(d, i, rows, paths), start=1):
            label = db.label(rr) if db is not None else None
            neighbours.append({
                "rank": rank, "id": ii, "distance": dd, "path": pp, "label": label,
                "label_name": db.label_name(label) if db is not None else None,
                "relevant": _relevant(q_label, label),
            })
            if weighted is not None:
                neighbours[-1]["weighted_distance"] = round(float(weighted[rank - 1]), 4)
        results.append(dict(m, neighbors=neighbours))
    return results


# ---------------------------------------------------------------------------------------- output


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "|".join(str(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


CSV_FIELDS = ("query", "query_id", "query_label", "rank", "id", "distance", "label", "relevant", "path")


def csv_rows(results: list[dict]):
    """One row per (query, neighbour), fields CSV_FIELDS (labels as names when known)."""
    for r in results:
        q_label = r["query_label_name"] if r["query_label_name"] is not None else r["query_label"]
        for n in r["neighbors"]:
            label = n["label_name"] if n["label_name"] is not None else n["label"]
            yield {"query": r["query"], "query_id": _text(r["query_id"]), "query_label": _text(q_label),
                   "rank": n["rank"], "id": n["id"], "distance": n["distance"], "label": _text(label),
                   "relevant": _text(n["relevant"]), "path": _text(n["path"])}


def format_table(results: list[dict]) -> str:
    lines = []
    for r in results:
        q_label = r["query_label_name"] if r["query_label_name"] is not None else r["query_label"]
        head = f"query {r['query']}"
        if r["query_path"] and r["query_path"] != r["query"]:
            head += f"  {r['query_path']}"
        if q_label is not None:
            head += f"  [{_text(q_label)}]"
        lines.append(head)
        if not r["neighbors"]:
            lines.append("  (no neighbours)")
        else:
            show_rel = any(n["relevant"] is not None for n in r["neighbors"])
            show_weighted = "weighted_distance" in r["neighbors"][0]  # re-ranked: the order's own distance
            header = (f"  {'rank':>4}  {'dist':>4}" + (f"  {'w.dist':>8}" if show_weighted else "")
                      + f"  {'id':>10}  {'label':<12}" + ("  rel" if show_rel else "") + "  path")
            lines.append(header)
            for n in r["neighbors"]:
                label = n["label_name"] if n["label_name"] is not None else n["label"]
                rel = f"  {_text(n['relevant']):<3}" if show_rel else ""
                weighted = f"  {n['weighted_distance']:>8.3f}" if show_weighted else ""
                lines.append(f"  {n['rank']:>4}  {n['distance']:>4}{weighted}  {n['id']:>10}  {_text(label):<12}{rel}"
                             f"  {_text(n['path'])}")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def json_lines(results: list[dict]) -> str:
    return "\n".join(to_json(r) for r in results)


def to_json(value) -> str:
    """JSON text (UTF-8 safe) of results or any JSON-able value."""
    text = json.dumps(value, ensure_ascii=False)
    # Paths with undecodable bytes hold lone surrogates (os.fsdecode): escape them, or the output would
    # not be valid UTF-8; json.loads gives the same str back, and os.fsencode the original bytes.
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


_LONE_SURROGATE = re.compile("[\udc80-\udcff]")


def write_grid(results: list[dict], path) -> str:
    """PNG: a row per query (its image, then its neighbours), frames green/red by relevance."""
    from PIL import Image, ImageDraw

    rows = results[:GRID_MAX_QUERIES]
    if len(results) > GRID_MAX_QUERIES:
        log.warning("grid shows the first %d of %d queries", GRID_MAX_QUERIES, len(results))
    cols = 1 + min(GRID_MAX_NEIGHBOURS, max((len(r["neighbors"]) for r in rows), default=0))
    cell, pad, text_h = GRID_CELL, 6, 14
    width = cols * (cell + pad) + pad + pad  # extra gap after the query column
    height = max(1, len(rows)) * (cell + text_h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    def tile(image_path, x, y, colour, caption):
        try:
            img = load_image(image_path, cell) if image_path else None
        except ImageError:
            img = None
        if img is None:
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(220, 220, 220))
            draw.text((x + 8, y + cell // 2 - 6), "no image", fill=(90, 90, 90))
        else:
            # fit the cell both ways: CIFAR-size images are upscaled, photos shrunk
            scale = (cell - 8) / max(img.width, img.height)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
            canvas.paste(img, (x + (cell - img.width) // 2, y + (cell - img.height) // 2))
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=colour, width=4)
        draw.text((x + 2, y + cell + 1), caption[:18], fill=(0, 0, 0))

    for ri, r in enumerate(rows):
        y = pad + ri * (cell + text_h + pad)
        q_label = r["query_label_name"] if r["query_label_name"] is not None else r["query_label"]
        tile(r["query_path"], pad, y, (40, 40, 200), f"query {_text(q_label)}".strip())
        for ci, n in enumerate(r["neighbors"][: cols - 1]):
            x = pad * 2 + (ci + 1) * (cell + pad)
            colour = {True: (0, 170, 0), False: (210, 0, 0), None: (150, 150, 150)}[n["relevant"]]
            label = n["label_name"] if n["label_name"] is not None else n["label"]
            tile(n["path"], x, y, colour, f"d={n['distance']} {_text(label)}")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return os.path.abspath(path)
