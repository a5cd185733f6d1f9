"""ghindex.metrics against plain per-query references, brute force over tie orders, and properties."""
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghindex import metrics
from ghindex.errors import ConfigError, DataError
from ghindex.hashing import hamming_distances


def tied_codes(rng, n, nbytes=1, values=6):
    """Codes drawn from a few distinct values: Hamming ties everywhere."""
    pool = rng.integers(0, 256, (values, nbytes), dtype=np.uint8)
    return pool[rng.integers(0, values, n)]


def ranked_relevance(qcode, dcodes, rel_row):
    """Relevance in rank order under the tie rule (stable sort of distances), and the distances."""
    dist = hamming_distances(qcode[None], dcodes)[0]
    order = np.argsort(dist, kind="stable")
    return rel_row[order], dist


def plain_ap(rel_sorted, k):
    top = rel_sorted[:k]
    found = int(top.sum())
    if found == 0:
        return 0.0
    return float(np.mean(np.arange(1, found + 1) / (np.flatnonzero(top) + 1)))


@pytest.mark.parametrize("topk", [None, 1, 5, 37, 300, 10_000])
def test_map_matches_reference_with_heavy_ties(rng, topk):
    qc, dc = tied_codes(rng, 40), tied_codes(rng, 300)
    ql, dl = rng.integers(0, 4, 40), rng.integers(0, 4, 300)
    ours = metrics.mean_average_precision(qc, dc, ql, dl, topk=topk)
    ref = metrics.reference_map(qc, dc, ql, dl, topk=topk)
    assert ours == pytest.approx(ref, abs=1e-12)
    # and per query against the plain definition written out here
    stats = metrics.query_stats(qc, dc, ql, dl, topk=topk)
    rel = ql[:, None] == dl[None, :]
    k = 300 if topk is None else min(topk, 300)
    expected = [plain_ap(ranked_relevance(qc[i], dc, rel[i])[0], k) for i in range(40)]
    np.testing.assert_allclose(stats.ap, expected, atol=1e-12)


def test_reference_breaks_ties_by_position_not_quicksort():
    # one query, four items all at distance 0: ranking must be 0,1,2,3 (relevant at 2 and 3)
    qc = np.zeros((1, 1), np.uint8)
    dc = np.zeros((4, 1), np.uint8)
    ql, dl = np.array([1]), np.array([0, 0, 1, 1])
    expected = (1 / 3 + 2 / 4) / 2
    assert metrics.reference_map(qc, dc, ql, dl) == pytest.approx(expected)
    assert metrics.mean_average_precision(qc, dc, ql, dl) == pytest.approx(expected)
    # tie-averaged: the two relevant items are anywhere among four tied slots
    assert metrics.mean_average_precision(qc, dc, ql, dl, ties="average") != pytest.approx(expected)


@pytest.mark.parametrize("nbytes", [3, 8, 16, 17])
def test_multi_label_and_wide_codes(rng, nbytes):
    qc, dc = tied_codes(rng, 30, nbytes, 5), tied_codes(rng, 200, nbytes, 5)
    qm = (rng.random((30, 70)) < 0.03).astype(np.uint8)  # 70 classes: two mask words
    dm = (rng.random((200, 70)) < 0.03).astype(np.uint8)
    dm[:20] = 0  # items without any label are relevant to nothing
    for topk in (None, 17):
        ours = metrics.mean_average_precision(qc, dc, qm, dm, topk=topk)
        assert ours == pytest.approx(metrics.reference_map(qc, dc, qm, dm, topk=topk), abs=1e-12)
    rel = metrics.relevance_matrix(qm, dm)
    np.testing.assert_array_equal(rel, (qm.astype(int) @ dm.T.astype(int)) > 0)


def test_single_label_queries_against_multi_hot_database(rng):
    qc, dc = tied_codes(rng, 20), tied_codes(rng, 100)
    ql = rng.integers(0, 5, 20)
    dm = (rng.random((100, 5)) < 0.3).astype(bool)
    one_hot = np.eye(5, dtype=np.uint8)[ql]
    assert metrics.mean_average_precision(qc, dc, ql, dm) == pytest.approx(
        metrics.mean_average_precision(qc, dc, one_hot, dm), abs=1e-15)
    with pytest.raises(ConfigError, match="0..4"):
        metrics.mean_average_precision(qc, dc, ql + 5, dm)


def test_queries_without_relevant_items_count_as_zero(rng):
    qc, dc = tied_codes(rng, 10), tied_codes(rng, 50)
    dl = rng.integers(0, 3, 50)
    ql = np.array([0, 1, 2, 9, 9, 0, 1, 2, 9, 0])  # class 9 does not exist in the database
    stats = metrics.query_stats(qc, dc, ql, dl)
    assert (stats.ap[ql == 9] == 0).all() and (stats.ap_tie_avg[ql == 9] == 0).all()
    summary = metrics.summarize(stats)
    assert summary["queries_without_relevant"] == 3
    assert summary["map"] == pytest.approx(stats.ap[ql != 9].sum() / 10)
    assert summary["map"] == pytest.approx(metrics.reference_map(qc, dc, ql, dl))


def brute_force_summary(qc, dc, ql, dl, radius, cutoffs, pn_points):
    rel = metrics.relevance_matrix(ql, dl)
    n = dc.shape[0]
    bits = dc.shape[1] * 8
    p_at = {c: [] for c in cutoffs}
    r_at = {c: [] for c in cutoffs}
    pn = {c: [] for c in pn_points if c <= n}
    pr_p, pr_r = [], []
    for i in range(qc.shape[0]):
        rs, dist = ranked_relevance(qc[i], dc, rel[i])
        total = rel[i].sum()
        for c in cutoffs:
            p_at[c].append(rs[:c].sum() / min(c, n))
            r_at[c].append(rs[:c].sum() / total if total else 0.0)
        for c in pn:
            pn[c].append(rs[:c].sum() / c)
        row_p, row_r = [], []
        for r in range(bits + 1):
            inside = dist <= r
            hits = (inside & rel[i]).sum()
            row_p.append(hits / inside.sum() if inside.sum() else 0.0)
            row_r.append(hits / total if total else 0.0)
        pr_p.append(row_p)
        pr_r.append(row_r)
    return {
        "precision_at": {str(c): np.mean(v) for c, v in p_at.items()},
        "recall_at": {str(c): np.mean(v) for c, v in r_at.items()},
        "pn": [np.mean(v) for v in pn.values()],
        "pr_p": np.mean(pr_p, axis=0), "pr_r": np.mean(pr_r, axis=0),
        "p_radius": np.mean(pr_p, axis=0)[radius], "r_radius": np.mean(pr_r, axis=0)[radius],
    }


def test_precision_recall_curves_match_brute_force(rng):
    qc, dc = tied_codes(rng, 25, 2, 12), tied_codes(rng, 150, 2, 12)
    ql, dl = rng.integers(0, 3, 25), rng.integers(0, 3, 150)
    ql[0] = 7  # one query without relevant items
    cutoffs, pn_points = (1, 10, 100, 1000), (1, 5, 10, 50, 100, 149, 150, 151, 500)
    stats = metrics.query_stats(qc, dc, ql, dl, cutoffs=sorted(set(cutoffs) | set(pn_points)))
    got = metrics.summarize(stats, radius=2, cutoffs=cutoffs, pn_points=pn_points)
    want = brute_force_summary(qc, dc, ql, dl, 2, cutoffs, pn_points)
    for key in ("precision_at", "recall_at"):
        for c in map(str, cutoffs):
            assert got[key][c] == pytest.approx(want[key][c], abs=1e-12), (key, c)
    assert got["pn_curve"]["n"] == [1, 5, 10, 50, 100, 149, 150]
    np.testing.assert_allclose(got["pn_curve"]["precision"], want["pn"], atol=1e-12)
    np.testing.assert_allclose(got["pr_curve"]["precision"], want["pr_p"], atol=1e-12)
    np.testing.assert_allclose(got["pr_curve"]["recall"], want["pr_r"], atol=1e-12)
    assert got["precision_within_radius"] == pytest.approx(want["p_radius"], abs=1e-12)
    assert got["recall_within_radius"] == pytest.approx(want["r_radius"], abs=1e-12)
    assert got["pr_curve"]["recall"][-1] == pytest.approx(24 / 25)  # radius = bits retrieves all
    assert got["bits"] == 16 and got["topk"] == "all"


def test_k_larger_than_database(rng):
    qc, dc = tied_codes(rng, 8), tied_codes(rng, 12)
    ql, dl = rng.integers(0, 2, 8), rng.integers(0, 2, 12)
    stats = metrics.query_stats(qc, dc, ql, dl, topk=1000)
    assert stats.topk == 12
    summary = metrics.summarize(stats)
    assert summary["topk"] == "all"
    assert summary["map"] == pytest.approx(metrics.reference_map(qc, dc, ql, dl))
    # precision@1000 divides by the 12 items there are; recall@1000 is complete
    rel = metrics.relevance_matrix(ql, dl)
    assert summary["precision_at"]["1000"] == pytest.approx(rel.sum(1).mean() / 12)
    assert summary["recall_at"]["1000"] == pytest.approx(np.mean(rel.sum(1) > 0))


# ---- tie-averaged AP ------------------------------------------------------------------------


def ap_over_all_orders(dist, rel, k):
    """Exact expectation: average the position-rule AP over every database order."""
    values = []
    for perm in itertools.permutations(range(len(dist))):
        perm = list(perm)
        order = np.argsort(dist[perm], kind="stable")
        values.append(plain_ap(rel[perm][order], k))
    return float(np.mean(values))


def test_tie_averaged_ap_equals_exhaustive_average_over_tie_orders():
    rng = np.random.default_rng(5)
    for _ in range(40):
        n = int(rng.integers(1, 8))
        dist = rng.integers(0, 3, n)
        rel = rng.random(n) < 0.5
        k = int(rng.integers(1, n + 1))
        counts = np.bincount(dist, minlength=3)
        relevant = np.bincount(dist[rel], minlength=3)
        assert metrics.tie_averaged_ap(counts, relevant, k) == pytest.approx(
            ap_over_all_orders(dist, rel, k), abs=1e-12), (dist, rel, k)


def test_tie_averaged_ap_matches_random_tie_orders_monte_carlo():
    # 60 items at 4 distances, K = 25 cuts through a tie bucket: the denominator (relevant items
    # found in the top K) is random too
    rng = np.random.default_rng(11)
    dist = np.repeat([0, 1, 2, 3], [8, 14, 20, 18])
    rel = rng.random(60) < 0.4
    k, trials = 25, 20_000
    samples = np.empty(trials)
    for t in range(trials):
        perm = rng.permutation(60)
        order = np.argsort(dist[perm], kind="stable")
        samples[t] = plain_ap(rel[perm][order], k)
    expected = metrics.tie_averaged_ap(np.bincount(dist), np.bincount(dist[rel], minlength=4), k)
    assert abs(samples.mean() - expected) < 4 * samples.std() / np.sqrt(trials)
    assert samples.std() > 0.01  # the tie order really matters here


def test_query_stats_tie_average_is_consistent_and_exact_without_ties(rng):
    qc, dc = tied_codes(rng, 20), tied_codes(rng, 90)
    ql, dl = rng.integers(0, 3, 20), rng.integers(0, 3, 90)
    for topk in (None, 7, 40):
        stats = metrics.query_stats(qc, dc, ql, dl, topk=topk)
        one_by_one = [metrics.tie_averaged_ap(stats.dist_counts[i], stats.dist_relevant[i], topk)
                      for i in range(20)]
        np.testing.assert_allclose(stats.ap_tie_avg, one_by_one, atol=1e-13)
    # distinct distances (database codes 0, 1, 3, 7, ... at distances 0..8 from query 0): no ties
    dc = np.array([[(1 << i) - 1] for i in range(9)], np.uint8)
    dl = rng.integers(0, 2, 9)
    stats = metrics.query_stats(np.zeros((1, 1), np.uint8), dc, np.array([1]), dl, topk=5)
    assert stats.ap_tie_avg[0] == pytest.approx(stats.ap[0], abs=1e-15)


# ---- properties -----------------------------------------------------------------------------

small_case = st.fixed_dictionaries({
    "seed": st.integers(0, 2**32 - 1),
    "nq": st.integers(1, 6),
    "ndb": st.integers(1, 40),
    "values": st.integers(1, 8),
    "classes": st.integers(1, 4),
    "topk": st.one_of(st.none(), st.integers(1, 60)),
})


def make_case(c):
    rng = np.random.default_rng(c["seed"])
    qc, dc = tied_codes(rng, c["nq"], 1, c["values"]), tied_codes(rng, c["ndb"], 1, c["values"])
    return rng, qc, dc, rng.integers(0, c["classes"], c["nq"]), rng.integers(0, c["classes"], c["ndb"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_case)
def test_property_map_in_unit_interval_and_equals_reference(c):
    rng, qc, dc, ql, dl = make_case(c)
    stats = metrics.query_stats(qc, dc, ql, dl, topk=c["topk"])
    for values in (stats.ap, stats.ap_tie_avg):
        assert ((values >= 0) & (values <= 1 + 1e-12)).all()
    assert stats.ap.mean() == pytest.approx(metrics.reference_map(qc, dc, ql, dl, topk=c["topk"]), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(small_case)
def test_property_perfect_ranking_scores_one(c):
    rng, _, _, ql, dl = make_case(c)
    # each class has its own code, far from the others: every relevant item is at distance 0
    class_codes = np.array([[0x00], [0xFF], [0x0F], [0xF0]], np.uint8)
    qc, dc = class_codes[ql], class_codes[dl]
    stats = metrics.query_stats(qc, dc, ql, dl, topk=c["topk"])
    has_relevant = (ql[:, None] == dl[None, :]).any(axis=1)
    np.testing.assert_allclose(stats.ap[has_relevant], 1.0)
    np.testing.assert_allclose(stats.ap_tie_avg[has_relevant], 1.0)


@settings(max_examples=40, deadline=None)
@given(small_case)
def test_property_database_order_consistent_with_tie_rule_keeps_result(c):
    rng, qc, dc, ql, dl = make_case(c)
    qc, ql = qc[:1], ql[:1]
    dist = hamming_distances(qc, dc)[0]
    # a random merge of the distance groups that keeps the order inside each group
    groups = {d: list(np.flatnonzero(dist == d)) for d in np.unique(dist)}
    order = []
    while groups:
        d = list(groups)[rng.integers(0, len(groups))]
        order.append(groups[d].pop(0))
        if not groups[d]:
            del groups[d]
    order = np.array(order)
    a = metrics.query_stats(qc, dc, ql, dl, topk=c["topk"])
    b = metrics.query_stats(qc, dc[order], ql, dl[order], topk=c["topk"])
    assert a.ap[0] == pytest.approx(b.ap[0], abs=1e-15)
    np.testing.assert_array_equal(a.relevant_at, b.relevant_at)
    # the tie-averaged AP does not depend on the database order at all
    shuffled = rng.permutation(len(dl))
    s = metrics.query_stats(qc, dc[shuffled], ql, dl[shuffled], topk=c["topk"])
    assert s.ap_tie_avg[0] == pytest.approx(a.ap_tie_avg[0], abs=1e-12)


# ---- input errors ---------------------------------------------------------------------------


def test_bad_inputs_raise_typed_errors(rng):
    qc, dc = tied_codes(rng, 3), tied_codes(rng, 5)
    ql, dl = np.zeros(3, int), np.zeros(5, int)
    with pytest.raises(ConfigError, match="code widths differ"):
        metrics.query_stats(qc, tied_codes(rng, 5, 2), ql, dl)
    with pytest.raises(ConfigError, match=r"shape \(5,\)"):
        metrics.query_stats(qc, dc, ql, dl[:4])
    with pytest.raises(DataError, match="need labels"):
        metrics.query_stats(qc, dc, ql, None)
    with pytest.raises(ConfigError, match="topk"):
        metrics.query_stats(qc, dc, ql, dl, topk=0)
    with pytest.raises(ConfigError, match="uint8"):
        metrics.query_stats(qc.astype(np.int64), dc, ql, dl)
    with pytest.raises(ConfigError, match="radius"):
        metrics.summarize(metrics.query_stats(qc, dc, ql, dl), radius=-1)
    with pytest.raises(ConfigError, match="ties"):
        metrics.mean_average_precision(qc, dc, ql, dl, ties="random")


# ---- result lists (approximate indexes) -----------------------------------------------------


@pytest.mark.parametrize("multi", [False, True])
def test_relevant_counts(rng, multi):
    if multi:
        ql, dl = rng.random((15, 6)) < 0.3, rng.random((80, 6)) < 0.3
    else:
        ql, dl = rng.integers(0, 5, 15), rng.integers(0, 4, 80)  # class 4 absent from the database
    np.testing.assert_array_equal(metrics.relevant_counts(ql, dl), metrics.relevance_matrix(ql, dl).sum(1))


@pytest.mark.parametrize("k", [7, 60, 200])
def test_ranked_lists_in_any_tie_order_give_the_exact_statistics(rng, k):
    qc, dc = tied_codes(rng, 12), tied_codes(rng, 200)
    ql, dl = rng.integers(0, 3, 12), rng.integers(0, 3, 200)
    exact = metrics.query_stats(qc, dc, ql, dl, topk=k)
    dist = hamming_distances(qc, dc)
    # the exact top k under the tie rule, handed over shuffled (as a search library might)
    rows = np.argsort(dist, axis=1, kind="stable")[:, :k]
    shuffled = np.array([rng.permutation(r) for r in rows])
    listed = metrics.ranked_list_stats(shuffled, np.take_along_axis(dist, shuffled, 1), ql, dl, bits=8, n_db=200)
    np.testing.assert_allclose(listed.ap, exact.ap, atol=1e-12)
    np.testing.assert_array_equal(listed.relevant_total, exact.relevant_total)
    got, want = metrics.summarize(listed), metrics.summarize(exact)
    assert got["map"] == pytest.approx(want["map"], abs=1e-12)
    for n, value in got["precision_at"].items():
        assert value == pytest.approx(want["precision_at"][n], abs=1e-12)
        assert got["recall_at"][n] == pytest.approx(want["recall_at"][n], abs=1e-12)
    assert set(got["precision_at"]) == {str(c) for c in metrics.CUTOFFS if c <= k or k >= 200}
    assert got["pr_curve"] is None and got["precision_within_radius"] is None
    # empty slots (-1) are nothing retrieved, wherever the search library put them
    holes = np.where(np.arange(k) % 2 == 0, shuffled, -1)
    partial = metrics.ranked_list_stats(holes, np.take_along_axis(dist, shuffled, 1), ql, dl, bits=8, n_db=200)
    kept = [np.sort(h[h >= 0]) for h in holes]  # database order, as the tie rule needs
    expected = [plain_ap(ranked_relevance(qc[i], dc[kept[i]], ql[i] == dl[kept[i]])[0], k) for i in range(12)]
    np.testing.assert_allclose(partial.ap, expected, atol=1e-12)
