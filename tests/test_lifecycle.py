"""`add` and `remove` on a built index: ids, stores, index kinds, drift, SIGKILL at every step, CLI."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import ghindex
from ghindex.errors import ConfigError, DataError, IndexFileError, ModelFileError, StoreError
from ghindex.evaluate import evaluate
from ghindex.index import Index, build
from ghindex.lifecycle import add, remove
from ghindex.lifecycle import DRIFT_REBUILD_RATIO, KILL_ENV, side_store_path
from ghindex.info import info
from ghindex.io import file_fingerprint
from ghindex.store import CodeStore
from ghindex_cli.main import cli

CLI = [sys.executable, "-m", "ghindex_cli"]
FEATURES = 16
ENCODE = dict(device="cpu", workers=0, progress=False)


def clustered_features(rng, n, centres):
    which = rng.integers(0, len(centres), n)
    return (centres[which] + 0.3 * rng.standard_normal((n, FEATURES))).astype(np.float32), which % 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 32-bit identity model, 2,000 database feature rows, 300 new ones, 300 from elsewhere."""
    from ghindex.encode import encode

    root = tmp_path_factory.mktemp("lifecycle")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, FEATURES)) * 2
    torch.manual_seed(0)
    model = root / "model.ghm"
    ghindex.Encoder("identity", 32, feature_dim=FEATURES).save(model)
    features, labels = clustered_features(rng, 2000, centres)
    np.savez(root / "db.npz", features=features, labels=labels)
    features, labels = clustered_features(rng, 300, centres)
    np.savez(root / "new.npz", features=features, labels=labels)
    far = rng.standard_normal((300, FEATURES)).astype(np.float32) * 5 + 7
    np.savez(root / "far.npz", features=far, labels=np.arange(300) % 4)
    encode(model, root / "db.npz", root / "db.h5", **ENCODE)
    encode(model, root / "new.npz", root / "new.h5", **ENCODE)
    return root


def fresh(setup, tmp_path, key="BIVF16", **build_args):
    """A copy of the database store and an index built from it, in tmp_path."""
    shutil.copy(setup / "db.h5", tmp_path / "db.h5")
    build(tmp_path / "db.h5", tmp_path / "index", index_key=key, gpu="off", **build_args)
    return tmp_path / "index", tmp_path / "db.h5"


def store_rows(path):
    with CodeStore.open(path) as s:
        return s.codes(), s.ids(), s.labels(), s.deleted()


def assert_consistent(index_dir, store):
    """The index holds exactly the store's live rows, and query/eval accept the pair."""
    codes, ids, _, deleted = store_rows(store)
    index = Index.load(index_dir, gpu="off")
    assert index.ntotal == int((~deleted).sum())
    assert index.meta["store_fingerprint"] == file_fingerprint(store)
    if index.kind == "ivf":
        index.nprobe = index.faiss_index.nlist
    _, found = index.search(codes, 1)
    live = ~deleted
    # every live code finds a code at distance 0 that is live (HNSW: approximate even so, with these
    # many duplicate codes); deleted ids never come back
    assert not np.isin(found, ids[deleted]).any()
    d, _ = index.search(codes[live], 1)
    assert (d[:, 0] == 0).all() or index.kind == "hnsw"
    evaluate(store, index=index_dir, topk=10, recall=10)  # fingerprints match: no error


# ---------------------------------------------------------------------------------------------- add
def test_add_images_appends_with_new_ids_into_trained_lists(setup, tmp_path):
    index_dir, store = fresh(setup, tmp_path)
    before = Index.load(index_dir, gpu="off")
    centroids = before.faiss_index.quantizer.reconstruct_n(0, 16)
    summary = add(index_dir, setup / "new.npz", model=setup / "model.ghm", **ENCODE)
    assert summary["status"] == "complete" and summary["added"] == 300 and summary["ntotal"] == 2300
    assert (summary["ids_min"], summary["ids_max"]) == (2000, 2299)
    assert summary["encode"]["count"] == 300
    codes, ids, labels, deleted = store_rows(store)
    new_codes, _, new_labels, _ = store_rows(setup / "new.h5")
    np.testing.assert_array_equal(codes[2000:], new_codes)
    np.testing.assert_array_equal(ids[2000:], np.arange(2000, 2300))
    np.testing.assert_array_equal(labels[2000:], new_labels)
    assert not deleted.any() and not side_store_path(index_dir).exists()
    after = Index.load(index_dir, gpu="off")
    assert after.index_key == "BIVF16" and after.meta["train_size"] == before.meta["train_size"]
    # no retraining: the same centroids
    np.testing.assert_array_equal(after.faiss_index.quantizer.reconstruct_n(0, 16), centroids)
    # fresh codes of the build's distribution: about as far from the centroids as the build's
    drift = summary["drift"]
    assert 0.8 < drift["last_add_ratio"] < 1.15 and not summary["rebuild_recommended"]
    assert after.meta["lifecycle"]["added"] == 300 and after.meta["lifecycle"]["ntotal_at_build"] == 2000
    assert_consistent(index_dir, store)
    # the store says where its rows came from
    with CodeStore.open(store) as s:
        assert json.loads(s.attrs["history"])[-1]["op"] == "add"

    again = add(index_dir, setup / "new.npz", model=setup / "model.ghm", **ENCODE)
    assert again["status"] == "already complete" and again["added"] == 0 and again["ntotal"] == 2300


def test_add_far_codes_recommends_a_rebuild(setup, tmp_path):
    index_dir, store = fresh(setup, tmp_path)
    summary = add(index_dir, setup / "far.npz", model=setup / "model.ghm", **ENCODE)
    assert summary["drift"]["last_add_ratio"] > DRIFT_REBUILD_RATIO and summary["rebuild_recommended"]
    assert info(str(index_dir))["lifecycle"]["rebuild_recommended"] is True
    assert_consistent(index_dir, store)


@pytest.mark.parametrize("key", ["BFlat", "BHNSW8", "BHash12"])
def test_add_codes_to_other_index_kinds(setup, tmp_path, key):
    index_dir, store = fresh(setup, tmp_path, key)
    summary = add(index_dir, codes=setup / "new.h5")
    assert summary["added"] == 300 and summary["drift"] is None and summary["ids_min"] == 2000
    assert add(index_dir, codes=setup / "new.h5")["status"] == "already complete"
    assert_consistent(index_dir, store)


def test_add_ids_from_list_file_and_keep_ids(setup, tmp_path):
    from PIL import Image

    index_dir = tmp_path / "index"
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(images / f"{i}.png")
    torch.manual_seed(0)
    model = tmp_path / "cnn.ghm"
    ghindex.Encoder("smallcnn", 16, image_size=16).save(model)
    (tmp_path / "db.txt").write_text("".join(f"imgs/{i}.png {100 + i}\n" for i in range(8)))
    (tmp_path / "new.txt").write_text("".join(f"imgs/{i}.png {500 + i}\n" for i in range(8, 12)))
    (tmp_path / "clash.txt").write_text("imgs/9.png 103\n")
    from ghindex.encode import encode

    encode(model, tmp_path / "db.txt", tmp_path / "db.h5", ids_from=1, **ENCODE)
    build(tmp_path / "db.h5", index_dir, gpu="off")
    with pytest.raises(DataError, match="id 103"):
        add(index_dir, tmp_path / "clash.txt", model=model, ids_from=1, **ENCODE)
    summary = add(index_dir, tmp_path / "new.txt", model=model, ids_from=1, **ENCODE)
    assert (summary["added"], summary["ids_min"], summary["ids_max"]) == (4, 508, 511)
    _, ids, _, _ = store_rows(tmp_path / "db.h5")
    assert ids.tolist() == [*range(100, 108), *range(508, 512)]
    with CodeStore.open(tmp_path / "db.h5") as s:
        assert s.paths()[-1].endswith("11.png")
    assert_consistent(index_dir, tmp_path / "db.h5")
    # keep_ids with a code store: its own ids, refused when taken
    with CodeStore.create(tmp_path / "more.h5", 16, encoder_fingerprint=ghindex.io.file_fingerprint(model),
                          with_paths=True) as s:
        s.append(np.zeros((2, 2), np.uint8), [900, 509], paths=["a.png", "b.png"])
        s.mark_complete()
    with pytest.raises(DataError, match="id 509"):
        add(index_dir, codes=tmp_path / "more.h5", keep_ids=True)


def test_add_refuses_what_does_not_fit(setup, tmp_path):
    index_dir, _ = fresh(setup, tmp_path)
    other = tmp_path / "other.ghm"
    torch.manual_seed(1)
    ghindex.Encoder("identity", 32, feature_dim=FEATURES).save(other)
    with pytest.raises(ModelFileError, match="not the model"):
        add(index_dir, setup / "new.npz", model=other, **ENCODE)
    with pytest.raises(ConfigError, match="either"):
        add(index_dir)
    with pytest.raises(ConfigError, match="both"):
        add(index_dir, setup / "new.npz")
    with pytest.raises(ConfigError, match="keep_ids"):
        add(index_dir, setup / "new.npz", model=setup / "model.ghm", keep_ids=True)
    with CodeStore.create(tmp_path / "w.h5", 64, encoder_fingerprint="cd" * 32) as s:
        s.append(np.zeros((3, 8), np.uint8), [0, 1, 2])
        s.mark_complete()
    with pytest.raises(StoreError, match="64 bits"):
        add(index_dir, codes=tmp_path / "w.h5")
    with pytest.raises(IndexFileError, match="does not exist"):
        add(tmp_path / "missing", codes=tmp_path / "w.h5")
    # a store changed behind the index's back
    with CodeStore.open(tmp_path / "db.h5", mode="a") as s:
        s.set_attrs(note="edited")
    with pytest.raises(StoreError, match="has changed since"):
        add(index_dir, codes=setup / "new.h5")


def test_one_add_or_remove_at_a_time(setup, tmp_path):
    index_dir, _ = fresh(setup, tmp_path)
    # lockf locks belong to a process: hold the index's lock from another one
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR"
                               " | os.O_CREAT); fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); "
                               "time.sleep(60)", str(tmp_path / ".index.lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(IndexFileError, match="another"):
            remove(index_dir, ids=[1])
    finally:
        holder.kill()
        holder.wait()
    assert remove(index_dir, ids=[1])["removed"] == 1


# ------------------------------------------------------------------------------------------- remove
@pytest.mark.parametrize("key", ["BFlat", "BIVF16", "BHNSW8", "BHash12"])
def test_remove_ids_everywhere(setup, tmp_path, key):
    index_dir, store = fresh(setup, tmp_path, key)
    (tmp_path / "ids.txt").write_text("# to go\n5\n6, 7\n\n1999 5\n")
    summary = remove(index_dir, ids=["3,4", 5], ids_file=tmp_path / "ids.txt")
    gone = [3, 4, 5, 6, 7, 1999]
    assert summary["status"] == "complete" and summary["removed"] == 6 and summary["ntotal"] == 1994
    assert summary["rebuilt"] == (key in ("BHNSW8", "BHash12"))
    _, ids, _, deleted = store_rows(store)
    assert ids[deleted].tolist() == gone
    assert_consistent(index_dir, store)
    assert info(str(store))["deleted"] == 6 and info(str(index_dir))["lifecycle"]["removed"] == 6
    again = remove(index_dir, ids=[3, 4])
    assert again["status"] == "already complete" and again["already_deleted"] == 2
    with pytest.raises(ConfigError, match="not in the code store.*123456"):
        remove(index_dir, ids=[3, 123456])
    with pytest.raises(ConfigError, match="no ids"):
        remove(index_dir)
    # ids are never reused: the next add starts after the largest id, deleted ones included
    assert add(index_dir, codes=setup / "new.h5")["ids_min"] == 2000


def test_build_and_eval_leave_deleted_rows_out(setup, tmp_path):
    index_dir, store = fresh(setup, tmp_path, "BFlat")
    remove(index_dir, ids=range(0, 2000, 3))
    live = np.ones(2000, bool)
    live[::3] = False
    meta = build(store, tmp_path / "rebuilt", gpu="off")
    assert meta["ntotal"] == live.sum()
    assert_consistent(tmp_path / "rebuilt", store)
    # eval against the index == eval against a store that never had the deleted rows
    codes, ids, labels, _ = store_rows(store)
    with CodeStore.create(tmp_path / "live.h5", 32, label_shape=(), encoder_fingerprint="x") as s:
        s.append(codes[live], ids[live], labels[live])
        s.mark_complete()
    got = evaluate(setup / "new.h5", index=index_dir, topk=100)
    want = evaluate(setup / "new.h5", database=tmp_path / "live.h5", topk=100)
    assert got["metrics"]["map"] == want["metrics"]["map"] and got["database"]["deleted"] == 667
    (tmp_path / "ivf").mkdir()
    ivf, _ = fresh(setup, tmp_path / "ivf", "BIVF16")
    remove(ivf, ids=range(0, 2000, 3))
    result = evaluate(setup / "new.h5", index=ivf, topk=100)
    assert result["metrics"]["database"] == live.sum()


# -------------------------------------------------------------------------------------------- crashes
def run_killed(args, point, tmp_path):
    env = dict(os.environ, **{KILL_ENV: point})
    proc = subprocess.run([*CLI, "-q", *map(os.fspath, args)], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr.decode()[-2000:])


def index_state(index_dir):
    """ntotal of the index under the name (which must load)."""
    index = Index.load(index_dir, gpu="off")
    return index.ntotal


@pytest.fixture(scope="module")
def add_reference(setup, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    index_dir, store = fresh(setup, tmp)
    add(index_dir, setup / "new.npz", model=setup / "model.ghm", **ENCODE)
    return store_rows(store), Index.load(index_dir, gpu="off")


@pytest.mark.parametrize("point", ["add:encoded", "add:store-pending", "add:index-written", "add:store-replaced"])
def test_add_killed_at_each_step_then_rerun_completes(setup, tmp_path, add_reference, runner, point):
    index_dir, store = fresh(setup, tmp_path)
    args = ["add", "--index", index_dir, "--model", setup / "model.ghm", setup / "new.npz", "--device", "cpu",
            "--workers", "0", "--no-progress"]
    run_killed(args, point, tmp_path)
    assert index_state(index_dir) in (2000, 2300)  # the old or the new index, never none
    result = runner.invoke(cli, ["-q", *map(os.fspath, args), "--format", "json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)["status"]
    assert status == ("already complete" if point in ("add:index-written", "add:store-replaced") else "complete")
    (codes, ids, labels, deleted), reference = add_reference
    got = store_rows(store)
    for a, b in zip(got, (codes, ids, labels, deleted)):
        np.testing.assert_array_equal(a, b)
    assert_consistent(index_dir, store)
    index = Index.load(index_dir, gpu="off")
    np.testing.assert_array_equal(index.search(codes[-50:], 5)[0], reference.search(codes[-50:], 5)[0])
    leftovers = {p.name for p in tmp_path.iterdir()} - {"db.h5", "index", ".index.lock"}
    assert not leftovers, leftovers


def test_add_killed_while_encoding_resumes(setup, tmp_path, add_reference, runner):
    index_dir, store = fresh(setup, tmp_path)
    args = ["add", "--index", index_dir, "--model", setup / "model.ghm", setup / "new.npz", "--device", "cpu",
            "--workers", "0", "--no-progress", "--batch-size", "1", "--checkpoint-rows", "1"]
    journal = f"{side_store_path(index_dir)}.partial.journal"
    proc = subprocess.Popen([*CLI, "-q", *map(os.fspath, args)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not (
            os.path.exists(journal) and os.path.getsize(journal) > 2000):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == -signal.SIGKILL:
        assert index_state(index_dir) == 2000 and os.path.exists(journal)
    result = runner.invoke(cli, ["-q", *map(os.fspath, args), "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    np.testing.assert_array_equal(store_rows(store)[0], add_reference[0][0])
    assert_consistent(index_dir, store)
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("the add finished before it could be killed")
    assert summary["status"] == "complete" and 0 < summary["encode"]["resumed_from"] < 300


def test_add_of_other_data_while_one_is_pending_is_refused(setup, tmp_path):
    index_dir, _ = fresh(setup, tmp_path)
    args = ["add", "--index", index_dir, "--model", setup / "model.ghm", setup / "new.npz", "--device", "cpu",
            "--workers", "0", "--no-progress"]
    run_killed(args, "add:encoded", tmp_path)
    with pytest.raises(StoreError, match="interrupted add of other data"):
        add(index_dir, setup / "far.npz", model=setup / "model.ghm", **ENCODE)
    summary = add(index_dir, setup / "far.npz", model=setup / "model.ghm", discard_pending=True, **ENCODE)
    assert summary["added"] == 300 and summary["status"] == "complete"


@pytest.mark.parametrize("point", ["remove:store-pending", "remove:index-written", "remove:store-replaced"])
def test_remove_killed_at_each_step_then_rerun_completes(setup, tmp_path, runner, point):
    index_dir, store = fresh(setup, tmp_path)
    args = ["remove", "--index", index_dir, "--ids", "10,11,12"]
    run_killed(args, point, tmp_path)
    assert index_state(index_dir) in (2000, 1997)
    result = runner.invoke(cli, ["-q", *map(os.fspath, args), "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == ("complete" if point == "remove:store-pending" else "already complete")
    _, ids, _, deleted = store_rows(store)
    assert ids[deleted].tolist() == [10, 11, 12] and index_state(index_dir) == 1997
    assert_consistent(index_dir, store)


def test_kill_between_the_two_renames_of_the_index_directory(setup, tmp_path, runner):
    """Index.save swaps directories by two renames; a kill between them leaves only the temporaries."""
    index_dir, store = fresh(setup, tmp_path)
    old = tmp_path / "old-copy"
    shutil.copytree(index_dir, old)
    run_killed(["remove", "--index", index_dir, "--ids", "10"], "remove:index-written", tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()
    os.replace(index_dir, tmp_path / f".index.{gone.pid}.tmp")  # the new index, not yet renamed
    os.replace(old, tmp_path / f".index.{gone.pid}.old")  # the old one, moved aside
    result = runner.invoke(cli, ["-q", "remove", "--index", str(index_dir), "--ids", "10", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "already complete" and index_state(index_dir) == 1999
    assert_consistent(index_dir, store)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_add_remove_info_and_errors(setup, tmp_path, runner):
    index_dir, store = fresh(setup, tmp_path)
    result = runner.invoke(cli, ["add", "--index", str(index_dir), "--codes", str(setup / "new.h5")])
    assert result.exit_code == 0, result.output
    assert "2,300" in result.stdout and "2000..2299" in result.stdout and "not needed" in result.stdout
    result = runner.invoke(cli, ["remove", "--index", str(index_dir), "--ids", "1,2", "--ids", "3"])
    assert result.exit_code == 0, result.output
    assert "3 of 3 ids" in result.stdout and "2,297" in result.stdout
    result = runner.invoke(cli, ["info", str(store)])
    assert result.exit_code == 0 and "deleted" in result.stdout
    result = runner.invoke(cli, ["info", str(index_dir), "--format", "json"])
    life = json.loads(result.stdout)["lifecycle"]
    assert (life["added"], life["removed"], life["operations"]) == (300, 3, 2)

    def fails(args, message):
        result = runner.invoke(cli, args)
        assert result.exit_code == 1, result.output
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: ") and message in last, result.stderr
        assert "Traceback" not in result.output

    fails(["add", "--index", str(index_dir)], "either new images")
    fails(["add", "--index", str(index_dir), str(setup / "new.npz")], "needs both")
    fails(["remove", "--index", str(index_dir)], "no ids")
    fails(["remove", "--index", str(index_dir), "--ids", "x"], "must be integers")
    fails(["remove", "--index", str(index_dir), "--ids", "77777"], "not in the code store")
    fails(["remove", "--index", str(tmp_path / "nope"), "--ids", "1"], "does not exist")


def test_index_remove_in_memory(setup, tmp_path):
    index_dir, _ = fresh(setup, tmp_path, "BFlat")
    index = Index.load(index_dir, gpu="off")
    codes, ids, _, _ = store_rows(setup / "db.h5")
    assert index.remove([5, 6, 5, 10**9]) == 2 and index.ntotal == 1998 and index.meta["ntotal"] == 1998
    assert index.remove([]) == 0
    _, found = index.search(codes[:10], 3)
    assert not np.isin(found, [5, 6]).any()
    with pytest.raises(IndexFileError, match="read-only"):
        Index.load(index_dir, mmap=True, gpu="off").remove([1])
    hnsw = ghindex.index.build_from_arrays(codes, index_key="BHNSW8")
    with pytest.raises(ConfigError, match="cannot remove"):
        hnsw.remove([1])
