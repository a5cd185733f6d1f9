"""Index search engines: 'ghindex' (ghindex.flatscan) and 'faiss' on flat CPU indexes.

Both engines give identical distances and identical range-search results; the ghindex engine's ids
are those of a stable sort of the exact distances (ties by database position), and FAISS's ids agree
with them under that rule (the same ids at every distance below a row's last one; at the last
distance FAISS may pick other tied codes). Id maps with ids in no particular order, removal and
additions (positions move), mmap loading, widths with and without padding, non-flat indexes
(always FAISS), and the `engine` parameter of `query`, `evaluate` and the CLI.
"""
import json

import faiss
import numpy as np
import pytest

from ghindex.errors import ConfigError
from ghindex.evaluate import evaluate
from ghindex.hashing import hamming_distances
from ghindex.index import ENGINES, Index, build, build_from_arrays
from ghindex.query import query
from ghindex.store import CodeStore
from ghindex_cli.main import cli


def tie_heavy_codes(rng, n, nbytes):
    """Half the codes from 5 distinct codes (big tie groups at every distance), half random."""
    pool = rng.integers(0, 256, (5, nbytes), dtype=np.uint8)
    codes = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    codes[: n // 2] = pool[rng.integers(0, 5, n // 2)]
    return codes[rng.permutation(n)]


def stable_reference(codes, ids, queries, k):
    dist = hamming_distances(queries, codes)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, axis=1), ids[order]


def both_engines(index, method, *args):
    out = {}
    for engine in ENGINES:
        index.engine = engine
        out[engine] = getattr(index, method)(*args)
    index.engine = "ghindex"
    return out["ghindex"], out["faiss"]


def assert_same_search(index, codes, ids, queries, k):
    """Engines agree on distances; ghindex ids = stable sort; FAISS ids = the same below each row's last distance."""
    (dg, ig), (df, i_f) = both_engines(index, "search", queries, k)
    rd, ri = stable_reference(codes, ids, queries, min(k, len(codes)))
    np.testing.assert_array_equal(dg, df)
    np.testing.assert_array_equal(dg, rd)
    np.testing.assert_array_equal(ig, ri)
    position = {int(v): p for p, v in enumerate(ids)}
    for row in range(len(queries)):
        last = dg[row, -1]
        # FAISS's row re-ranked by (distance, position): equal to ours wherever the distance is below the last
        fpos = np.array([position[int(v)] for v in i_f[row]])
        ranked = i_f[row][np.lexsort((fpos, df[row]))]
        below = dg[row] < last
        np.testing.assert_array_equal(ranked[below], ig[row][below])
        assert len(set(i_f[row].tolist())) == len(i_f[row])


def assert_same_range(index, queries, radius):
    (lg, dg, ig), (lf, df, i_f) = both_engines(index, "range_search", queries, radius)
    np.testing.assert_array_equal(lg, lf)
    np.testing.assert_array_equal(dg, df)
    np.testing.assert_array_equal(ig, i_f)
    return lg, dg, ig


@pytest.mark.parametrize("bits", [8, 24, 32, 48, 64, 128, 136, 160, 256, 512, 520])
def test_engines_agree_at_every_width(bits):
    rng = np.random.default_rng(bits)
    nbytes = bits // 8
    codes = tie_heavy_codes(rng, 1500, nbytes)
    ids = rng.permutation(10_000)[:1500].astype(np.int64) * 7 + 3  # an id map in no particular order
    index = build_from_arrays(codes, ids, index_key="BFlat")
    assert index.engine == "ghindex"
    queries = rng.integers(0, 256, (25, nbytes), dtype=np.uint8)
    queries[:5] = codes[:5]
    for k in (1, 10, 100, 1503):
        assert_same_search(index, codes, ids, queries, k)
    dist = hamming_distances(queries, codes)
    for radius in (0, 2, bits // 2 - 3, bits):
        lims, d, found = assert_same_range(index, queries, radius)
        assert lims[-1] == (dist <= radius).sum()  # inclusive radius, as before


def test_remove_and_add_move_positions(tmp_path):
    rng = np.random.default_rng(1)
    codes = tie_heavy_codes(rng, 800, 8)
    ids = np.arange(800, dtype=np.int64) * 2
    index = build_from_arrays(codes, ids, index_key="BFlat")
    keep = np.ones(800, bool)
    keep[::3] = False
    assert index.remove(ids[~keep]) == (~keep).sum()
    codes, ids = codes[keep], ids[keep]
    queries = codes[:8] ^ np.uint8(1)
    assert_same_search(index, codes, ids, queries, 50)
    extra = tie_heavy_codes(rng, 300, 8)
    extra_ids = np.arange(300, dtype=np.int64) * 2 + 1
    index.add(extra, extra_ids)  # FAISS may move its buffer: each search takes a new view
    codes, ids = np.concatenate([codes, extra]), np.concatenate([ids, extra_ids])
    assert_same_search(index, codes, ids, queries, 50)
    assert_same_range(index, queries, 20)
    index.save(tmp_path / "idx")
    mapped = Index.load(tmp_path / "idx", mmap=True, gpu="off")
    assert_same_search(mapped, codes, ids, queries, 50)
    assert_same_range(mapped, queries, 20)


def test_ghindex_engine_reads_faiss_codes_in_place():
    rng = np.random.default_rng(2)
    index = build_from_arrays(rng.integers(0, 256, (500, 6), dtype=np.uint8), index_key="BFlat")  # padded to 8
    view, id_view = index._flatscan()
    inner = faiss.downcast_IndexBinary(index.faiss_index.index)
    address = faiss.rev_swig_ptr(inner.xb.data(), 1).__array_interface__["data"][0]
    assert view.__array_interface__["data"][0] == address and view.shape == (500, 8)
    id_map = index.faiss_index.id_map
    assert id_view.__array_interface__["data"][0] == faiss.rev_swig_ptr(id_map.data(), 1).__array_interface__["data"][0]
    index.engine = "faiss"
    assert index._flatscan() is None


def test_engine_setting_and_non_flat_indexes(tmp_path):
    rng = np.random.default_rng(3)
    codes = tie_heavy_codes(rng, 2000, 8)
    with pytest.raises(ConfigError):
        build_from_arrays(codes, index_key="BFlat").engine = "numpy"
    index = build_from_arrays(codes, index_key="BFlat")
    index.save(tmp_path / "flat")
    assert Index.load(tmp_path / "flat", gpu="off", engine="faiss").engine == "faiss"
    with pytest.raises(ConfigError):
        Index.load(tmp_path / "flat", gpu="off", engine="FAISS")
    queries = codes[:10]
    for key in ("BIVF8", "BHash16", "BHNSW16"):  # searched by FAISS whatever the engine: identical results
        approx = build_from_arrays(codes, index_key=key)
        (dg, ig), (df, i_f) = both_engines(approx, "search", queries, 10)
        np.testing.assert_array_equal(dg, df)
        np.testing.assert_array_equal(ig, i_f)


def test_thread_counts_give_the_same_results():
    rng = np.random.default_rng(4)
    codes = tie_heavy_codes(rng, 3000, 16)
    index = build_from_arrays(codes, index_key="BFlat")
    queries = rng.integers(0, 256, (40, 16), dtype=np.uint8)
    saved = faiss.omp_get_max_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            faiss.omp_set_num_threads(threads)
            results.append(index.search(queries, 30))
    finally:
        faiss.omp_set_num_threads(saved)
    for d, i in results[1:]:
        np.testing.assert_array_equal(d, results[0][0])
        np.testing.assert_array_equal(i, results[0][1])


@pytest.fixture
def stores(tmp_path):
    rng = np.random.default_rng(5)
    db_codes = tie_heavy_codes(rng, 400, 4)
    q_codes = db_codes[:30] ^ np.uint8(4)
    paths = {}
    for name, codes in (("db", db_codes), ("q", q_codes)):
        paths[name] = tmp_path / f"{name}.h5"
        with CodeStore.create(paths[name], 32, label_shape=()) as store:
            store.append(codes, np.arange(len(codes)) + 100, labels=rng.integers(0, 3, len(codes)))
            store.mark_complete()
    build(paths["db"], tmp_path / "flat", index_key="BFlat", gpu="off")
    paths["flat"] = tmp_path / "flat"
    return paths


def test_query_and_evaluate_take_the_engine(stores, runner):
    by_engine = {}
    for engine in ENGINES:
        results = query(stores["flat"], codes=stores["q"], k=15, gpu="off", engine=engine)
        by_engine[engine] = [[(n["distance"]) for n in r["neighbors"]] for r in results]
    assert by_engine["ghindex"] == by_engine["faiss"]
    with pytest.raises(ConfigError):
        query(stores["flat"], codes=stores["q"], k=5, gpu="off", engine="nope")
    for engine in ENGINES:
        result = evaluate(stores["q"], index=stores["flat"], topk=50, recall=10, engine=engine)
        assert result["recall"]["recall"] == 1.0
    with pytest.raises(ConfigError):
        evaluate(stores["q"], index=stores["flat"], engine="nope")
    rows = {}
    for engine in ENGINES:
        out = runner.invoke(cli, ["query", "--index", str(stores["flat"]), "--ids", "100,101", "-k", "7",
                                  "--gpu", "off", "--engine", engine, "--format", "json"])
        assert out.exit_code == 0, out.output
        rows[engine] = [[n["distance"] for n in json.loads(line)["neighbors"]] for line in out.output.splitlines()]
        out = runner.invoke(cli, ["eval", "--queries", str(stores["q"]), "--index", str(stores["flat"]),
                                  "--recall", "5", "--engine", engine, "--format", "json"])
        assert out.exit_code == 0, out.output
        assert json.loads(out.output)["recall"]["recall"] == 1.0
    assert rows["ghindex"] == rows["faiss"]
    out = runner.invoke(cli, ["query", "--index", str(stores["flat"]), "--ids", "100", "--engine", "numpy"])
    assert out.exit_code != 0
