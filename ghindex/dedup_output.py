"""What `ghindex dedup` writes: group records (table, json, jsonl, csv), the pairs file, the remove list
and the grid picture; and reading a jsonl of groups back (`ghindex serve --duplicates`).

A group record (json, jsonl: one per line)::

    {"group": 1, "size": 3, "ids": [17, 45, 99], "kept": [17], "num_pairs": 2, "max_distance": 2,
     "diameter": 3, "chained": true, "pairs": [[17, 45, 1], [45, 99, 2]], "paths": [...]}

`ids` ascending; `kept`: the ids `--keep` keeps (the others are in the remove list); `pairs`: every
pair of the group within the radius as [id_a, id_b, distance], id_a < id_b, closest first;
`max_distance`: its largest pair; `diameter`: the largest distance between any two members (null
for groups over DIAMETER_MAX_MEMBERS); `chained`: diameter above the radius (some members are
joined only through others); `paths`: the members' image paths when the store keeps them. With
`--against`: `ids` are the collection's, `other_ids` (and `other_paths`) the other's, pairs are
[id, other_id, distance], and there is no `kept` (every id in `ids` is removed).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os

import numpy as np

from .errors import ConfigError
from .io import atomic_path
from .query import to_json
from .query import write_grid as draw_query_grid

log = logging.getLogger(__name__)

#: Rows of the grid picture (the largest groups).
GRID_GROUPS = 16
#: Ids shown per group in the table (the json outputs have them all).
TABLE_IDS = 12
#: Pairs written per batch of text (the pairs file can hold hundreds of millions).
PAIRS_PER_WRITE = 1 << 20


def check_outputs(collection, grid) -> None:
    """Refuse, before any work, outputs that cannot be made: a grid without image paths."""
    if grid is not None and not collection.has_paths:
        raise ConfigError(f"grid needs image paths, and code store {collection.store_path} keeps none "
                          "(encode with paths to draw one)")


def _to_json(value) -> str:
    return to_json(value)


# ----------------------------------------------------------------------------------------- records
def group_records(result, with_paths: bool = True):
    """One dict per group of a `DedupResult`, largest first."""
    g = result.groups
    against = result.other is not None
    paths = _member_paths(result) if with_paths else None
    ids = g.node_ids
    for k in range(len(g)):
        m0, m1 = int(g.member_starts[k]), int(g.member_starts[k + 1])
        p0, p1 = int(g.pair_starts[k]), int(g.pair_starts[k + 1])
        members = g.members[m0:m1]
        mine = members < g.split
        a, b = ids[g.pair_a[p0:p1]], ids[g.pair_b[p0:p1]]
        if not against:
            a, b = np.minimum(a, b), np.maximum(a, b)
        diameter = int(g.diameter[k]) if len(g.diameter) and g.diameter[k] >= 0 else None
        record = {"group": k + 1, "size": m1 - m0, "ids": ids[members[mine]].tolist()}
        if against:
            record["other_ids"] = ids[members[~mine]].tolist()
        else:
            record["kept"] = ids[members[g.kept[m0:m1]]].tolist()
        record.update({
            "num_pairs": p1 - p0, "max_distance": int(g.max_distance[k]), "diameter": diameter,
            "chained": None if diameter is None else diameter > result.radius,
            "pairs": [[int(x), int(y), int(z)] for x, y, z in zip(a, b, g.pair_d[p0:p1])],
        })
        if paths is not None:
            record["paths"] = [paths[m] for m in members[mine].tolist()]
            if against:
                record["other_paths"] = [paths[m] for m in members[~mine].tolist()]
        yield record


def _member_paths(result) -> dict | None:
    """node -> image path for every group member (one read per store), or None without paths."""
    g = result.groups
    if not result.collection.has_paths and (result.other is None or not result.other.has_paths):
        return None
    mine = g.members[g.members < g.split]
    found = dict(zip(mine.tolist(), result.collection.paths(mine)))
    if result.other is not None:
        theirs = g.members[g.members >= g.split]
        found.update(zip(theirs.tolist(), result.other.paths(theirs - g.split)))
    return found


# ----------------------------------------------------------------------------------------- formats
def format_lines(result, fmt: str):
    """The groups as lines of text in `fmt` (table, json, jsonl, csv), without line ends."""
    if fmt == "jsonl":
        for record in group_records(result):
            yield _to_json(record)
    elif fmt == "json":
        yield _to_json({"summary": result.summary, "groups": list(group_records(result))})
    elif fmt == "csv":
        yield from _csv_lines(result)
    elif fmt == "table":
        yield from _table_lines(result)
    else:
        raise ConfigError(f"format must be one of table, json, jsonl, csv; got {fmt!r}")


def _csv_lines(result):
    against = result.other is not None
    fields = ["group", "size", "collection", "id", "path"] if against else ["group", "size", "id", "kept", "path"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")

    def line(row):
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(row)
        return buffer.getvalue().rstrip("\n")

    yield line(fields)
    for r in group_records(result):
        paths = r.get("paths") or [None] * len(r["ids"])
        if against:
            other_paths = r.get("other_paths") or [None] * len(r["other_ids"])
            for i, p in zip(r["ids"], paths):
                yield line([r["group"], r["size"], "codes", i, p or ""])
            for i, p in zip(r["other_ids"], other_paths):
                yield line([r["group"], r["size"], "against", i, p or ""])
        else:
            kept = set(r["kept"])
            for i, p in zip(r["ids"], paths):
                yield line([r["group"], r["size"], i, "yes" if i in kept else "no", p or ""])


def _ids_text(ids: list[int]) -> str:
    shown = " ".join(str(i) for i in ids[:TABLE_IDS])
    return shown + (f" ... (+{len(ids) - TABLE_IDS})" if len(ids) > TABLE_IDS else "")


def _table_lines(result):
    against = result.other is not None
    if not len(result.groups):
        yield f"no two items within {result.radius} bits: no groups"
        return
    head = f"{'group':>6}  {'size':>5}  {'pairs':>6}  {'max':>3}  {'diameter':>11}  "
    yield head + ("ids  |  other ids" if against else f"{'kept':<8}  ids")
    for r in group_records(result, with_paths=False):
        diameter = "-" if r["diameter"] is None else str(r["diameter"]) + (" (chain)" if r["chained"] else "")
        line = f"{r['group']:>6}  {r['size']:>5}  {r['num_pairs']:>6}  {r['max_distance']:>3}  {diameter:>11}  "
        if against:
            line += f"{_ids_text(r['ids'])}  |  {_ids_text(r['other_ids'])}"
        else:
            line += f"{_ids_text(r['kept']):<8}  {_ids_text(r['ids'])}"
        yield line


# ------------------------------------------------------------------------------------------ files
def _write_lines(path, lines) -> None:
    """Write lines to `path` atomically (a temporary file renamed when complete)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            for line in lines:
                f.write(line)
                f.write("\n")


def _pair_lines(result):
    a, b, d = result.pair_ids()
    yield "id,other_id,distance" if result.other is not None else "id_a,id_b,distance"
    for start in range(0, len(d), PAIRS_PER_WRITE):
        block = np.stack([a[start:start + PAIRS_PER_WRITE], b[start:start + PAIRS_PER_WRITE],
                          d[start:start + PAIRS_PER_WRITE].astype(np.int64)], axis=1)
        out = io.StringIO()
        np.savetxt(out, block, fmt="%d", delimiter=",")
        yield out.getvalue().rstrip("\n")


def _remove_lines(result):
    removed = result.removed_ids()
    how = "with a near-copy in " + result.other.store_path if result.other is not None else f"keep {result.summary['keep']}"
    yield (f"# ghindex dedup: {len(removed)} ids to remove from {result.collection.store_path} "
           f"(radius {result.radius}, {how})")
    for start in range(0, len(removed), PAIRS_PER_WRITE):
        yield "\n".join(map(str, removed[start:start + PAIRS_PER_WRITE].tolist()))


def write_outputs(result, *, pairs=None, remove_list=None, grid=None, out=None, fmt: str = "jsonl") -> None:
    """Write each output asked for, each atomically (the summary records their paths)."""
    written = {}
    if pairs is not None:
        _write_lines(pairs, (line for line in _pair_lines(result) if line))
        written["pairs_file"] = os.path.abspath(pairs)
    if remove_list is not None:
        _write_lines(remove_list, (line for line in _remove_lines(result) if line))
        written["remove_list"] = os.path.abspath(remove_list)
    if out is not None:
        _write_lines(out, format_lines(result, fmt))
        written["out"] = os.path.abspath(out)
    if grid is not None:
        written["grid"] = write_grid(result, grid)
    result.summary.update(written)


def write_grid(result, path) -> str:
    """PNG (via `ghindex.query.write_grid`): the largest groups, a row each: a kept member (blue frame),
    then the others with their distance to it, framed green within the radius, red further (joined by
    a chain). Captions: `#id`."""
    g = result.groups
    paths = _member_paths(result) or {}
    rows = []
    for k in range(min(GRID_GROUPS, len(g))):
        m0, m1 = int(g.member_starts[k]), int(g.member_starts[k + 1])
        members = g.members[m0:m1]
        anchor_at = int(np.flatnonzero(g.kept[m0:m1] & (members < g.split))[0]) if result.other is None else 0
        anchor = int(members[anchor_at])
        others = np.delete(members, anchor_at)
        dist = _distances(result, anchor, others)
        order = np.lexsort((g.node_ids[others], dist))
        anchor_id = int(g.node_ids[anchor])
        rows.append({
            "query": f"group {k + 1}", "query_id": anchor_id, "query_path": paths.get(anchor),
            "query_label": None, "query_label_name": f"#{anchor_id} g{k + 1}",
            "neighbors": [{"rank": r + 1, "id": int(g.node_ids[others[o]]), "distance": int(dist[o]),
                           "path": paths.get(int(others[o])), "label": None,
                           "label_name": f"#{int(g.node_ids[others[o]])}",
                           "relevant": bool(dist[o] <= result.radius)} for r, o in enumerate(order)],
        })
    if not rows:
        log.warning("no groups: the grid %s shows none", path)
    return draw_query_grid(rows, path)


def _distances(result, anchor: int, others: np.ndarray) -> np.ndarray:
    """Hamming distances from node `anchor` to `others` (node positions of either collection)."""
    split = result.groups.split

    def codes(nodes):
        nodes = np.asarray(nodes, np.int64)
        X = np.empty((result.collection.X.shape[0], len(nodes)), np.uint64)
        mine = nodes < split
        X[:, mine] = result.collection.X[:, nodes[mine]]
        if (~mine).any():
            X[:, ~mine] = result.other.X[:, nodes[~mine] - split]
        return X

    a, b = codes([anchor]), codes(others)
    return np.bitwise_count(a ^ b).sum(axis=0).astype(np.int64)


# ------------------------------------------------------------------------------------- read back
def read_groups(path) -> list[dict]:
    """The groups of a dedup jsonl (`--format jsonl`), largest first; ConfigError naming the line for
    anything else."""
    groups = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise ConfigError(f"{path}:{number}: not JSON ({exc.msg}); expected `ghindex dedup --format jsonl`") from None
                if not isinstance(record, dict) or not isinstance(record.get("ids"), list) or not all(
                        isinstance(i, int) and not isinstance(i, bool) for i in record["ids"]):
                    raise ConfigError(f"{path}:{number}: not a dedup group (no list of integer \"ids\")")
                pairs = record.get("pairs") or []
                if not isinstance(pairs, list) or not all(
                        isinstance(p, list) and len(p) == 3 and all(isinstance(v, int) for v in p) for p in pairs):
                    raise ConfigError(f"{path}:{number}: \"pairs\" must be [id_a, id_b, distance] lists")
                groups.append(record)
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file of dedup groups") from None
    groups.sort(key=lambda r: (-(len(r["ids"]) + len(r.get("other_ids") or [])), r.get("group") or 0))
    return groups
