"""Scale-out under torchrun on the CPU: 2 processes, gloo, small data.

DDP training gives the single-process model (same global batch, same steps), continues with --resume;
sharded encoding gives exactly the single-process store; a rank killed mid-way loses at most its
unflushed chunk and `--resume` under torchrun completes with every input exactly once.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import ghindex
from ghindex import distributed
from ghindex.encode import encode
from ghindex.store import CodeStore
from ghindex.train import train

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_args(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", "-m", "ghindex_cli", *map(str, args)]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def torchrun(*args, timeout=180):
    result = subprocess.run(torchrun_args(*args), capture_output=True, text=True, timeout=timeout, env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def make_images(folder, per_class=10, seed=0, bad=True):
    rng = np.random.default_rng(seed)
    for c, (lo, hi) in enumerate(((0, 120), (130, 255))):
        os.makedirs(folder / f"c{c}", exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(lo, hi, (12, 10, 3), dtype=np.uint8)).save(folder / f"c{c}" / f"{i:02d}.png")
    if bad:
        (folder / "c0" / "05.png").write_bytes(b"not an image")  # skipped, recorded in the store
    return folder


def store_contents(path):
    with CodeStore.open(path) as s:
        return s.codes(), s.ids(), s.labels(), s.paths(), s.skipped(), s.attrs["source"]


def test_helpers_without_torchrun(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_distributed()) == (0, 1, False)
    assert distributed.setup(torch.device("cpu")) is False
    t = torch.arange(6).view(3, 2)
    assert distributed.all_gather_rows(t) is t and distributed.all_gather_objects(5) == [5]
    with distributed.rank0_first() as main:
        assert main
    # contiguous ranges covering every item once, sizes differing by at most one
    for n, k in ((10, 3), (2, 4), (0, 2), (7, 7)):
        ranges = [distributed.shard_range(n, i, k) for i in range(k)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_ddp_training_matches_one_process_and_resumes(tmp_path):
    """Frozen smallcnn backbone on images: each rank caches its half of the features (all-gathered),
    DDP trains the hash layer and classifier; 2 x 5 per step = the single process's batch of 10."""
    folder = make_images(tmp_path / "imgs", bad=False)  # 20 images: 2 steps of 10 per epoch
    common = dict(bits=16, backbone="smallcnn", image_size=16, freeze_backbone=True, lr=0.05, lr_step=1,
                  batch_size=10, workers=0, device="cpu", progress=False)
    args = [folder, "--bits", 16, "--backbone", "smallcnn", "--image-size", 16, "--freeze-backbone", "--lr", 0.05,
            "--lr-step", 1, "--batch-size", 10, "--workers", 0, "--device", "cpu", "--no-progress"]
    out = tmp_path / "ddp.ghm"

    result = torchrun("train", *args, "--epochs", 2, "--out", out)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epochs"] == 2  # rank 0 alone reports
    model = ghindex.Encoder.load(out)
    assert model.config.extra["training"]["processes"] == 2
    log = [json.loads(line) for line in open(f"{out}.log.jsonl")]
    assert [r["items"] for r in log] == [20, 20]  # both ranks' items

    single = train(folder, epochs=2, **common)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-5, rtol=1e-4)

    torchrun("train", *args, "--epochs", 3, "--out", out, "--resume")
    resumed = ghindex.Encoder.load(out)
    assert len(open(f"{out}.log.jsonl").readlines()) == 3
    single = train(folder, epochs=3, **common)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-5, rtol=1e-4)
    ghindex_codes = resumed.encode(sorted(str(p) for p in folder.rglob("1*.png")))
    np.testing.assert_array_equal(ghindex_codes, single.encode(sorted(str(p) for p in folder.rglob("1*.png"))))


def test_sharded_encode_equals_one_process(tmp_path):
    folder = make_images(tmp_path / "imgs", per_class=9)  # 18 inputs, one bad: parts of 9 and 9
    torch.manual_seed(0)
    model = tmp_path / "m.ghm"
    ghindex.Encoder("smallcnn", 24, image_size=16).save(model)
    encode(model, folder, tmp_path / "one.h5", device="cpu", workers=0, progress=False)

    out = tmp_path / "two.h5"
    result = torchrun("encode", "--model", model, folder, "--out", out, "--device", "cpu", "--workers", 0,
                      "--no-progress", "--format", "json")
    summary = json.loads(result.stdout)
    assert (summary["count"], summary["skipped"], summary["inputs"], summary["processes"]) == (17, 1, 18, 2)
    one, two = store_contents(tmp_path / "one.h5"), store_contents(out)
    for a, b in zip(one, two):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b
    assert sorted(os.listdir(tmp_path)) == ["imgs", "m.ghm", "one.h5", "two.h5"]  # parts removed


def _rank_pid(parent: int, rank: int) -> int | None:
    """The worker process of torchrun `parent` with RANK=rank."""
    try:
        children = open(f"/proc/{parent}/task/{parent}/children").read().split()
    except OSError:
        return None
    for pid in map(int, children):
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_killed_rank_then_resume_encodes_every_input_once(tmp_path):
    rng = np.random.default_rng(0)
    n = 3000
    np.savez(tmp_path / "feats.npz", features=rng.normal(size=(n, 8)).astype(np.float32),
             labels=rng.integers(0, 5, n))
    torch.manual_seed(0)
    model = tmp_path / "m.ghm"
    ghindex.Encoder("identity", 16, feature_dim=8).save(model)
    out = tmp_path / "codes.h5"
    # one row per checkpoint: slow enough to be killed mid-way
    args = ["encode", "--model", model, tmp_path / "feats.npz", "--out", out, "--no-progress", "--format", "json"]
    proc = subprocess.Popen(torchrun_args(*args, "--batch-size", 1, "--checkpoint-rows", 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(),
                            start_new_session=True)
    journal = f"{out}.part1-of-2.partial.journal"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (os.path.exists(journal) and os.path.getsize(journal) > 3000):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        # torchrun sees rank 1 die and stops rank 0 (which could otherwise wait for it forever)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode != 0
    assert not out.exists()
    assert os.path.exists(journal)

    result = torchrun(*args, "--resume")
    summary = json.loads(result.stdout)
    assert summary["status"] == "complete" and summary["count"] == n and summary["resumed_from"] > 0
    codes, ids, labels, _, skipped, _ = store_contents(out)
    np.testing.assert_array_equal(ids, np.arange(n))  # every input once, in input order
    encode(model, tmp_path / "feats.npz", tmp_path / "one.h5", device="cpu", progress=False)
    one = store_contents(tmp_path / "one.h5")
    np.testing.assert_array_equal(codes, one[0])
    np.testing.assert_array_equal(labels, one[2])
    assert not [f for f in os.listdir(tmp_path) if ".part" in f]

    # a second --resume finds the finished store
    again = json.loads(torchrun(*args, "--resume").stdout)
    assert again["status"] == "already complete"
