"""Crash safety under SIGKILL (real subprocesses) and run-to-run determinism on the CPU.

- `train` killed after its first checkpoint: `--resume` reaches the same final weights, bit for bit,
  as an uninterrupted run with the same seed.
- `build` killed at random moments: the index directory never exists half-written under its name,
  and the next build succeeds (and removes the killed builds' temporary folders).
- `encode` killed during a run is covered by tests/test_encode.py
  (`test_sigkill_then_resume_equals_uninterrupted_run`: every input exactly once, the store equal to
  an uninterrupted run's; `test_repeated_sigkills_during_resumed_runs` with -m slow).
- The same commands with the same seed give byte-identical codes and the same mAP.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from ghindex.index import Index
from ghindex.store import CodeStore
from ghindex_cli.main import cli

CLI = [sys.executable, "-m", "ghindex_cli"]


def start(args, stderr_path):
    """Start `ghindex ARGS` in a new process; stderr goes to a file we can watch."""
    return subprocess.Popen([*CLI, *map(os.fspath, args)], stdout=subprocess.DEVNULL,
                            stderr=open(stderr_path, "wb"))


def wait_for(condition, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def kill(proc) -> bool:
    """SIGKILL `proc`; True if the signal ended it, False if it had finished by itself just before."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == -signal.SIGKILL:
        return True
    assert proc.returncode == 0, f"exited with {proc.returncode} before the kill"
    return False


def weights(path):
    return load_file(os.fspath(path))


# -- train ---------------------------------------------------------------------------------------------
def test_train_killed_after_a_checkpoint_resumes_to_identical_weights(tmp_path, runner):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32)) * 2
    labels = rng.integers(0, 4, 1000)
    data = tmp_path / "features.npz"
    np.savez(data, features=(centres[labels] + rng.normal(size=(1000, 32))).astype(np.float32), labels=labels)
    args = lambda out: ["-q", "train", data, "--bits", "16", "--epochs", "6", "--lr-step", "4",  # noqa: E731
                        "--batch-size", "32", "--seed", "3", "--device", "cpu", "--no-progress", "--out", out]

    killed = tmp_path / "killed.ghm"
    ckpt = f"{killed}.ckpt"
    proc = start(args(killed), tmp_path / "train.err")
    assert wait_for(lambda: os.path.exists(ckpt), proc), (tmp_path / "train.err").read_text()
    assert proc.poll() is None, "train finished before it could be killed"
    assert kill(proc), "training finished before it could be killed"
    epoch = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= epoch < 6 and not killed.exists()  # no final model from a killed run

    result = runner.invoke(cli, [*map(os.fspath, args(killed)), "--resume"])
    assert result.exit_code == 0, result.output
    reference = tmp_path / "reference.ghm"
    result = runner.invoke(cli, list(map(os.fspath, args(reference))))
    assert result.exit_code == 0, result.output

    a, b = weights(killed), weights(reference)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = lambda path: [json.loads(line) for line in open(f"{path}.log.jsonl")]  # noqa: E731
    assert [r["loss"] for r in log(killed)] == [r["loss"] for r in log(reference)] and len(log(killed)) == 6


# -- build ---------------------------------------------------------------------------------------------
def test_build_killed_at_random_moments_never_leaves_a_half_index(tmp_path):
    rng = np.random.default_rng(1)
    n = 100_000
    centres = rng.integers(0, 256, (64, 8), dtype=np.uint8)
    noise = (rng.random((n, 8)) < 0.1) * rng.integers(0, 256, (n, 8))
    codes = centres[rng.integers(0, 64, n)] ^ noise.astype(np.uint8)
    store = tmp_path / "codes.h5"
    with CodeStore.create(store, 64) as s:
        s.append(codes, np.arange(n) + 7)
        s.mark_complete()
    out = tmp_path / "index"
    args = ["build", "--codes", store, "--out", out, "--index-key", "BIVF256", "--overwrite"]

    def complete():
        index = Index.load(out, gpu="off")
        assert index.ntotal == n and index.index_key == "BIVF256"
        assert index.search(codes[:3], 1)[1][:, 0].tolist() == [7, 8, 9]

    # right after the plan is logged (k-means has just started), then at random later moments
    delays = [0.0, *np.random.default_rng(2).uniform([0.1, 0.5], [1.0, 2.0])]
    killed_mid_build = 0
    for attempt, delay in enumerate(delays):
        err = tmp_path / f"build{attempt}.err"
        proc = start(args, err)
        # the memory estimate is logged just before the index is trained and filled
        assert wait_for(lambda: b"needs about" in err.read_bytes(), proc), err.read_text()
        time.sleep(delay)
        if proc.poll() is None and kill(proc):
            killed_mid_build += not out.exists()
        # whatever the moment: no index under the final name, or a complete one (the kill came after
        # the final rename, or an earlier attempt finished)
        if out.exists():
            complete()
    assert killed_mid_build, "no build was killed before it finished"
    # what a kill while the index files are being written leaves: a temporary folder of a dead process
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / f".index.{gone.pid}.tmp").mkdir()
    (tmp_path / f".index.{gone.pid}.tmp" / "index.faiss").write_bytes(b"half")

    result = subprocess.run([*CLI, "-q", *map(os.fspath, args)], capture_output=True)
    assert result.returncode == 0, result.stderr.decode()
    complete()
    leftovers = [p.name for p in tmp_path.iterdir() if re.fullmatch(r"\.index\.\d+\.(tmp|old)", p.name)]
    assert leftovers == [], "temporary folders of killed builds were not cleaned up"


# -- determinism ---------------------------------------------------------------------------------------
def test_same_commands_same_seed_give_identical_codes_and_map(tmp_path, runner):
    rng = np.random.default_rng(4)
    data = tmp_path / "imgs"
    for c, (lo, hi) in enumerate(((0, 120), (100, 256), (50, 200))):
        (data / f"class{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(lo, hi, (20, 18, 3), dtype=np.uint8)).save(data / f"class{c}" / f"{i}.png")

    def run(name):
        work = tmp_path / name
        for args in (
            ["train", data, "--backbone", "smallcnn", "--image-size", "16", "--bits", "16", "--epochs", "2",
             "--batch-size", "8", "--lr", "0.01", "--seed", "5", "--workers", "0", "--device", "cpu",
             "--no-progress", "--out", work / "model.ghm"],
            ["encode", "--model", work / "model.ghm", data, "--out", work / "codes.h5", "--workers", "0",
             "--device", "cpu", "--no-progress"],
            ["eval", "--queries", work / "codes.h5", "--database", work / "codes.h5", "--format", "json"],
        ):
            result = runner.invoke(cli, ["-q", *map(os.fspath, args)])
            assert result.exit_code == 0, (args, result.output)
        with CodeStore.open(work / "codes.h5") as s:
            return weights(work / "model.ghm"), s.codes(), s.ids(), json.loads(result.stdout)["metrics"]

    (w1, codes1, ids1, m1), (w2, codes2, ids2, m2) = run("first"), run("second")
    for key in w1:
        assert torch.equal(w1[key], w2[key]), key
    assert codes1.tobytes() == codes2.tobytes() and np.array_equal(ids1, ids2) and len(codes1) == 24
    assert m1["map"] == m2["map"] and m1["map_tie_avg"] == m2["map_tie_avg"]
    assert m1["precision_at"] == m2["precision_at"]
    # and the run was not trivially constant: the classes got different codes
    assert len({bytes(c) for c in codes1}) > 1
