"""`evaluate` / `ghindex eval` and `query` / `ghindex query` on small stores, models and indexes."""
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ghindex import metrics
from ghindex.encoder import Encoder
from ghindex.errors import ConfigError, DataError, ModelFileError, StoreError
from ghindex.evaluate import evaluate
from ghindex.ids import StoreLookup
from ghindex.hashing import hamming_distances
from ghindex.index import build
from ghindex.io import file_fingerprint
from ghindex.query import query
from ghindex.store import CodeStore
from ghindex_cli.main import cli

PNG = b"\x89PNG\r\n\x1a\n"
CLASSES = ["red", "green", "blue"]


def write_store(path, codes, labels, ids=None, paths=None, encoder_fingerprint=None, attrs=None):
    ids = np.arange(len(codes)) + 1000 if ids is None else ids
    label_shape = None if labels is None else tuple(np.asarray(labels).shape[1:])
    with CodeStore.create(path, codes.shape[1] * 8, encoder_fingerprint=encoder_fingerprint,
                          label_shape=label_shape, with_paths=paths is not None, attrs=attrs) as store:
        store.append(codes, ids, labels=labels, paths=paths)
        store.mark_complete()
    return path


def clustered(rng, n, bits, labels, flip=0.12):
    centres = np.random.default_rng(99).integers(0, 2, (4, bits)).astype(bool)
    bits01 = centres[labels] ^ (rng.random((n, bits)) < flip)
    return np.packbits(bits01, axis=1, bitorder="little")


@pytest.fixture
def code_setup(tmp_path, rng):
    """300 database / 40 query 32-bit codes (3 classes, many ties), stores, a flat and an IVF index."""
    db_labels, q_labels = rng.integers(0, 3, 300), rng.integers(0, 3, 40)
    db_codes, q_codes = clustered(rng, 300, 32, db_labels), clustered(rng, 40, 32, q_labels)
    attrs = {"protocol": "toy", "split": "database", "seed": 7}
    db = write_store(tmp_path / "db.h5", db_codes, db_labels, encoder_fingerprint="e" * 64, attrs=attrs)
    q = write_store(tmp_path / "q.h5", q_codes, q_labels, encoder_fingerprint="e" * 64,
                    attrs=dict(attrs, split="query"))
    flat = tmp_path / "flat"
    build(db, flat, index_key="BFlat", gpu="off")
    ivf = tmp_path / "ivf"
    build(db, ivf, index_key="BIVF4", index_param=["nprobe=4"], gpu="off")
    return dict(db=db, q=q, flat=flat, ivf=ivf, db_codes=db_codes, q_codes=q_codes,
                db_labels=db_labels, q_labels=q_labels, tmp=tmp_path)


def test_evaluate_exact_matches_metrics_and_writes_report_and_plots(code_setup):
    s = code_setup
    want = metrics.retrieval_metrics(s["q_codes"], s["db_codes"], s["q_labels"], s["db_labels"])
    report, prefix = s["tmp"] / "out" / "report.json", s["tmp"] / "out" / "cifar"
    result = evaluate(s["q"], index=s["flat"], report=report, plot=prefix)
    assert result["mode"] == "exact"
    assert result["metrics"]["map"] == pytest.approx(want["map"], abs=1e-12)
    assert result["metrics"]["map"] == pytest.approx(
        metrics.reference_map(s["q_codes"], s["db_codes"], s["q_labels"], s["db_labels"]), abs=1e-12)
    assert result["metrics"]["map_tie_avg"] == pytest.approx(want["map_tie_avg"], abs=1e-12)
    on_disk = json.loads(report.read_text())
    assert on_disk["protocol"] == "toy" and on_disk["seed"] == 7 and on_disk["bits"] == 32
    assert on_disk["database"]["fingerprint"] == file_fingerprint(s["db"])
    assert on_disk["queries"]["fingerprint"] == file_fingerprint(s["q"])
    assert on_disk["index"]["store_fingerprint"] == file_fingerprint(s["db"])
    assert on_disk["encoder_fingerprint"] == "e" * 64
    assert on_disk["metrics"]["pr_curve"]["radius"] == list(range(33))
    for name in ("pr", "pn"):
        assert (s["tmp"] / "out" / f"cifar-{name}.png").read_bytes()[:8] == PNG
    # codes against codes, no index: the same numbers
    direct = evaluate(s["q"], database=s["db"], topk=100)
    assert direct["index"] is None
    assert direct["metrics"]["map"] == pytest.approx(
        metrics.mean_average_precision(s["q_codes"], s["db_codes"], s["q_labels"], s["db_labels"], topk=100))


def test_evaluate_through_an_approximate_index(code_setup):
    s = code_setup
    with pytest.raises(ConfigError, match="approximate"):
        evaluate(s["q"], index=s["ivf"])
    # all lists probed and K = N: the IVF lists hold the whole database, so the metrics are exact
    exact = evaluate(s["q"], index=s["flat"], topk=300)["metrics"]
    approx = evaluate(s["q"], index=s["ivf"], topk=300)
    assert approx["mode"] == "index"
    m = approx["metrics"]
    assert m["map"] == pytest.approx(exact["map"], abs=1e-12)
    assert m["map_tie_avg"] == pytest.approx(exact["map_tie_avg"], abs=1e-12)
    assert m["precision_at"] == pytest.approx(exact["precision_at"], abs=1e-12)
    assert m["precision_within_radius"] == pytest.approx(exact["precision_within_radius"], abs=1e-12)
    assert m["recall_within_radius"] == pytest.approx(exact["recall_within_radius"], abs=1e-12)
    assert m["pr_curve"] is None
    # fewer neighbours: only the K that exist are reported
    small = evaluate(s["q"], index=s["ivf"], topk=10)["metrics"]
    assert set(small["precision_at"]) == {"1", "10"} and small["topk"] == 10


def test_evaluate_refuses_bad_inputs(code_setup, tmp_path, rng):
    s = code_setup
    unlabeled = write_store(tmp_path / "nolabels.h5", s["q_codes"], None)
    with pytest.raises(DataError, match="no labels"):
        evaluate(unlabeled, database=s["db"])
    wide = write_store(tmp_path / "wide.h5", rng.integers(0, 256, (5, 8), dtype=np.uint8), np.zeros(5, int))
    with pytest.raises(ConfigError, match="bits"):
        evaluate(wide, database=s["db"])
    with pytest.raises(ConfigError, match="database"):
        evaluate(s["q"])
    other = write_store(tmp_path / "other.h5", s["db_codes"][::-1].copy(), s["db_labels"][::-1].copy())
    with pytest.raises(Exception, match="another fingerprint"):
        evaluate(s["q"], index=s["flat"], database=other)


def test_eval_cli_formats_and_errors(runner, code_setup):
    s = code_setup
    result = runner.invoke(cli, ["eval", "--queries", str(s["q"]), "--index", str(s["flat"]), "--topk", "50"])
    assert result.exit_code == 0, result.output
    assert "mAP@50" in result.output and "tie-averaged" in result.output and "P@K" in result.output
    result = runner.invoke(cli, ["eval", "--queries", str(s["q"]), "--database", str(s["db"]), "--format", "json",
                                 "--report", str(s["tmp"] / "r.json"), "--plot", str(s["tmp"] / "p")])
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.stdout)
    assert parsed["metrics"]["topk"] == "all" and parsed["report"].endswith("r.json")
    assert json.loads((s["tmp"] / "r.json").read_text())["metrics"] == parsed["metrics"]
    result = runner.invoke(cli, ["eval", "--queries", str(s["q"]), "--index", str(s["ivf"])])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "Traceback" not in result.output
    result = runner.invoke(cli, ["eval", "--queries", str(s["q"]), "--database", str(s["db"]), "--topk", "0"])
    assert result.exit_code == 2


def test_store_lookup():
    lookup = StoreLookup(np.array([30, 10, 20]))
    np.testing.assert_array_equal(lookup.rows([[10, 30], [-1, 25]]), [[1, 0], [-1, -1]])


# ---- query ----------------------------------------------------------------------------------


def expected_neighbours(q_code, db_codes, ids, k):
    dist = hamming_distances(q_code[None], db_codes)[0]
    order = np.argsort(dist, kind="stable")[:k]
    return [(int(ids[j]), int(dist[j])) for j in order]


def test_query_by_ids_and_codes_rank_ties_by_database_position(code_setup):
    s = code_setup
    ids = np.arange(300) + 1000
    results = query(s["flat"], ids="1003,1010", k=7)
    assert [r["query"] for r in results] == ["id:1003", "id:1010"]
    for r, row in zip(results, (3, 10)):
        got = [(n["id"], n["distance"]) for n in r["neighbors"]]
        assert got == expected_neighbours(s["db_codes"][row], s["db_codes"], ids, 7)
        assert r["query_label"] == s["db_labels"][row]
        for n in r["neighbors"]:
            assert n["label"] == s["db_labels"][n["id"] - 1000]
            assert n["relevant"] == (n["label"] == r["query_label"])
    by_codes = query(s["flat"], codes=s["q"], k=5, radius=13)
    assert len(by_codes) == 40
    for r, code in zip(by_codes, s["q_codes"]):
        want = [(i, d) for i, d in expected_neighbours(code, s["db_codes"], ids, 5) if d <= 13]
        assert [(n["id"], n["distance"]) for n in r["neighbors"]] == want
    with pytest.raises(ConfigError, match="exactly one"):
        query(s["flat"], ids="1", codes=s["q"])
    with pytest.raises(ConfigError, match="not in code store"):
        query(s["flat"], ids="5")


@pytest.fixture
def image_setup(tmp_path):
    """12 tiny images in 3 colour classes, a random smallcnn model, its store and a flat index."""
    torch.manual_seed(0)
    model = Encoder("smallcnn", 16, image_size=32)
    model_path = tmp_path / "model.ghm"
    model.save(model_path)
    rng = np.random.default_rng(1)
    paths, labels = [], []
    for i in range(12):
        c = i % 3
        pixels = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
        pixels[..., c] += 180
        path = tmp_path / "img" / CLASSES[c] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
        labels.append(c)
    codes = model.encode(paths)
    store = write_store(tmp_path / "db.h5", codes, np.array(labels), ids=np.arange(12), paths=paths,
                        encoder_fingerprint=file_fingerprint(model_path),
                        attrs={"class_names": CLASSES})
    index = tmp_path / "index"
    build(store, index, index_key="BFlat", gpu="off")
    torch.manual_seed(1)
    other = tmp_path / "other.ghm"
    Encoder("smallcnn", 16, image_size=32).save(other)
    return dict(model=model_path, other=other, paths=paths, labels=labels, codes=codes, store=store,
                index=index, tmp=tmp_path)


def test_query_images_with_the_index_model(image_setup):
    s = image_setup
    results = query(s["index"], model=s["model"], images=s["paths"][:2], k=4, grid=s["tmp"] / "grid.png", rerank=0)
    for r, code in zip(results, s["codes"][:2]):
        assert [(n["id"], n["distance"]) for n in r["neighbors"]] == expected_neighbours(code, s["codes"], np.arange(12), 4)
        assert r["neighbors"][0]["distance"] == 0
        for n in r["neighbors"]:
            assert n["path"] == s["paths"][n["id"]] and n["label_name"] == CLASSES[s["labels"][n["id"]]]
            assert n["relevant"] is None  # query images carry no label
    assert (s["tmp"] / "grid.png").read_bytes()[:8] == PNG
    with pytest.raises(ModelFileError, match="is not the model"):
        query(s["index"], model=s["other"], images=s["paths"][:1])
    forced = query(s["index"], model=s["other"], images=s["paths"][:1], force=True, k=3)
    assert len(forced[0]["neighbors"]) == 3


def test_image_queries_rerank_their_nearest_codes_by_weighted_hamming(image_setup, runner):
    from ghindex.hashing import unpack_bits, weighted_hamming

    s = image_setup
    model = Encoder.load(s["model"])
    h = model.hash_outputs(s["paths"][:3])
    np.testing.assert_array_equal(ghindex_pack(h), model.encode(s["paths"][:3]))  # codes = signs of H
    full = weighted_hamming(h, s["codes"])  # (3, 12): every stored code
    bits = unpack_bits(s["codes"], 16).astype(bool)
    brute = np.array([[np.abs(hq)[(hq >= 0) != b].sum() for b in bits] for hq in h])
    np.testing.assert_allclose(full, brute, rtol=1e-6)
    np.testing.assert_allclose(weighted_hamming(h, np.stack([s["codes"]] * 3)), brute, rtol=1e-6)  # per-query sets
    assert (full[np.arange(3), np.arange(3)] == 0).all()  # an image's own code differs in no bit

    for rerank, k in ((5, 4), (None, 6)):  # 5 Hamming-nearest candidates; the default (100: all 12)
        results = query(s["index"], model=s["model"], images=s["paths"][:3], k=k, rerank=rerank)
        hamming = hamming_distances(s["codes"][:3], s["codes"])
        for qi, r in enumerate(results):
            pool = expected_neighbours(s["codes"][qi], s["codes"], np.arange(12), rerank or 12)
            want = sorted(pool, key=lambda p: (round(float(full[qi, p[0]]), 4), p[1], p[0]))[:k]
            assert [(n["id"], n["distance"]) for n in r["neighbors"]] == want
            assert [n["weighted_distance"] for n in r["neighbors"]] == pytest.approx([full[qi, i] for i, _ in want], abs=1e-4)
            assert all(n["distance"] == hamming[qi, n["id"]] for n in r["neighbors"])
    plain = query(s["index"], model=s["model"], images=s["paths"][:1], k=4, rerank=0)[0]["neighbors"]
    assert "weighted_distance" not in plain[0]
    within = query(s["index"], model=s["model"], images=s["paths"][:1], k=12, radius=6)[0]["neighbors"]
    assert within and all(n["distance"] <= 6 for n in within)  # the radius still limits Hamming distance
    with pytest.raises(ConfigError, match="image queries only"):
        query(s["index"], ids=[1], rerank=10)
    with pytest.raises(ConfigError, match="rerank must be"):
        query(s["index"], model=s["model"], images=s["paths"][:1], rerank=-1)
    result = runner.invoke(cli, ["query", "--index", str(s["index"]), "--model", str(s["model"]), s["paths"][0]])
    assert result.exit_code == 0 and "w.dist" in result.output, result.output
    result = runner.invoke(cli, ["query", "--index", str(s["index"]), "--model", str(s["model"]), s["paths"][0],
                                 "--rerank", "0"])
    assert result.exit_code == 0 and "w.dist" not in result.output, result.output
    result = runner.invoke(cli, ["query", "--index", str(s["index"]), "--ids", "1", "--rerank", "3"])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "image queries only" in result.output


def ghindex_pack(h):
    from ghindex.hashing import pack_signs

    return pack_signs(h)


def test_grid_frames_relevant_green_and_others_red(image_setup):
    from ghindex.query import GRID_CELL

    s = image_setup
    results = query(s["index"], ids=[0, 4], k=6, grid=s["tmp"] / "g.png")
    grid = np.asarray(Image.open(s["tmp"] / "g.png").convert("RGB"))
    pad = 6
    for qi, r in enumerate(results):
        y = pad + qi * (GRID_CELL + 14 + pad) + GRID_CELL // 2
        for ci, n in enumerate(r["neighbors"]):
            x = pad * 2 + (ci + 1) * (GRID_CELL + pad) + 1  # inside the 4 px frame
            assert tuple(grid[y, x]) == ((0, 170, 0) if n["relevant"] else (210, 0, 0))
    assert any(n["relevant"] for r in results for n in r["neighbors"])
    assert not all(n["relevant"] for r in results for n in r["neighbors"])


def test_query_cli_formats_parse(runner, image_setup):
    s = image_setup
    base = ["query", "--index", str(s["index"]), "--ids", "1,2", "-k", "3"]
    result = runner.invoke(cli, base + ["--format", "json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["query_id"] for r in lines] == [1, 2] and all(len(r["neighbors"]) == 3 for r in lines)
    assert lines[0]["query_label_name"] == "green"
    result = runner.invoke(cli, base + ["--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 6 and rows[0]["query"] == "id:1" and rows[0]["rank"] == "1"
    assert {r["relevant"] for r in rows} <= {"yes", "no"}
    assert [int(r["distance"]) for r in rows[:3]] == sorted(int(r["distance"]) for r in rows[:3])
    result = runner.invoke(cli, base)
    assert result.exit_code == 0 and "query id:1" in result.output and "green" in result.output
    result = runner.invoke(cli, ["query", "--index", str(s["index"]), "--model", str(s["model"]), s["paths"][0],
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["neighbors"][0]["distance"] == 0


def test_query_cli_refuses_a_model_with_another_fingerprint(runner, image_setup):
    s = image_setup
    args = ["query", "--index", str(s["index"]), "--model", str(s["other"]), s["paths"][0]]
    result = runner.invoke(cli, args)
    assert result.exit_code == 1
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: model ") and "is not the model index" in errors[0]
    assert "Traceback" not in result.output
    result = runner.invoke(cli, args + ["--force", "--format", "json"])
    assert result.exit_code == 0, result.output


def test_query_refuses_a_store_changed_since_the_index(image_setup):
    s = image_setup
    with CodeStore.open(s["store"], mode="a") as store:
        store.set_attrs(note="changed")
    with pytest.raises(StoreError, match="changed since index"):
        query(s["index"], ids="1")
    assert len(query(s["index"], ids="1", force=True, k=2)[0]["neighbors"]) == 2
