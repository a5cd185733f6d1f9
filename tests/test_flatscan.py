"""ghindex.flatscan: exact k-NN and range search equal a stable sort of exact distances, at every width.

Reference: `hamming_distances` (numpy) and a stable argsort, i.e. ties ranked by database position;
distances are also checked against FAISS's IndexBinaryFlat. Widths: the compiled fast widths (4, 8, 16,
20, 32, 64 bytes) and widths the generic kernel takes (1-3, 5-7 bytes, byte tails, > 64 bytes).
"""
import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ghindex import flatscan
from ghindex.errors import SearchError
from ghindex.hashing import hamming_distances

WIDTHS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 20, 24, 32, 48, 64, 65, 72]


def reference_knn(db, queries, k):
    k = min(k, len(db))
    if len(db) == 0:
        return np.zeros((len(queries), 0), np.int32), np.zeros((len(queries), 0), np.int64)
    dist = hamming_distances(queries, db)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, axis=1), order


def reference_range(db, queries, radius):
    lims, dists, ids = [0], [], []
    dist = hamming_distances(queries, db) if len(db) else np.zeros((len(queries), 0), np.int32)
    for row in dist:
        hit = np.flatnonzero(row < radius)
        hit = hit[np.argsort(row[hit], kind="stable")]
        lims.append(lims[-1] + len(hit))
        dists.append(row[hit])
        ids.append(hit)
    return np.array(lims), np.concatenate(dists or [np.zeros(0)]), np.concatenate(ids or [np.zeros(0)])


def assert_knn(db, queries, k, **kwargs):
    d, i = flatscan.knn(db, queries, k, **kwargs)
    rd, ri = reference_knn(db, queries, k)
    assert d.dtype == np.int32 and i.dtype == np.int64 and d.shape == rd.shape
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(i, ri)
    return d, i


def assert_range(db, queries, radius, **kwargs):
    lims, d, i = flatscan.range_search(db, queries, radius, **kwargs)
    rl, rd, ri = reference_range(db, queries, radius)
    assert lims.dtype == np.int64 and d.dtype == np.int32 and i.dtype == np.int64
    np.testing.assert_array_equal(lims, rl)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(i, ri)


def tie_heavy(rng, n, width, distinct=3):
    """n codes drawn from `distinct` codes: every distance is shared by about n / distinct codes."""
    pool = rng.integers(0, 256, (distinct, width), dtype=np.uint8)
    return pool[rng.integers(0, distinct, n)]


@pytest.mark.parametrize("width", WIDTHS)
def test_knn_equals_stable_sort_at_every_width(width):
    rng = np.random.default_rng(width)
    for n in (0, 1, 7, 700):
        for db in (rng.integers(0, 256, (n, width), dtype=np.uint8), tie_heavy(rng, n, width)):
            queries = rng.integers(0, 256, (9, width), dtype=np.uint8)
            if n:
                queries[:3] = db[rng.integers(0, n, 3)]  # distance 0, tied with every duplicate
            for k in (1, 10, 100, n + 5):
                for method in ("heap", "count"):
                    assert_knn(db, queries, k, method=method)


@pytest.mark.parametrize("width", WIDTHS)
def test_range_search_equals_strict_reference_at_every_width(width):
    rng = np.random.default_rng(100 + width)
    for n in (0, 1, 700):
        for db in (rng.integers(0, 256, (n, width), dtype=np.uint8), tie_heavy(rng, n, width)):
            queries = rng.integers(0, 256, (6, width), dtype=np.uint8)
            if n:
                queries[:2] = db[:2]
            for radius in (0, 1, 2, 4 * width, 4 * width + 3, 8 * width, 8 * width + 1, 10 * width):
                assert_range(db, queries, radius)


@pytest.mark.parametrize("width", [4, 8, 16, 20, 32, 64, 3, 72])
def test_distances_equal_faiss(width):
    rng = np.random.default_rng(200 + width)
    db = rng.integers(0, 256, (3000, width), dtype=np.uint8)
    queries = rng.integers(0, 256, (20, width), dtype=np.uint8)
    index = faiss.IndexBinaryFlat(width * 8)
    index.add(db)
    view = flatscan.faiss_codes(index)
    for k in (1, 10, 100):
        fd, _fi = index.search(queries, k)
        d, i = flatscan.knn(view, queries, k)
        np.testing.assert_array_equal(d, fd)
        np.testing.assert_array_equal(hamming_distances(queries, db)[np.arange(20)[:, None], i], d)
    radius = 4 * width - 2  # FAISS: distance < radius
    fl, fd, fi = index.range_search(queries, radius)
    lims, d, i = flatscan.range_search(view, queries, radius)
    np.testing.assert_array_equal(lims, fl)
    for q in range(20):
        ours = sorted(zip(i[lims[q]:lims[q + 1]], d[lims[q]:lims[q + 1]]))
        theirs = sorted(zip(fi[fl[q]:fl[q + 1]], fd[fl[q]:fl[q + 1]]))
        assert ours == theirs


@pytest.mark.parametrize("width", [4, 8, 16, 32, 64, 20])
def test_many_chunks_blocks_groups_and_threads(width):
    """Past one chunk of the database and one group of queries, on 1-3 threads: the same results."""
    rng = np.random.default_rng(300 + width)
    n = flatscan.CHUNK_BYTES // width * 2 + 333
    db = rng.integers(0, 256, (n, width), dtype=np.uint8)
    db[n // 2:n // 2 + 50] = db[7]  # a run of duplicates inside a later chunk
    queries = rng.integers(0, 256, (flatscan.GROUP + 5, width), dtype=np.uint8)
    queries[0] = db[7]
    expected = assert_knn(db, queries, 60)
    for threads in (2, 3):
        got = flatscan.knn(db, queries, 60, threads=threads)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    assert_range(db, queries[:9], 2 * width, threads=2)


def test_few_queries_split_the_database_and_merge(monkeypatch):
    rng = np.random.default_rng(4)
    db = tie_heavy(rng, 5000, 8, distinct=40)
    queries = rng.integers(0, 256, (3, 8), dtype=np.uint8)
    monkeypatch.setattr(flatscan, "MIN_PART", 64)  # parts of 64+ codes: many heaps per query, merged
    monkeypatch.setattr(flatscan, "PART_PER_K", 1)
    for threads in (1, 2, 4):
        for k in (1, 10, 300):
            assert_knn(db, queries, k, threads=threads, method="heap")


def test_all_codes_equidistant_ties_by_position():
    db = np.zeros((1000, 8), np.uint8)
    d, i = flatscan.knn(db, np.zeros((2, 8), np.uint8), 10)
    assert (d == 0).all() and (i == np.arange(10)).all()
    d, i = flatscan.knn(db, np.full((1, 8), 255, np.uint8), 1000)
    assert (d == 64).all() and (i == np.arange(1000)).all()


def test_faiss_codes_is_a_view_of_the_index_buffer():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, (100, 8), dtype=np.uint8)
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    view = flatscan.faiss_codes(index)
    np.testing.assert_array_equal(view, codes)
    assert not view.flags.owndata
    view[3, 0] ^= 1  # written through the view, seen by FAISS: no copy
    assert index.reconstruct(3)[0] == codes[3, 0] ^ 1
    assert flatscan.faiss_codes(faiss.IndexBinaryFlat(64)).shape == (0, 8)


def test_bad_inputs():
    db = np.zeros((10, 8), np.uint8)
    with pytest.raises(SearchError):
        flatscan.knn(db, np.zeros((2, 4), np.uint8), 1)
    with pytest.raises(SearchError):
        flatscan.knn(db.astype(np.int64), db, 1)
    with pytest.raises(SearchError):
        flatscan.knn(db, db, 0)
    with pytest.raises(SearchError):
        flatscan.knn(np.zeros((10, 16), np.uint8)[:, :8], db, 1)  # not contiguous
    with pytest.raises(SearchError):
        flatscan.knn(db, db, 1, method="sort")
    with pytest.raises(SearchError):
        flatscan.knn(db, db, 1, threads=0)
    with pytest.raises(SearchError):
        flatscan.range_search(db, db, -1)
    d, i = flatscan.knn(db, np.zeros((0, 8), np.uint8), 5)
    assert d.shape == (0, 5) and i.shape == (0, 5)
    lims, d, i = flatscan.range_search(db, np.zeros((0, 8), np.uint8), 3)
    assert lims.tolist() == [0] and len(d) == len(i) == 0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9).flatmap(lambda w: st.tuples(
    hnp.arrays(np.uint8, st.tuples(st.integers(0, 40), st.just(w)), elements=st.sampled_from([0, 1, 3, 255])),
    hnp.arrays(np.uint8, st.tuples(st.integers(1, 4), st.just(w))),
    st.integers(1, 50),
    st.integers(0, 8 * w + 2),
)))
def test_property_knn_and_range_equal_reference(case):
    db, queries, k, radius = case
    assert_knn(db, queries, k)
    assert_knn(db, queries, k, method="heap")
    assert_range(db, queries, radius)
