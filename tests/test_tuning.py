"""Recall targets: tie-aware recall, the smallest nprobe / efSearch that reaches a target, eval --recall."""
import json

import numpy as np
import pytest

from ghindex.errors import ConfigError
from ghindex.evaluate import evaluate
from ghindex.hashing import hamming_distances
from ghindex.index import Index, build, build_from_arrays, describe_index
from ghindex.index.tuning import (
    exact_knn_distances,
    recall_at,
    smallest_setting,
    tie_aware_hits,
)
from ghindex.store import CodeStore
from ghindex_cli.main import cli


def clustered(rng, n, centres, flip=0.1):
    bits = centres[rng.integers(0, len(centres), n)] ^ (rng.random((n, centres.shape[1])) < flip)
    return np.packbits(bits.astype(bool), axis=1, bitorder="little")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8,000 database codes of 64 bits around 300 centres, 400 fresh queries, stores with labels."""
    root = tmp_path_factory.mktemp("tuning")
    rng = np.random.default_rng(0)
    centres = rng.integers(0, 2, (300, 64))
    codes, queries = clustered(rng, 8000, centres), clustered(rng, 400, centres)
    for name, c in (("db.h5", codes), ("q.h5", queries)):
        with CodeStore.create(root / name, 64, label_shape=(), encoder_fingerprint="ab" * 32) as s:
            s.append(c, np.arange(len(c)), labels=np.arange(len(c)) % 5)
            s.mark_complete()
    with CodeStore.create(root / "q-nolabels.h5", 64, encoder_fingerprint="ab" * 32) as s:
        s.append(queries, np.arange(len(queries)))
        s.mark_complete()
    return root, codes, queries


def brute_recall(index, queries, database, k, own=None):
    """Tie-aware recall@k straight from numpy distances (leave-one-out when `own` rows are given)."""
    true = hamming_distances(queries, database).astype(np.int64)
    if own is not None:
        true[np.arange(len(queries)), own] = 1 << 30
    kth = np.sort(true, axis=1)[:, k - 1]
    d, i = index.search(queries, k + (own is not None))
    hits = 0
    for q in range(len(queries)):
        row = [(dist, id_) for dist, id_ in zip(d[q], i[q]) if id_ >= 0 and (own is None or id_ != own[q])][:k]
        hits += sum(dist <= kth[q] for dist, _ in row)
    return hits / (k * len(queries))


def test_tie_aware_hits_and_exact_distances(rng):
    found_d = np.array([[0, 1, 2, 2], [3, 3, 3, 9]])
    found_i = np.array([[5, 6, 7, -1], [1, 2, 3, 4]])
    # query 0: k-th exact distance 2 -> 3 items count (the -1 slot does not); query 1: kth 3 -> 3
    assert tie_aware_hits(found_d, found_i, np.array([2, 3]), 4).tolist() == [3, 3]
    database = rng.integers(0, 256, (1000, 6), dtype=np.uint8)
    queries = rng.integers(0, 256, (20, 6), dtype=np.uint8)
    chunks = (database[s:s + 128] for s in range(0, 1000, 128))
    got = exact_knn_distances(queries, chunks, 7, 8)
    np.testing.assert_array_equal(got, np.sort(hamming_distances(queries, database), axis=1)[:, :7])


def test_smallest_setting_doubles_then_bisects():
    calls = []

    def measure(v):
        calls.append(v)
        return min(1.0, v / 100)

    value, recall, trials = smallest_setting(measure, 1, 1024, 0.37)
    assert (value, recall) == (37, 0.37) and len(calls) == len(set(calls)) < 16
    assert trials == sorted(trials)
    assert smallest_setting(measure, 1, 20, 0.9)[:2] == (20, 0.2)  # unreachable: the largest
    assert smallest_setting(measure, 5, 64, 0.01)[0] == 5


def test_ivf_target_picks_the_smallest_nprobe(data, tmp_path):
    root, codes, queries = data
    meta = build(root / "db.h5", tmp_path / "ivf", index_key="BIVF64", gpu="off", target_recall=0.9,
                 tune_queries=300, seed=3)
    tuning = meta["tuning"]
    assert tuning["param"] == "nprobe" and tuning["target_met"] and tuning["recall"] >= 0.9
    assert tuning["k"] == 10 and tuning["queries"] == 300 and tuning["queries_per_second"] > 0
    index = Index.load(tmp_path / "ivf", gpu="off")
    assert index.nprobe == tuning["value"] == meta["params"]["nprobe"] > 1
    # recompute independently on the same sample: the value reaches the target, the one below does not
    from ghindex.index.sampling import sample_positions

    own = sample_positions(8000, 300, [3, 1])
    sample = codes[own]
    assert brute_recall(index, sample, codes, 10, own) == pytest.approx(tuning["recall"], abs=1e-9)
    index.nprobe = tuning["value"] - 1
    assert brute_recall(index, sample, codes, 10, own) < 0.9
    # fresh queries from the same distribution land near the target
    index.nprobe = tuning["value"]
    assert brute_recall(index, queries, codes, 10) == pytest.approx(0.9, abs=0.05)
    described = describe_index(tmp_path / "ivf")["tuning"]
    assert described["value"] == tuning["value"] and described["target_recall"] == 0.9
    # same seed, same choice
    again = build(root / "db.h5", tmp_path / "ivf2", index_key="BIVF64", gpu="off", target_recall=0.9,
                  tune_queries=300, seed=3)
    assert again["tuning"]["value"] == tuning["value"]


def test_hnsw_target_and_refusals(data, tmp_path):
    _, codes, _ = data
    index = build_from_arrays(codes, index_key="BHNSW16", target_recall=0.95, target_k=5, tune_queries=200)
    tuning = index.meta["tuning"]
    assert tuning["param"] == "efSearch" and tuning["k"] == 5 and tuning["value"] >= 5
    assert tuning["recall"] >= 0.95 and index.meta["params"]["efSearch"] == tuning["value"]
    for key, message in (("BFlat", "exact already"), ("BHash16", "not tunable")):
        with pytest.raises(ConfigError, match=message):
            build_from_arrays(codes, index_key=key, target_recall=0.9)
    with pytest.raises(ConfigError, match="drop the index parameter nprobe"):
        build_from_arrays(codes, index_key="BIVF64", index_param=["nprobe=4"], target_recall=0.9)
    for bad in (0, 1.5, "x"):
        with pytest.raises(ConfigError, match="target recall"):
            build_from_arrays(codes, index_key="BIVF64", target_recall=bad)
    with pytest.raises(ConfigError, match="target K"):
        build_from_arrays(codes, index_key="BIVF64", target_recall=0.9, target_k=0)


def test_eval_recall(data, tmp_path):
    root, codes, queries = data
    build(root / "db.h5", tmp_path / "flat", index_key="BFlat", gpu="off")
    build(root / "db.h5", tmp_path / "ivf", index_key="BIVF64", index_param=["nprobe=2"], gpu="off")
    flat = evaluate(root / "q.h5", index=tmp_path / "flat", recall=10)
    assert flat["recall"]["recall"] == 1.0 and flat["metrics"]["map"] > 0  # exact: metrics as well
    ivf = evaluate(root / "q.h5", index=tmp_path / "ivf", recall=10)
    assert ivf["mode"] == "recall" and ivf["metrics"] is None  # approximate with topk=all: recall alone
    index = Index.load(tmp_path / "ivf", gpu="off")
    assert ivf["recall"]["recall"] == pytest.approx(brute_recall(index, queries, codes, 10), abs=1e-9)
    assert ivf["recall"]["recall"] < 1
    assert ivf["recall"]["queries"] == 400 and ivf["recall"]["queries_per_second"] > 0
    both = evaluate(root / "q.h5", index=tmp_path / "ivf", recall=10, topk=100)
    assert both["metrics"]["map"] > 0 and both["recall"]["recall"] == ivf["recall"]["recall"]
    nolabels = evaluate(root / "q-nolabels.h5", index=tmp_path / "ivf", recall=20)
    assert nolabels["recall"]["k"] == 20 and nolabels["metrics"] is None
    index.nprobe = 64
    assert recall_at(index, queries, np.sort(hamming_distances(queries, codes), axis=1)[:, 9], 10) == 1.0
    with pytest.raises(ConfigError, match="give the index"):
        evaluate(root / "q.h5", database=root / "db.h5", recall=10)


def test_cli_build_target_and_eval_recall(data, tmp_path, runner):
    root, _, _ = data
    result = runner.invoke(cli, ["build", "--codes", str(root / "db.h5"), "--out", str(tmp_path / "ivf"),
                                 "--index-key", "BIVF64", "--target-recall", "0.8", "--tune-queries", "200"])
    assert result.exit_code == 0, result.output
    assert "tuning" in result.stdout and "recall@10" in result.stdout and "(target 0.8)" in result.stdout
    result = runner.invoke(cli, ["info", str(tmp_path / "ivf"), "--format", "json"])
    assert json.loads(result.stdout)["tuning"]["target_recall"] == 0.8
    result = runner.invoke(cli, ["eval", "--queries", str(root / "q.h5"), "--index", str(tmp_path / "ivf"),
                                 "--recall"])
    assert result.exit_code == 0, result.output
    assert "recall@10" in result.stdout and "queries/s" in result.stdout
    result = runner.invoke(cli, ["eval", "--queries", str(root / "q.h5"), "--index", str(tmp_path / "ivf"),
                                 "--topk", "50", "--recall", "5", "--format", "json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["recall"]["k"] == 5 and out["metrics"]["topk"] == 50
    for args, message in ((["--index-key", "BFlat", "--target-recall", "0.9"], "exact already"),
                          (["--index-key", "BIVF64", "--target-recall", "1.5"], "0<x<=1")):
        result = runner.invoke(cli, ["build", "--codes", str(root / "db.h5"), "--out", str(tmp_path / "x"), *args])
        assert result.exit_code != 0 and message in result.output, result.output
