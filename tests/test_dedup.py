"""`ghindex dedup` (issue 25): the pairs equal brute force (both methods, every width), the groups and
what is kept, the store / index / --against inputs, the outputs, bad input and faults."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghindex import dedup_join
from ghindex.dedup import dedup, find_groups, group_pairs
from ghindex.dedup_kernels import components
from ghindex.dedup_output import read_groups
from ghindex.errors import ConfigError
from ghindex.hashing import hamming_distances
from ghindex.store import CodeStore
from ghindex_cli.main import cli

SETTINGS = settings(max_examples=60, deadline=None)


def brute(codes, radius, other=None):
    """Every pair within radius, from the full distance matrix (numpy only)."""
    d = hamming_distances(codes, codes if other is None else other)
    mask = d <= radius
    if other is None:
        mask = np.triu(mask, k=1)
    a, b = np.nonzero(mask)
    return a.tolist(), b.tolist(), d[a, b].tolist()


def near_copies(rng, n, nbytes, copies, max_flips):
    """n random codes, the last `copies` of them copies of earlier ones with up to max_flips bits flipped."""
    codes = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    bits = nbytes * 8
    for c in range(n - copies, n):
        codes[c] = codes[rng.integers(0, max(1, n - copies))]
        for b in rng.choice(bits, rng.integers(0, max_flips + 1), replace=False):
            codes[c, b // 8] ^= np.uint8(1 << (b % 8))
    return codes


def as_lists(found):
    return [x.tolist() for x in found[:3]]


# -- the join ----------------------------------------------------------------------------------------
@SETTINGS
@given(n=st.integers(0, 70), nbytes=st.integers(1, 17), seed=st.integers(0, 2**32 - 1),
       radius=st.integers(0, 12), method=st.sampled_from(["auto", "mih", "scan"]))
def test_pairs_equal_brute_force(n, nbytes, seed, radius, method):
    rng = np.random.default_rng(seed)
    codes = near_copies(rng, n, nbytes, n // 3, 4)
    if nbytes == 1:  # few distinct values: big buckets, many ties
        codes &= np.uint8(0x0F)
    bits = nbytes * 8
    radius = min(radius, bits)
    if method == "mih" and not dedup_join.mih_substrings(bits, radius):
        method = "scan"
    got = dedup_join.pairs(dedup_join.words_of(codes), bits, radius, method=method, threads=2)
    assert as_lists(got) == list(brute(codes, radius))


@SETTINGS
@given(n=st.integers(0, 40), m=st.integers(0, 40), nbytes=st.integers(1, 17), seed=st.integers(0, 2**32 - 1),
       radius=st.integers(0, 10), method=st.sampled_from(["auto", "mih", "scan"]))
def test_cross_pairs_equal_brute_force(n, m, nbytes, seed, radius, method):
    rng = np.random.default_rng(seed)
    both = near_copies(rng, n + m, nbytes, (n + m) // 2, 3)
    x, y = both[:n], both[n:]
    bits = nbytes * 8
    radius = min(radius, bits)
    if method == "mih" and not dedup_join.mih_substrings(bits, radius):
        method = "scan"
    got = dedup_join.cross_pairs(dedup_join.words_of(x), dedup_join.words_of(y), bits, radius, method=method)
    want = brute(x, radius, y) if n and m else ([], [], [])
    assert as_lists(got) == list(want)


@pytest.mark.parametrize("nbytes", [8, 9, 16, 32])
def test_big_buckets_split_into_tasks_and_threads_agree(nbytes, monkeypatch):
    """Tasks of a few pairs (so big buckets and the scan's triangle are split by rows), many work items,
    1 or 3 threads: the same pairs as the brute force; the reference of the benchmarks agrees too."""
    monkeypatch.setattr(dedup_join, "TASK_PAIRS", 500)
    monkeypatch.setattr(dedup_join, "ITEM_PAIRS", 2000)
    rng = np.random.default_rng(nbytes)
    codes = near_copies(rng, 1500, nbytes, 500, 6)
    codes[:300, 1:] = 0  # one huge bucket in every substring but the first
    bits = nbytes * 8
    X = dedup_join.words_of(codes)
    for radius in (0, 3, 7, 20):
        want = list(brute(codes, radius))
        assert as_lists(dedup_join.reference_pairs(codes, radius)) == want
        for method in ("mih", "scan"):
            for threads in (1, 3):
                assert as_lists(dedup_join.pairs(X, bits, radius, method=method, threads=threads)) == want


@SETTINGS
@given(nbits=st.integers(1, 64), n=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1))
def test_radix_argsort_is_a_stable_sort(nbits, n, seed):
    from ghindex.dedup_kernels import radix_argsort, runs

    rng = np.random.default_rng(seed)
    high = 2 ** min(nbits, 8) if seed % 2 else 2**63  # few distinct keys (many ties), or many
    keys = rng.integers(0, high, n, dtype=np.uint64) & np.uint64(2**nbits - 1)
    if nbits <= 32 and seed % 3:
        keys = keys.astype(np.uint32)  # what substrings of up to 32 bits are sorted as
    order, sorted_keys = radix_argsort(keys, nbits)
    np.testing.assert_array_equal(order, np.argsort(keys, kind="stable"))
    np.testing.assert_array_equal(sorted_keys, keys[order])
    assert sorted_keys.dtype == keys.dtype
    starts, sizes = runs(sorted_keys, 2)
    values, first, counts = np.unique(sorted_keys, return_index=True, return_counts=True)
    np.testing.assert_array_equal(starts, first[counts >= 2])
    np.testing.assert_array_equal(sizes, counts[counts >= 2])


def test_plan_picks_mih_for_small_radii_and_the_scan_when_buckets_are_full():
    rng = np.random.default_rng(0)
    X = dedup_join.words_of(rng.integers(0, 256, (200_000, 8), dtype=np.uint8))
    assert dedup_join.plan(X, 64, 3).method == "mih"
    assert dedup_join.plan(X, 64, 3).substrings == 4
    assert dedup_join.plan(X, 64, 64).method == "scan"  # no substrings possible
    same = dedup_join.words_of(np.zeros((5000, 8), np.uint8))  # every code equal: every bucket is everything
    assert dedup_join.plan(same, 64, 3).method == "scan"
    with pytest.raises(ConfigError, match="radius"):
        dedup_join.plan(X, 64, 64, method="mih")


def test_radius_checks():
    X = dedup_join.words_of(np.zeros((3, 2), np.uint8))
    for bad in (-1, 17, 1.5, True, "2"):
        with pytest.raises(ConfigError):
            dedup_join.pairs(X, 16, bad)


# -- groups -----------------------------------------------------------------------------------------
def _reference_components(n, a, b):
    label = list(range(n))
    changed = True
    while changed:
        changed = False
        for x, y in zip(a, b):
            m = min(label[x], label[y])
            if label[x] != m or label[y] != m:
                label[x] = label[y] = m
                changed = True
    return label


@SETTINGS
@given(st.integers(1, 30).flatmap(lambda n: st.tuples(st.just(n), st.lists(
    st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda e: e[0] != e[1]), max_size=40))),
    st.sampled_from(["first", "last"]))
def test_groups_are_components_and_keep_leaves_no_pair(graph, keep):
    n, edges = graph
    edges = sorted({(min(e), max(e)) for e in edges})
    a = np.array([e[0] for e in edges], np.int64)
    b = np.array([e[1] for e in edges], np.int64)
    d = np.ones(len(a), np.int32)
    ids = np.arange(n, dtype=np.int64) * 3 + 5
    labels = components(n, a, b).tolist() if n else []
    assert labels == _reference_components(n, a.tolist(), b.tolist())
    groups = group_pairs(a, b, d, ids, keep=keep)
    sizes = np.diff(groups.member_starts)
    assert (sizes[:-1] >= sizes[1:]).all()  # largest first
    kept = set(groups.members[groups.kept].tolist())
    pairs = set(edges)
    for k in range(len(groups)):
        members = groups.members[groups.member_starts[k]:groups.member_starts[k + 1]].tolist()
        assert len({labels[m] for m in members}) == 1 and labels.count(labels[members[0]]) == len(members)
        assert ids[members].tolist() == sorted(ids[members].tolist())
        group_kept = [m for m in members if m in kept]
        assert group_kept, "every group keeps a member"
        preferred = min(members) if keep == "first" else max(members)
        assert preferred in group_kept
    for x, y in pairs:  # no two kept items are a pair; every removed item has a kept one within the radius
        assert not (x in kept and y in kept)
    in_groups = set(groups.members.tolist())
    for x in in_groups - kept:
        assert any((min(x, y), max(x, y)) in pairs for y in kept)


def test_a_chain_is_one_group_with_its_diameter_shown():
    codes = np.zeros((4, 2), np.uint8)
    codes[1, 0] = 0b11  # 2 bits from 0
    codes[2, 0] = 0b1111  # 2 from 1, 4 from 0
    codes[3, 1] = 0xFF  # far from all
    (group,) = find_groups(codes, 2)
    assert group["ids"] == [0, 1, 2]
    assert group["pairs"] == [[0, 1, 2], [1, 2, 2]]
    assert group["diameter"] == 4  # above the radius: joined by a chain
    assert group["kept"] == [0, 2]  # 2 is 4 bits from the kept 0: it stays
    assert find_groups(codes, 2, keep="last")[0]["kept"] == [0, 2]  # 2 first, then 0 (4 bits from 2)
    assert find_groups(codes, 4, keep="last")[0]["kept"] == [2]  # within 4 bits all three are one clique


# -- store, index, CLI --------------------------------------------------------------------------------
def write_store(path, codes, ids=None, paths=None, attrs=None, encoder="", deleted=None):
    ids = np.arange(len(codes), dtype=np.int64) * 10 + 3 if ids is None else np.asarray(ids)
    with CodeStore.create(path, codes.shape[1] * 8, with_paths=paths is not None, attrs=attrs,
                          encoder_fingerprint=encoder, overwrite=True) as s:
        s.append(codes, ids, paths=paths)
        if deleted is not None:
            s.mark_deleted(deleted)
        s.mark_complete()
    return str(path)


@pytest.fixture
def collection(tmp_path):
    rng = np.random.default_rng(5)
    codes = near_copies(rng, 600, 8, 120, 3)
    return codes, write_store(tmp_path / "db.h5", codes), tmp_path


def run(runner, *args):
    result = runner.invoke(cli, ["dedup", "--no-progress", *map(str, args)])
    return result


def errors_only(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert lines and lines[-1].startswith("Error: ") and "Traceback" not in result.output
    return lines[-1]


def test_cli_outputs_agree_with_brute_force(runner, collection):
    codes, store, tmp = collection
    ids = np.arange(len(codes)) * 10 + 3
    result = run(runner, "--codes", store, "--radius", 3, "--format", "jsonl", "--pairs", tmp / "pairs.csv",
                 "--remove-list", tmp / "remove.txt")
    assert result.exit_code == 0, result.output
    a, b, d = brute(codes, 3)
    want = sorted((int(ids[x]), int(ids[y]), z) for x, y, z in zip(a, b, d))
    lines = (tmp / "pairs.csv").read_text().splitlines()
    assert lines[0] == "id_a,id_b,distance"
    assert [tuple(map(int, line.split(","))) for line in lines[1:]] == want
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sum(r["num_pairs"] for r in records) == len(want)
    assert sorted(tuple(p) for r in records for p in r["pairs"]) == want
    for r in records:
        assert r["ids"] == sorted(r["ids"]) and r["size"] == len(r["ids"]) >= 2
        assert set(r["kept"]) <= set(r["ids"]) and r["max_distance"] <= 3
    assert [r["size"] for r in records] == sorted((r["size"] for r in records), reverse=True)
    # summary on stderr
    assert "items in groups" in result.stderr and "pairs" in result.stderr and f"{len(want):,}" in result.stderr
    removed = set(read_id_lines(tmp / "remove.txt"))
    assert removed == {i for r in records for i in r["ids"] if i not in r["kept"]}
    left = np.array([i not in removed for i in ids])
    assert brute(codes[left], 3) == ([], [], [])


def read_id_lines(path):
    lines = Path(path).read_text().splitlines()
    assert lines[0].startswith("# ghindex dedup")
    return [int(line) for line in lines[1:]]


def test_the_remove_list_goes_to_ghindex_remove_and_leaves_no_pair(runner, collection):
    from ghindex.index import build

    codes, store, tmp = collection
    build(store, tmp / "index", index_key="BFlat", gpu="off")
    first = run(runner, "--index", tmp / "index", "--radius", 3, "--remove-list", tmp / "rm.txt", "--format", "json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["summary"]["removed"] == len(read_id_lines(tmp / "rm.txt")) > 0
    removed = runner.invoke(cli, ["remove", "--index", str(tmp / "index"), "--ids-file", str(tmp / "rm.txt")])
    assert removed.exit_code == 0, removed.output
    again = dedup(index=tmp / "index", radius=3)
    assert again.summary["pairs"] == 0 and again.summary["items"] == len(codes) - len(read_id_lines(tmp / "rm.txt"))


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_other_formats(runner, collection, fmt):
    codes, store, tmp = collection
    result = run(runner, "--codes", store, "--radius", 2, "--format", fmt, "--out", tmp / f"groups.{fmt}")
    assert result.exit_code == 0, result.output
    text = (tmp / f"groups.{fmt}").read_text()
    groups = find_groups(codes, 2)
    if fmt == "json":
        doc = json.loads(text)
        assert doc["summary"]["groups"] == len(groups) and len(doc["groups"]) == len(groups)
    elif fmt == "csv":
        assert text.splitlines()[0] == "group,size,id,kept,path"
        assert len(text.splitlines()) == 1 + sum(len(g["ids"]) for g in groups)
    else:
        assert text.splitlines()[0].split()[:5] == ["group", "size", "pairs", "max", "diameter"]
        assert len(text.splitlines()) == 1 + len(groups)


def test_index_input_leaves_deleted_rows_out(runner, tmp_path):
    from ghindex.index import build

    rng = np.random.default_rng(2)
    codes = near_copies(rng, 300, 8, 80, 2)
    store = write_store(tmp_path / "db.h5", codes, deleted=[299, 298, 5])
    build(store, tmp_path / "index", index_key="BFlat", gpu="off")
    by_index = dedup(index=tmp_path / "index", radius=2)
    by_codes = dedup(store, radius=2)
    live = np.setdiff1d(np.arange(300), [5, 298, 299])
    a, b, d = brute(codes[live], 2)
    ids = live * 10 + 3
    want = sorted((int(ids[x]), int(ids[y]), z) for x, y, z in zip(a, b, d))
    for result in (by_index, by_codes):
        assert sorted(zip(*(x.tolist() for x in result.pair_ids()))) == want
    assert by_index.summary["items"] == 297


def test_against(runner, tmp_path):
    rng = np.random.default_rng(4)
    both = near_copies(rng, 500, 16, 250, 3)
    base = write_store(tmp_path / "base.h5", both[:300], ids=np.arange(300), encoder="m1")
    new = write_store(tmp_path / "new.h5", both[300:], ids=np.arange(200) + 100, encoder="m1")
    result = run(runner, "--codes", new, "--against", base, "--radius", 4, "--format", "jsonl",
                 "--pairs", tmp_path / "pairs.csv", "--remove-list", tmp_path / "rm.txt")
    assert result.exit_code == 0, result.output
    a, b, d = brute(both[300:], 4, both[:300])
    want = sorted((int(x) + 100, int(y), z) for x, y, z in zip(a, b, d))
    lines = (tmp_path / "pairs.csv").read_text().splitlines()
    assert lines[0] == "id,other_id,distance"
    assert [tuple(map(int, line.split(","))) for line in lines[1:]] == want
    assert read_id_lines(tmp_path / "rm.txt") == sorted({x for x, _, _ in want})
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert all("other_ids" in r and "kept" not in r for r in records)
    # another model: refused unless --force; another width: refused
    other = write_store(tmp_path / "other.h5", both[:300], ids=np.arange(300), encoder="m2")
    assert "--force" in errors_only(run(runner, "--codes", new, "--against", other, "--radius", 4))
    assert run(runner, "--codes", new, "--against", other, "--radius", 4, "--force").exit_code == 0
    narrow = write_store(tmp_path / "narrow.h5", both[:300, :8], ids=np.arange(300))
    assert "64-bit" in errors_only(run(runner, "--codes", new, "--against", narrow, "--radius", 4))


def test_radius_auto_reads_the_model_recorded_by_encode(runner, tmp_path):
    import ghindex
    from ghindex.encode import encode

    model = ghindex.Encoder("identity", 16, feature_dim=6)
    model.config.copy_radius = 2
    model.save(tmp_path / "m.ghm")
    assert ghindex.Encoder.load(tmp_path / "m.ghm").config.copy_radius == 2
    features = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    features[25:] = features[:25] + 1e-4  # copies
    np.savez(tmp_path / "features.npz", features=features)
    encode(tmp_path / "m.ghm", tmp_path / "features.npz", tmp_path / "codes.h5", device="cpu", progress=False)
    with CodeStore.open(tmp_path / "codes.h5") as s:
        assert s.attrs["copy_radius"] == 2
    result = dedup(tmp_path / "codes.h5", radius="auto")
    assert result.radius == 2 and result.summary["groups"] >= 1
    info = runner.invoke(cli, ["info", str(tmp_path / "m.ghm")])
    assert info.exit_code == 0, info.output
    # a model without one: the store has no attribute, and auto says what to do
    ghindex.Encoder("identity", 16, feature_dim=6).save(tmp_path / "plain.ghm")
    encode(tmp_path / "plain.ghm", tmp_path / "features.npz", tmp_path / "plain.h5", device="cpu", progress=False)
    assert "--radius N" in errors_only(run(runner, "--codes", tmp_path / "plain.h5", "--radius", "auto"))


# -- bad input ---------------------------------------------------------------------------------------
def test_bad_input_is_one_error_line_and_writes_nothing(runner, collection, tmp_path):
    import h5py

    codes, store, tmp = collection
    outputs = ["--pairs", tmp / "p.csv", "--remove-list", tmp / "r.txt", "--out", tmp / "g.jsonl"]
    no_ids = tmp / "noids.h5"
    with h5py.File(no_ids, "w") as f:
        f.create_dataset("codes", data=codes)
        f.attrs["format_version"], f.attrs["bits"] = 1, 64
    empty = write_store(tmp / "empty.h5", np.zeros((0, 8), np.uint8))
    gone = write_store(tmp / "gone.h5", codes[:3], deleted=[0, 1, 2])
    twice = write_store(tmp / "twice.h5", codes[:3], ids=[1, 2, 1])
    cases = [
        (["--codes", store, "--radius", 65], "above the code width (64 bits)"),
        (["--codes", no_ids, "--radius", 2], "not a ghindex code store"),
        (["--codes", empty, "--radius", 2], "holds no codes"),
        (["--codes", gone, "--radius", 2], "every row is deleted"),
        (["--codes", twice, "--radius", 2], "occurs more than once"),
        (["--codes", store, "--radius", 2, "--grid", tmp / "g.png"], "image paths"),
        (["--codes", store, "--index", tmp, "--radius", 2], "exactly one of"),
        (["--index", tmp / "nothing", "--radius", 2], "does not exist"),
    ]
    for args, words in cases:
        line = errors_only(run(runner, *args, *outputs))
        assert words in line, (args, line)
    negative = run(runner, "--codes", store, "--radius", -1, *outputs)  # a usage error, as query's --radius -1
    assert negative.exit_code == 2 and "at least 0" in negative.output.strip().splitlines()[-1], negative.output
    assert not [p for p in tmp.iterdir() if p.suffix in (".csv", ".txt", ".jsonl", ".png", ".tmp")]


class FullDisk:
    """`open` for dedup_output: files whose writes fail with ENOSPC after the first."""

    def __init__(self, reason=errno.ENOSPC):
        self.reason = reason

    def __call__(self, path, *args, **kwargs):
        f = open(path, *args, **kwargs)
        reason, write, count = self.reason, f.write, [0]

        def failing(text):
            count[0] += 1
            if count[0] > 1:
                raise OSError(reason, os.strerror(reason), str(path))
            return write(text)

        f.write = failing
        return f


@pytest.mark.parametrize("reason, words", [(errno.ENOSPC, "no space left on device"),
                                           (errno.EROFS, "read-only file system")])
def test_a_full_disk_leaves_no_half_written_file(runner, collection, monkeypatch, reason, words):
    from ghindex import dedup_output

    codes, store, tmp = collection
    (tmp / "old.csv").write_text("kept as it was\n")
    monkeypatch.setattr(dedup_output, "open", FullDisk(reason), raising=False)
    result = run(runner, "--codes", store, "--radius", 3, "--pairs", tmp / "old.csv", "--remove-list", tmp / "r.txt")
    line = errors_only(result)
    assert str(tmp / "old.csv") in line and words in line and "nothing was written" in line
    assert (tmp / "old.csv").read_text() == "kept as it was\n"
    assert not (tmp / "r.txt").exists()
    assert sorted(p.name for p in tmp.iterdir()) == ["db.h5", "old.csv"]


KILLER = textwrap.dedent("""
    import os, signal, sys
    real = os.replace
    def replace(src, dst, *a, **k):
        if str(dst).endswith("remove.txt"):  # killed between writing the file and renaming it
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *a, **k)
    os.replace = replace
    from ghindex_cli.main import cli
    cli(sys.argv[1:])
""")


def test_a_killed_run_rerun_gives_the_same_result(collection):
    codes, store, tmp = collection
    args = ["dedup", "--codes", store, "--radius", "3", "--no-progress", "--format", "jsonl",
            "--pairs", str(tmp / "pairs.csv"), "--remove-list", str(tmp / "remove.txt"), "--out", str(tmp / "g.jsonl")]
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp / "remove.txt").exists() and not (tmp / "g.jsonl").exists()
    assert any(p.name.startswith(".remove.txt.") for p in tmp.iterdir())  # its temporary file, left behind
    first = {p: (tmp / p).read_bytes() for p in ("pairs.csv",)}
    rerun = subprocess.run([sys.executable, "-m", "ghindex_cli", *args], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert (tmp / "pairs.csv").read_bytes() == first["pairs.csv"]
    clean = tmp / "clean"
    clean.mkdir()
    again = [a.replace(str(tmp), str(clean)) if a.endswith((".csv", ".txt", ".jsonl")) else a for a in args]
    subprocess.run([sys.executable, "-m", "ghindex_cli", *again], check=True, capture_output=True, timeout=300)
    for name in ("pairs.csv", "remove.txt", "g.jsonl"):
        assert (tmp / name).read_bytes() == (clean / name).read_bytes(), name
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]  # the dead run's temporary file is gone


def test_grid_with_image_paths(runner, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    paths = []
    for i in range(12):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    codes = near_copies(rng, 12, 4, 5, 2)
    store = write_store(tmp_path / "db.h5", codes, paths=paths)
    result = run(runner, "--codes", store, "--radius", 2, "--grid", tmp_path / "grid.png", "--format", "csv")
    assert result.exit_code == 0, result.output
    groups = find_groups(codes, 2)
    with Image.open(tmp_path / "grid.png") as img:
        assert img.height >= 100 * len(groups) and img.width >= 100 * max(len(g["ids"]) for g in groups)
    csv_paths = [line.rsplit(",", 1)[1] for line in result.stdout.splitlines()[1:]]
    assert set(csv_paths) <= set(paths) and csv_paths


def test_read_groups_checks_its_input(tmp_path):
    good = tmp_path / "g.jsonl"
    good.write_text('{"ids": [1, 2], "pairs": [[1, 2, 0]]}\n\n{"ids": [3, 4, 5], "pairs": []}\n')
    assert [g["ids"] for g in read_groups(good)] == [[3, 4, 5], [1, 2]]
    for text, words in [("not json\n", "not JSON"), ('{"ids": "x"}\n', "integer"),
                        ('{"ids": [1], "pairs": [[1, 2]]}\n', "pairs")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=words):
            read_groups(bad)


def test_numpy_api_needs_nothing_else():
    codes = np.array([[1, 0], [1, 0], [3, 0], [200, 7]], np.uint8)
    assert find_groups(codes, 0) == [{"ids": [0, 1], "kept": [0], "pairs": [[0, 1, 0]], "diameter": 0}]
    assert [g["ids"] for g in find_groups(codes, 1)] == [[0, 1, 2]]


# -- the review page's API (`ghindex serve --duplicates`) ---------------------------------------------
DEMO = Path(__file__).resolve().parents[1] / "data" / "cifar10-demo"


def make_duplicates_index(folder: Path) -> dict:
    """30 demo images with chosen 32-bit codes: a group of 4 (copies within 2 bits of the first), a chain
    of 3 (2 bits a step), an exact pair, one whose image file is gone; the rest far apart. Their code
    store (ids 100, 101, ...), a flat index and `ghindex dedup --radius 2 --format jsonl` of it."""
    from ghindex.index import build

    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for c in sorted(DEMO.joinpath("database").iterdir()) for p in sorted(c.glob("*.jpg"))[:3]]
    paths[-1] = str(folder / "gone.jpg")
    rng = np.random.default_rng(11)
    codes = rng.integers(0, 256, (len(paths), 4), dtype=np.uint8)
    codes[1] = codes[0] ^ np.array([1, 0, 0, 0], np.uint8)
    codes[2] = codes[0] ^ np.array([0, 3, 0, 0], np.uint8)
    codes[3] = codes[0]
    codes[4] = codes[5] ^ np.array([0, 0, 3, 0], np.uint8)  # chain 4 - 5 - 6
    codes[6] = codes[5] ^ np.array([0, 0, 0, 3], np.uint8)
    codes[8] = codes[7]
    codes[29] = codes[9]  # the image that is gone, and a copy
    ids = np.arange(len(paths)) + 100
    store = write_store(folder / "db.h5", codes, ids=ids, paths=paths)
    build(store, folder / "index", index_key="BFlat", gpu="off")
    dedup(store, radius=2, fmt="jsonl", out=folder / "groups.jsonl")
    return {"index": folder / "index", "store": store, "ids": ids, "codes": codes, "paths": paths,
            "jsonl": folder / "groups.jsonl", "folder": folder}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install '.[serve]'")
    data = make_duplicates_index(tmp_path_factory.mktemp("dedup-serve"))
    groups = find_groups(data["codes"], 2)
    assert [len(g["ids"]) for g in groups] == [4, 3, 2, 2] and any(g["diameter"] == 4 for g in groups)
    return data


def client_for(data, jsonl, **options):
    import warnings

    from ghindex.serve import create_app
    from ghindex.serve.duplicates import add_duplicates

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    app = create_app(data["index"], **options)
    add_duplicates(app, jsonl)
    return TestClient(app)


def test_duplicates_api_pages_the_groups_largest_first(served):
    jsonl = served["jsonl"]
    groups = [json.loads(line) for line in jsonl.read_text().splitlines()]
    with client_for(served, jsonl) as client:
        first = client.get("/api/duplicates", params={"limit": 1}).json()
        assert first["total"] == len(groups) and first["file"] == "groups.jsonl"
        assert first["items"] == sum(len(g["ids"]) for g in groups)
        everything = client.get("/api/duplicates", params={"limit": 200}).json()["groups"]
        assert [g["ids"] for g in everything] == [g["ids"] for g in groups]
        assert [g["size"] for g in everything] == sorted((g["size"] for g in everything), reverse=True)
        assert everything[0] == first["groups"][0]
        assert client.get("/api/duplicates", params={"offset": 1, "limit": 1}).json()["groups"] == everything[1:2]
        for g, want in zip(everything, groups):
            assert g["pairs"] == want["pairs"] and g["kept"] == want["kept"] and g["missing"] == []
        # every member's image comes from the search page's route, by id
        assert client.get(f"/api/items/{everything[0]['ids'][0]}/image").status_code == 200
        for params in ({"limit": 0}, {"limit": 201}, {"offset": -1}):
            response = client.get("/api/duplicates", params=params)
            assert response.status_code == 400 and "error" in response.json()
        page = client.get("/duplicates")
        assert page.status_code == 200 and "duplicates.js" in page.text
        assert client.get("/static/duplicates.js").status_code == 200
        assert client.get("/static/duplicates.css").status_code == 200
        assert "/api/duplicates" in client.get("/openapi.json").json()["paths"]


def test_duplicates_api_marks_ids_the_index_lacks_and_needs_the_token(served, tmp_path):
    known = int(served["ids"][0])
    jsonl = tmp_path / "against.jsonl"
    jsonl.write_text(json.dumps({"group": 1, "size": 2, "ids": [123456], "other_ids": [known],
                                 "pairs": [[123456, known, 1]]}) + "\n")
    with client_for(served, jsonl, token="sesame") as client:
        assert client.get("/api/duplicates").status_code == 401
        body = client.get("/api/duplicates", headers={"Authorization": "Bearer sesame"}).json()
        (group,) = body["groups"]
        assert group["missing"] == [123456] and group["other_ids"] == [known] and group["kept"] is None
        assert client.get("/duplicates").status_code == 200  # the page itself asks for the token


def test_duplicates_file_errors(served, tmp_path):
    from ghindex.serve import create_app
    from ghindex.serve.duplicates import add_duplicates

    app = create_app(served["index"])
    with pytest.raises(ConfigError, match="not found"):
        add_duplicates(app, tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        add_duplicates(app, tmp_path / "bad.jsonl")


def test_serve_duplicates_command(served, runner, tmp_path):
    """The real command: `ghindex serve --duplicates FILE` says where the page is and serves it."""
    import httpx

    from test_serve import serve_process

    with serve_process(["--index", served["index"], "--duplicates", served["jsonl"]], tmp_path) as (line, _):
        assert "4 duplicate groups at /duplicates" in line, line
        with httpx.Client(base_url=line.split()[2], timeout=30) as c:
            assert c.get("api/duplicates").json()["total"] == 4
            assert "duplicates.js" in c.get("duplicates").text
    result = runner.invoke(cli, ["serve", "--index", str(served["index"]), "--duplicates", str(tmp_path / "no.jsonl"),
                                 "--port", "0"])
    assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1].startswith("Error: duplicates file not found")


def test_readme_dedup_block_uses_real_options():
    from test_readme import commands, test_readme_options_exist

    assert [args[0] for args in commands("dedup")] == ["dedup", "dedup", "remove", "serve", "dedup"]
    test_readme_options_exist("dedup")  # every option exists, choices and numbers parse
