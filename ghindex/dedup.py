"""`dedup`: every group of near-copies in a code store or an index, exactly.

Pairs: every two live codes (rows `ghindex remove` deleted are left out) at Hamming distance <= radius,
found by `ghindex.dedup_join` (multi-index hashing for small radii, the blocked scan as a self-join
otherwise, whichever its plan says is cheaper; both exact). With `against`: the pairs of a code of the
collection and a code of another (new uploads against an index).

Groups are the connected components of the pairs: two items are in one group when a chain of pairs
joins them. A chain can join items further apart than the radius (a ~ b and b ~ c, each within it, a
and c not), so each group says how far apart its members are: `max_distance` (its largest pair,
<= radius) and `diameter` (the largest distance between any two members, computed exactly for groups
of up to DIAMETER_MAX_MEMBERS; above the radius only through a chain).

What to remove (`keep`): visiting a group's members from the smallest id ('first') or the largest
('last'), a member is kept unless it is within the radius of a member already kept. So every removed
item has a kept copy within the radius, and no two kept items are within it: dedup finds no pair in
what is left. A group whose members are all within the radius of each other (no chain) keeps exactly
its first (or last) id. With `against`, the other collection is kept whole and every item with a
near-copy in it is removed.

Memory: the codes as 64-bit words (read chunk by chunk from the store), the pairs found and the
groups; nothing grows with N^2. Outputs are written to temporary files and renamed.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import dedup_join
from .dedup_kernels import components, diameters, greedy_keep
from .dedup_output import check_outputs, group_records, write_outputs
from .errors import ConfigError, DataError, StoreError
from .store import CodeStore
from .store import resolve_radius as store_radius  # the one rule, shared with `query`

log = logging.getLogger(__name__)

KEEP_RULES = ("first", "last")
FORMATS = ("table", "json", "jsonl", "csv")
#: Groups larger than this get no diameter (it is quadratic in the group's size): null in the output.
DIAMETER_MAX_MEMBERS = 4096


@dataclass
class Collection:
    """The live codes of one code store: word-major codes, their ids and store rows."""

    name: str  # what was given: the store, or the index directory
    store_path: str
    bits: int
    X: np.ndarray  # (words, n) uint64
    ids: np.ndarray  # (n,) int64
    rows: np.ndarray  # (n,) int64 rows of the store
    attrs: dict
    has_paths: bool
    root: str | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def paths(self, positions) -> list[str | None]:
        """Image paths of live positions (None without paths), resolved as the store resolves them."""
        positions = np.asarray(positions, np.int64)
        if not self.has_paths or not len(positions):
            return [None] * len(positions)
        with CodeStore.open(self.store_path, root=self.root) as store:
            return store.resolved_paths(self.rows[positions])


def store_of(codes=None, index=None) -> tuple[str, str]:
    """(name, store path) of a code store file (`codes`) or the store an index directory was built
    from (`index`)."""
    if (codes is None) == (index is None):
        raise ConfigError("give exactly one of codes (a code store, --codes) or index (an index directory, --index)")
    if codes is not None:
        return os.fspath(codes), os.fspath(codes)
    from .index.files import read_meta, store_path_of  # faiss: loaded only for --index

    name = os.fspath(index)
    meta = read_meta(name)
    path = store_path_of(name, meta)
    if not path:
        raise StoreError(f"index {name} records no code store (built from arrays): give its codes instead")
    if not os.path.isfile(path):
        raise StoreError(f"code store {path} (recorded in index {name}) not found")
    return name, path


def open_collection(name: str, path: str, *, root=None) -> Collection:
    """A code store's header (bits, attributes, paths): checks that it opens, reads no codes."""
    with CodeStore.open(path, root=root) as store:
        return Collection(name, path, store.bits, np.zeros((0, 0), np.uint64), np.zeros(0, np.int64),
                          np.zeros(0, np.int64), store.attrs, store.has_paths, root)


def read_codes(collection: Collection, *, progress: bool = False) -> Collection:
    """Fill `collection` with the live rows of its store, read chunk by chunk into word-major codes."""
    path = collection.store_path
    with CodeStore.open(path, root=collection.root) as store:
        live = ~store.deleted()
        count = int(live.sum())
        X = np.empty((-(-store.code_bytes // 8), count), np.uint64)
        ids = np.empty(count, np.int64)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(store), unit="code", unit_scale=True, file=sys.stderr, desc="reading codes",
                       dynamic_ncols=True)
        start = filled = 0
        try:
            for batch in store.iter_chunks(paths=False):
                stop = start + len(batch.ids)
                keep = live[start:stop]
                k = int(keep.sum())
                X[:, filled:filled + k] = dedup_join.words_of(batch.codes[keep])
                ids[filled:filled + k] = batch.ids[keep]
                filled += k
                start = stop
                if bar is not None:
                    bar.update(len(batch.ids))
        finally:
            if bar is not None:
                bar.close()
    if count == 0:
        raise DataError(f"code store {path} holds no codes" + (" (every row is deleted)" if len(live) else "")
                        + ": nothing to deduplicate")
    ordered = np.sort(ids)
    repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(repeated):
        raise StoreError(f"{path}: ids must be unique; id {ordered[repeated[0]]} occurs more than once")
    collection.X, collection.ids, collection.rows = X, ids, np.flatnonzero(live).astype(np.int64)
    return collection


def resolve_radius(radius, collection: Collection) -> int:
    """An integer radius, or 'auto': the copy radius the store's model recorded (`copy_radius`)."""
    return store_radius(radius, collection.attrs, collection.bits, f"code store {collection.store_path}")


# ------------------------------------------------------------------------------------------ groups
@dataclass
class Groups:
    """Groups over a node space (positions of the collection; with `against`, then the other's after
    them, offset by `split`), largest first, ties by smallest id. Arrays, group by group:

    members / member_starts: the members of group g are members[member_starts[g]:member_starts[g+1]],
    ascending by (side, id); pair_a, pair_b, pair_d / pair_starts: its pairs (node a < node b),
    sorted by (distance, ids); kept: per member, whether it is kept; max_distance, diameter (-1:
    not computed) per group."""

    split: int
    node_ids: np.ndarray  # id of every node
    members: np.ndarray
    member_starts: np.ndarray
    kept: np.ndarray
    pair_a: np.ndarray
    pair_b: np.ndarray
    pair_d: np.ndarray
    pair_starts: np.ndarray
    max_distance: np.ndarray
    diameter: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    def __len__(self) -> int:
        return len(self.member_starts) - 1


def group_pairs(a: np.ndarray, b: np.ndarray, d: np.ndarray, node_ids: np.ndarray, *, split: int | None = None,
                keep: str = "first") -> Groups:
    """Connected components of the pairs (a[k], b[k]) of nodes 0..len(node_ids)-1 (with `split`: nodes
    >= split are the other collection's, never removed), and which members `keep` keeps."""
    if keep not in KEEP_RULES:
        raise ConfigError(f"keep must be one of {', '.join(KEEP_RULES)}, got {keep!r}")
    n_all = len(node_ids)
    split = n_all if split is None else int(split)
    nodes = np.unique(np.concatenate([a, b]))
    ca, cb = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    label = components(len(nodes), ca, cb)
    roots, group_of, sizes = np.unique(label, return_inverse=True, return_counts=True)
    ids = node_ids[nodes]
    side = (nodes >= split).astype(np.int64)  # 0: the collection, 1: the other
    first_id = np.full(len(roots), np.iinfo(np.int64).max)
    np.minimum.at(first_id, group_of, np.where(side == 0, ids, np.iinfo(np.int64).max))
    rank = np.empty(len(roots), np.int64)
    rank[np.lexsort((first_id, -sizes))] = np.arange(len(roots))
    group_of = rank[group_of]
    order = np.lexsort((ids, side, group_of))
    member_starts = np.concatenate([[0], np.cumsum(np.bincount(group_of, minlength=len(roots)))]).astype(np.int64)

    # who is kept: a maximal independent set of the pair graph, visited by id (first) or reversed (last)
    if split < n_all:
        kept_node = side == 1
    else:
        both = np.concatenate([ca, cb])
        other = np.concatenate([cb, ca])
        by = np.argsort(both, kind="stable")
        indptr = np.concatenate([[0], np.cumsum(np.bincount(both, minlength=len(nodes)))]).astype(np.int64)
        visit = np.argsort(ids if keep == "first" else -ids, kind="stable")
        kept_node = greedy_keep(visit, indptr, other[by].astype(np.int64))

    pair_group = group_of[ca]
    pair_order = np.lexsort((node_ids[b], node_ids[a], d, pair_group))
    pair_starts = np.concatenate([[0], np.cumsum(np.bincount(pair_group, minlength=len(roots)))]).astype(np.int64)
    max_distance = np.zeros(len(roots), np.int32)
    np.maximum.at(max_distance, pair_group, d.astype(np.int32))
    return Groups(split, node_ids, nodes[order], member_starts, kept_node[order], a[pair_order], b[pair_order],
                  d[pair_order].astype(np.int32), pair_starts, max_distance)


def group_diameters(groups: Groups, X: np.ndarray, Y: np.ndarray | None = None) -> np.ndarray:
    """Each group's diameter (-1 above DIAMETER_MAX_MEMBERS) from word-major codes (X; Y: the other's)."""
    members = groups.members
    codes = np.empty((X.shape[0], len(members)), np.uint64)
    mine = members < groups.split
    codes[:, mine] = X[:, members[mine]]
    if Y is not None and (~mine).any():
        codes[:, ~mine] = Y[:, members[~mine] - groups.split]
    return diameters(codes, groups.member_starts, DIAMETER_MAX_MEMBERS)


# -------------------------------------------------------------------------------------------- run
@dataclass
class DedupResult:
    """What `dedup` found: the collections, the pairs (node positions, as `Groups`), the groups and
    a summary. `removed_ids()`: the ids `keep` drops; `records()`: one dict per group."""

    collection: Collection
    other: Collection | None
    radius: int
    groups: Groups
    pair_a: np.ndarray  # all pairs, node positions, sorted by (a, b)
    pair_b: np.ndarray
    pair_d: np.ndarray
    summary: dict

    def removed_ids(self) -> np.ndarray:
        g = self.groups
        gone = g.members[~g.kept & (g.members < g.split)]
        return np.sort(g.node_ids[gone])

    def pair_ids(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(id_a, id_b, distance) of every pair: id_a < id_b, sorted (with `against`: the collection's
        id, the other's id, sorted by them)."""
        ids = self.groups.node_ids
        ia, ib = ids[self.pair_a], ids[self.pair_b]
        if self.other is None:
            ia, ib = np.minimum(ia, ib), np.maximum(ia, ib)
        order = np.lexsort((ib, ia))
        return ia[order], ib[order], self.pair_d[order]

    def records(self, with_paths: bool = True):
        """One dict per group, largest first (see `ghindex.dedup_output` for the fields)."""
        return group_records(self, with_paths=with_paths)


def dedup(codes=None, index=None, radius="auto", *, against=None, keep: str = "first", pairs=None,
          remove_list=None, grid=None, out=None, fmt: str = "jsonl", method: str = "auto", threads=None,
          force: bool = False, root=None, progress: bool = False) -> DedupResult:
    """Every group of near-copies among the live codes of a code store (`codes`) or of the store an
    index directory was built from (`index`).

    `radius`: the Hamming distance (bits, inclusive) within which two codes are copies, or 'auto': the
    copy radius the store records from its model. `against`: a code store or index directory; then
    the pairs are an item of the collection and one of `against` (the new items that already have a
    near-copy there). `keep`: 'first' or 'last' (see the module docstring). `method`: 'auto', 'mih'
    or 'scan' (same pairs; auto picks the cheaper). `threads`: worker threads (default: all CPUs).
    `force`: accept `against` codes from another model (encoder fingerprint).

    Files, each written atomically: `pairs` (CSV `id_a,id_b,distance`, every pair once, id_a < id_b;
    with `against`: `id,other_id,distance`), `remove_list` (the ids to remove, one per line, for
    `ghindex remove --ids-file`), `grid` (PNG: the largest groups, one row each, with ids and
    distances; needs image paths), `out` (the groups in `fmt`: table, json, jsonl or csv).
    """
    start = time.perf_counter()
    if keep not in KEEP_RULES:
        raise ConfigError(f"keep must be one of {', '.join(KEEP_RULES)}, got {keep!r}")
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if method not in dedup_join.METHODS:
        raise ConfigError(f"method must be one of {', '.join(dedup_join.METHODS)}, got {method!r}")
    collection = open_collection(*store_of(codes, index), root=root)
    radius = resolve_radius(radius, collection)
    other = None
    if against is not None:
        against = os.fspath(against)
        other = open_collection(*store_of(*((None, against) if os.path.isdir(against) else (against, None))))
        _check_comparable(collection, other, force)
    check_outputs(collection, grid)
    read_codes(collection, progress=progress)
    if other is not None:
        read_codes(other, progress=progress)
    read_s = time.perf_counter() - start

    if other is None:
        a, b, d, plan = dedup_join.pairs(collection.X, collection.bits, radius, method=method, threads=threads,
                                         progress=progress)
        node_ids = collection.ids
        b_nodes = b
    else:
        a, b, d, plan = dedup_join.cross_pairs(collection.X, other.X, collection.bits, radius, method=method,
                                               threads=threads, progress=progress)
        node_ids = np.concatenate([collection.ids, other.ids])
        b_nodes = b + len(collection)
    join_s = time.perf_counter() - start - read_s
    log.info("dedup: %s", _plan_text(plan, collection.bits))
    groups = group_pairs(a, b_nodes, d, node_ids, split=len(collection) if other is not None else None, keep=keep)
    groups.diameter = group_diameters(groups, collection.X, None if other is None else other.X)
    result = DedupResult(collection, other, radius, groups, a, b_nodes, d, {})
    result.summary = _summary(result, plan, keep, read_s, join_s)
    write_outputs(result, pairs=pairs, remove_list=remove_list, grid=grid, out=out, fmt=fmt)
    result.summary["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _check_comparable(collection: Collection, other: Collection, force: bool) -> None:
    if other.bits != collection.bits:
        raise ConfigError(f"{other.name} holds {other.bits}-bit codes but {collection.name} holds "
                          f"{collection.bits}-bit codes: they cannot be compared")
    mine, theirs = collection.attrs.get("encoder_fingerprint"), other.attrs.get("encoder_fingerprint")
    if mine and theirs and mine != theirs and not force:
        raise ConfigError(f"{other.name} was encoded with another model than {collection.name} (encoder "
                          "fingerprints differ), so distances between them mean nothing; pass force=True to compare anyway")


def _plan_text(plan, bits: int) -> str:
    if plan.method == "mih":
        return (f"multi-index hashing, {plan.substrings} substring{'s' if plan.substrings > 1 else ''} of about "
                f"{bits // plan.substrings} bits "
                f"(about {plan.mih_candidates:.3g} candidate pairs; the scan would compare {plan.scan_pairs:.3g})")
    return f"exact scan of {plan.scan_pairs:.3g} pairs"


def _summary(result: DedupResult, plan, keep: str, read_s: float, join_s: float) -> dict:
    g = result.groups
    sizes = np.diff(g.member_starts)
    chained = int(((g.diameter > result.radius)).sum())
    summary = {
        "items": len(result.collection),
        "other_items": None if result.other is None else len(result.other),
        "radius": result.radius,
        "method": plan.method,
        "substrings": plan.substrings or None,
        "groups": len(g),
        "items_in_groups": int((g.members < g.split).sum()),
        "other_items_in_groups": None if result.other is None else int((g.members >= g.split).sum()),
        "largest_group": int(sizes.max()) if len(sizes) else 0,
        "chained_groups": chained,
        "pairs": len(result.pair_d),
        "keep": None if result.other is not None else keep,
        "removed": int((~g.kept & (g.members < g.split)).sum()),
        "read_seconds": round(read_s, 3),
        "join_seconds": round(join_s, 3),
        "codes": result.collection.store_path,
        "against": None if result.other is None else result.other.store_path,
    }
    return summary


def find_groups(codes: np.ndarray, radius: int, *, keep: str = "first", method: str = "auto",
                threads=None) -> list[dict]:
    """Numpy in, plain lists out: the groups of packed codes (N, bytes) uint8 within `radius`, ids
    being row positions: [{"ids", "kept", "pairs": [[a, b, distance], ...], "diameter"}], largest first."""
    codes = np.asarray(codes)
    X = dedup_join.words_of(codes)
    bits = codes.shape[1] * 8
    a, b, d, _ = dedup_join.pairs(X, bits, radius, method=method, threads=threads)
    groups = group_pairs(a, b, d, np.arange(len(codes), dtype=np.int64), keep=keep)
    diam = group_diameters(groups, X)
    out = []
    for k in range(len(groups)):
        m0, m1 = groups.member_starts[k], groups.member_starts[k + 1]
        p0, p1 = groups.pair_starts[k], groups.pair_starts[k + 1]
        members = groups.members[m0:m1]
        out.append({"ids": members.tolist(), "kept": members[groups.kept[m0:m1]].tolist(),
                    "pairs": [[int(x), int(y), int(z)] for x, y, z in
                              zip(groups.pair_a[p0:p1], groups.pair_b[p0:p1], groups.pair_d[p0:p1])],
                    "diameter": int(diam[k]) if diam[k] >= 0 else None})
    return out
