"""Property-based tests (hypothesis) for what tests/test_hashing.py and tests/test_metrics.py check by example.

test_metrics.py already has the metric properties of issue 8 (mAP in [0, 1] and equal to the reference,
a perfect ranking scores 1, a database order consistent with the tie rule changes nothing) on 8-bit codes.
Here: packing and its bit order for any shape, Hamming distance identities (metric axioms, the +-1 inner
product, complements, masks, bit permutations, zero padding, FAISS), and metric invariances under
transformations that keep every distance and every relevance: wider codes, XOR masks, bit permutations,
class renaming, query order.
"""
import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ghindex import metrics
from ghindex.hashing import hamming_distances, pack_bits, pack_signs, unpack_bits, unpack_signs
from ghindex.index import FAST_WIDTHS, build_from_arrays, pad_codes, padded_width

SETTINGS = settings(max_examples=50, deadline=None)


def code_arrays(n=st.integers(0, 12), nbytes=st.integers(1, 9)):
    """Packed codes (n, nbytes) of any byte values, widths with and without a fast FAISS kernel."""
    return st.tuples(n, nbytes).flatmap(lambda s: hnp.arrays(np.uint8, s))


def same_width_triples():
    """Three code arrays of 1-6 codes each, all of one width."""
    return st.integers(1, 9).flatmap(lambda b: st.tuples(
        *[hnp.arrays(np.uint8, st.tuples(st.integers(1, 6), st.just(b))) for _ in range(3)]))


# -- packing -------------------------------------------------------------------------------------------
@SETTINGS
@given(st.tuples(st.integers(0, 10), st.integers(1, 8).map(lambda b: 8 * b)).flatmap(
    lambda s: hnp.arrays(np.uint8, s, elements=st.integers(0, 1))))
def test_pack_unpack_round_trip_and_lsb_first_order(bits01):
    packed = pack_bits(bits01)
    assert packed.shape == (bits01.shape[0], bits01.shape[1] // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_bits(packed), bits01)
    i = np.arange(bits01.shape[1])
    np.testing.assert_array_equal((packed[:, i >> 3] >> (i & 7)) & 1, bits01)  # FAISS's bit order


@SETTINGS
@given(code_arrays())
def test_signs_round_trip(codes):
    signs = unpack_signs(codes)
    assert set(np.unique(signs)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(pack_signs(signs), codes)


@SETTINGS
@given(st.integers(1, 4).flatmap(lambda b: hnp.arrays(
    np.float32, (3, 8 * b), elements=st.floats(width=32, allow_nan=False))))
def test_pack_signs_is_value_at_least_zero(values):
    # -0.0 and +0.0 both give bit 1: sign(0) = +1, never 0, for database and queries alike
    np.testing.assert_array_equal(unpack_bits(pack_signs(values)), (values >= 0).astype(np.uint8))


# -- Hamming distance ----------------------------------------------------------------------------------
@SETTINGS
@given(same_width_triples())
def test_hamming_is_a_metric(triple):
    x, y, z = triple
    dxy, dyz, dxz = hamming_distances(x, y), hamming_distances(y, z), hamming_distances(x, z)
    assert (np.diag(hamming_distances(x, x)) == 0).all()
    np.testing.assert_array_equal(dxy, hamming_distances(y, x).T)
    # triangle inequality through every intermediate code
    assert (dxz[:, None, :] <= dxy[:, :, None] + dyz[None, :, :]).all()
    assert ((dxy == 0) == (x[:, None, :] == y[None, :, :]).all(axis=2)).all()


@SETTINGS
@given(same_width_triples(), st.data())
def test_hamming_identities(triple, data):
    x, y, _ = triple
    nbits = x.shape[1] * 8
    d = hamming_distances(x, y)
    # the GreedyHash relation between codes in {-1, +1} and Hamming distance
    np.testing.assert_array_equal(d, ((nbits - unpack_signs(x) @ unpack_signs(y).T) / 2).astype(np.int32))
    np.testing.assert_array_equal(hamming_distances(x, ~y), nbits - d)  # complement
    mask = data.draw(hnp.arrays(np.uint8, (1, x.shape[1])))
    np.testing.assert_array_equal(hamming_distances(x ^ mask, y ^ mask), d)  # same flips on both sides
    perm = np.asarray(data.draw(st.permutations(range(nbits))))
    px, py = pack_bits(unpack_bits(x)[:, perm]), pack_bits(unpack_bits(y)[:, perm])
    np.testing.assert_array_equal(hamming_distances(px, py), d)  # bit order does not matter
    width = padded_width(x.shape[1])
    assert width in FAST_WIDTHS and width >= x.shape[1]
    np.testing.assert_array_equal(hamming_distances(pad_codes(x, width), pad_codes(y, width)), d)


@SETTINGS
@given(st.integers(1, 9).flatmap(lambda b: st.tuples(hnp.arrays(np.uint8, (3, b)),
                                                     hnp.arrays(np.uint8, st.tuples(st.integers(1, 30), st.just(b))))),
       st.integers(1, 40))
def test_faiss_and_the_index_agree_with_numpy(pair, k):
    q, db = pair
    expected = hamming_distances(q, db)
    flat = faiss.IndexBinaryFlat(q.shape[1] * 8)
    flat.add(db)
    dist, pos = flat.search(q, len(db))
    np.testing.assert_array_equal(np.take_along_axis(expected, pos.astype(np.int64), axis=1), dist)
    # ghindex's index (padded to a fast width, ids mapped): sorted distances, at most ntotal of them
    ids = np.arange(len(db), dtype=np.int64) * 3 + 5
    d, i = build_from_arrays(db, ids, index_key="BFlat").search(q, k)
    assert d.shape == (3, min(k, len(db)))
    np.testing.assert_array_equal(d, np.sort(expected, axis=1)[:, :d.shape[1]])
    np.testing.assert_array_equal(np.take_along_axis(expected, (i - 5) // 3, axis=1), d)


# -- metric invariants ---------------------------------------------------------------------------------
case = st.fixed_dictionaries({
    "seed": st.integers(0, 2**32 - 1),
    "nq": st.integers(1, 5),
    "ndb": st.integers(1, 30),
    "nbytes": st.integers(1, 9),
    "values": st.integers(1, 6),
    "classes": st.integers(1, 4),
    "multi": st.booleans(),
    "topk": st.one_of(st.none(), st.integers(1, 40)),
})


def make(c):
    """Codes drawn from a few distinct values (ties everywhere), single-label or multi-hot labels."""
    rng = np.random.default_rng(c["seed"])
    pool = rng.integers(0, 256, (c["values"], c["nbytes"]), dtype=np.uint8)
    qc, dc = pool[rng.integers(0, c["values"], c["nq"])], pool[rng.integers(0, c["values"], c["ndb"])]
    if c["multi"]:
        ql = rng.integers(0, 2, (c["nq"], c["classes"])).astype(np.uint8)
        dl = rng.integers(0, 2, (c["ndb"], c["classes"])).astype(np.uint8)
    else:
        ql, dl = rng.integers(0, c["classes"], c["nq"]), rng.integers(0, c["classes"], c["ndb"])
    return rng, qc, dc, ql, dl


def assert_same_stats(a, b, query_order=None):
    order = np.arange(a.n_queries) if query_order is None else query_order
    np.testing.assert_allclose(a.ap[order], b.ap, atol=1e-12)
    np.testing.assert_allclose(a.ap_tie_avg[order], b.ap_tie_avg, atol=1e-12)
    np.testing.assert_array_equal(a.relevant_at[order], b.relevant_at)
    np.testing.assert_array_equal(a.relevant_total[order], b.relevant_total)
    np.testing.assert_array_equal(a.dist_counts[order], b.dist_counts)


@settings(max_examples=60, deadline=None)
@given(case)
def test_metrics_on_any_width_equal_the_reference_and_stay_in_range(c):
    _, qc, dc, ql, dl = make(c)
    stats = metrics.query_stats(qc, dc, ql, dl, topk=c["topk"])
    assert stats.ap.mean() == pytest.approx(metrics.reference_map(qc, dc, ql, dl, topk=c["topk"]), abs=1e-12)
    summary = metrics.summarize(stats)
    for key in ("precision_at", "recall_at"):
        assert all(0 <= v <= 1 for v in summary[key].values())
    # relevant items found in the top n: never more than n or than exist, and growing with n
    cut = np.minimum(stats.cutoffs, stats.n_db)
    assert (stats.relevant_at <= cut).all() and (stats.relevant_at <= stats.relevant_total[:, None]).all()
    assert (np.diff(stats.relevant_at, axis=1) >= 0).all()
    recall = [summary["recall_at"][n] for n in sorted(summary["recall_at"], key=int)]
    assert recall == sorted(recall)
    pr = summary["pr_curve"]
    assert all(0 <= v <= 1 for v in pr["precision"] + pr["recall"]) and pr["recall"][-1] == pytest.approx(
        np.mean(stats.relevant_total > 0))  # radius = all bits retrieves everything


@settings(max_examples=40, deadline=None)
@given(case, st.data())
def test_metrics_ignore_xor_masks_bit_order_class_names_and_query_order(c, data):
    rng, qc, dc, ql, dl = make(c)
    base = metrics.query_stats(qc, dc, ql, dl, topk=c["topk"])
    mask = rng.integers(0, 256, (1, c["nbytes"]), dtype=np.uint8)
    assert_same_stats(base, metrics.query_stats(qc ^ mask, dc ^ mask, ql, dl, topk=c["topk"]))
    perm = rng.permutation(c["nbytes"] * 8)
    shuffle_bits = lambda x: pack_bits(unpack_bits(x)[:, perm])  # noqa: E731
    assert_same_stats(base, metrics.query_stats(shuffle_bits(qc), shuffle_bits(dc), ql, dl, topk=c["topk"]))
    rename = rng.permutation(c["classes"])
    if c["multi"]:
        renamed = metrics.query_stats(qc, dc, ql[:, rename], dl[:, rename], topk=c["topk"])
    else:
        renamed = metrics.query_stats(qc, dc, rename[ql], rename[dl], topk=c["topk"])
    assert_same_stats(base, renamed)
    order = np.asarray(data.draw(st.permutations(range(c["nq"]))))
    assert_same_stats(base, metrics.query_stats(qc[order], dc, ql[order], dl, topk=c["topk"]), order)
