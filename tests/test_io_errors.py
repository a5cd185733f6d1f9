"""Outputs that cannot be written (issue 15): a full disk, a read-only file system, no permission or an I/O
error gives one line `Error: PATH: reason; what was kept; how to go on`, exit status 1, no traceback and
no stray temporary files, in every command that writes; `--resume` after freeing space finishes with the
codes of a clean run. Every output file gets the umask's mode. CLI messages name options, not parameters.

Real failures come from a small tmpfs (filled up, or remounted read-only) where this process may mount
one (root); those cases run the CLI in a subprocess, since HDF5 cannot close a file it failed to write
and the process must end the way a user's does. Injected OSErrors cover every write site everywhere.
"""
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ghindex.encode import encode
from ghindex.encoder import Encoder
from ghindex.errors import IndexFileError, OutputError
from ghindex.index import build
from ghindex.io import output_reason
from ghindex.store import CodeStore
from ghindex.train import train
from ghindex_cli.main import cli, cli_message

CPU = ["--device", "cpu", "--no-progress"]


# -- helpers ---------------------------------------------------------------------------------------
def leftovers(folder: Path, keep=()) -> set[str]:
    """Names in `folder` other than `keep`: temporary files or folders a failed command left."""
    return {p.name for p in folder.iterdir()} - set(keep)


def check_error(exit_code: int, stderr: str, *needles) -> str:
    """The failure contract: status 1, stderr is exactly one `Error: ...` line, no traceback."""
    assert exit_code == 1, (exit_code, stderr)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def fails(runner, args, *needles) -> str:
    result = runner.invoke(cli, ["-q", *map(os.fspath, args)])
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    return check_error(result.exit_code, result.stderr, *needles)


def works(runner, args):
    result = runner.invoke(cli, ["-q", *map(os.fspath, args)])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


def ghindex(*args, check=False):
    """The CLI in its own process (`python -m ghindex_cli -q ...`)."""
    result = subprocess.run([sys.executable, "-m", "ghindex_cli", "-q", *map(os.fspath, args)],
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def failing_after(n: int, exc: BaseException, real):
    """A stand-in for `real` that works n times, then raises `exc`."""
    calls = {"n": 0}

    def stand_in(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            raise exc
        return real(*args, **kwargs)

    return stand_in


def no_space(path=None):
    return OSError(errno.ENOSPC, "No space left on device", None if path is None else os.fspath(path))


def codes_of(path):
    with CodeStore.open(path) as s:
        return s.codes(), s.ids(), s.labels()


def same_codes(a, b) -> None:
    for got, want in zip(codes_of(a), codes_of(b)):
        np.testing.assert_array_equal(got, want)


def resume_gives_the_clean_codes(runner, inputs, out) -> None:
    works(runner, ["encode", "--model", inputs / "m.ghm", inputs / "big.npz", "--out", out, "--resume", *CPU])
    same_codes(out, inputs / "clean.h5")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Features (20,000 x 8 and 192 x 256, labelled), identity models, tiny image folders, stores, an index."""
    d = tmp_path_factory.mktemp("ioerr")
    rng = np.random.default_rng(0)
    np.savez(d / "big.npz", features=rng.normal(size=(20000, 8)).astype(np.float32),
             labels=rng.integers(0, 10, 20000))
    np.savez(d / "wide.npz", features=rng.normal(size=(192, 256)).astype(np.float32),
             labels=rng.integers(0, 4, 192))
    torch.manual_seed(0)
    Encoder("identity", 64, feature_dim=8).save(d / "m.ghm")
    Encoder("smallcnn", 16, image_size=16).save(d / "cnn.ghm")
    for split, n in (("database", 3), ("query", 1)):
        for c in ("a", "b"):
            (d / "demo" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(d / "demo" / split / c / f"{i}.png")
    quiet = dict(device="cpu", progress=False)
    encode(d / "m.ghm", d / "big.npz", d / "clean.h5", **quiet)
    encode(d / "cnn.ghm", d / "demo" / "database", d / "db.h5", **quiet)
    encode(d / "cnn.ghm", d / "demo" / "query", d / "q.h5", **quiet)
    build(d / "db.h5", d / "index", gpu="off")
    return d


TRAIN_ARGS = ["--bits", "64", "--epochs", "3", "--lr", "0.01", "--batch-size", "32", *CPU]


# -- a real full disk and a real read-only file system (root: a small tmpfs) --------------------------
@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path, leave: int) -> Path:
    """Write a filler file so that about `leave` bytes stay free on `mnt`."""
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_encode_on_a_full_disk_then_resume_gives_the_clean_codes(inputs, small_fs):
    filler = fill(small_fs, 600_000)  # the store needs about 640 kB, its journal 160 kB more
    out = small_fs / "db.h5"
    result = ghindex("encode", "--model", inputs / "m.ghm", inputs / "big.npz", "--out", out,
                     "--checkpoint-rows", "1000", *CPU)
    line = check_error(result.returncode, result.stderr, f"Error: {out}.partial", "no space left on device",
                       "of 20,000 are kept; free space and rerun with --resume")
    assert "inputs up to " in line and "inputs up to 0 " not in line
    assert leftovers(small_fs, {"filler"}) == {"db.h5.partial.journal"}  # only what --resume needs
    filler.unlink()
    ghindex("encode", "--model", inputs / "m.ghm", inputs / "big.npz", "--out", out, "--resume", *CPU, check=True)
    same_codes(out, inputs / "clean.h5")
    assert leftovers(small_fs) == {"db.h5"}


def test_encode_when_hdf5_itself_hits_the_full_disk(inputs, small_fs):
    """Without the store's own check for room (a quota, a race), HDF5's write fails and HDF5 cannot close
    the file any more: still one line and status 1 (no h5py echoes, no crash when the process ends)."""
    fill(small_fs, 600_000)
    script = ("import sys; from ghindex.store import CodeStore; "
              "CodeStore._ensure_space = lambda self, rows=None: None; "
              "from ghindex_cli.main import cli; cli.main(sys.argv[1:], prog_name='ghindex')")
    result = subprocess.run([sys.executable, "-c", script, "-q", "encode", "--model", inputs / "m.ghm",
                             inputs / "big.npz", "--out", small_fs / "db.h5", "--checkpoint-rows", "1000", *CPU],
                            capture_output=True, text=True, timeout=600)
    check_error(result.returncode, result.stderr, "no space left on device", "are kept; free space and rerun")
    assert leftovers(small_fs, {"filler"}) == {"db.h5.partial.journal"}


def test_build_on_a_full_disk_leaves_nothing(inputs, small_fs):
    fill(small_fs, 100_000)  # the index of 20,000 codes needs about 320 kB
    result = ghindex("build", "--codes", inputs / "clean.h5", "--out", small_fs / "index")
    check_error(result.returncode, result.stderr, f"Error: {small_fs / 'index'}: no space left on device",
                "nothing was written; free space and rerun")
    assert leftovers(small_fs, {"filler"}) == set()


def test_train_on_a_full_disk_keeps_the_last_checkpoint_and_resumes(inputs, small_fs):
    filler = fill(small_fs, 220_000)  # a checkpoint is about 145 kB; replacing it needs twice that
    model = small_fs / "m.ghm"
    result = ghindex("train", inputs / "wide.npz", "--out", model, *TRAIN_ARGS)
    check_error(result.returncode, result.stderr, "no space left on device",
                "the checkpoint of epoch ", "is kept; free space and rerun with --resume")
    assert not [name for name in leftovers(small_fs, {"filler"}) if name.endswith(".tmp")]
    filler.unlink()
    ghindex("train", inputs / "wide.npz", "--out", model, "--resume", *TRAIN_ARGS, check=True)
    assert Encoder.read_config(model).bits == 64
    assert leftovers(small_fs) == {"m.ghm", "m.ghm.ckpt", "m.ghm.log.jsonl"}


def test_read_only_file_system_in_every_writing_command(inputs, small_fs):
    if subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True).returncode != 0:
        pytest.skip("cannot remount the tmpfs read-only")
    ro = "read-only file system"
    cases = [
        (["encode", "--model", inputs / "m.ghm", inputs / "big.npz", "--out", small_fs / "db.h5", *CPU],
         f"Error: {small_fs / 'db.h5.partial.journal'}: {ro}; nothing was written; make {small_fs} writable and rerun"),
        (["build", "--codes", inputs / "clean.h5", "--out", small_fs / "index"], f"Error: {small_fs / 'index'}: {ro}"),
        (["train", inputs / "wide.npz", "--out", small_fs / "m.ghm", *TRAIN_ARGS],
         f"{ro}; no checkpoint is kept; make {small_fs} writable and rerun"),
        (["eval", "--queries", inputs / "q.h5", "--index", inputs / "index", "--report", small_fs / "r.json"],
         f"Error: {small_fs / 'r.json'}: {ro}"),
        (["eval", "--queries", inputs / "q.h5", "--index", inputs / "index", "--plot", small_fs / "ev"],
         f"Error: {small_fs / 'ev-pr.png'}: {ro}"),
        (["query", "--index", inputs / "index", "--ids", "0", "--grid", small_fs / "g.png"],
         f"Error: {small_fs / 'g.png'}: {ro}"),
    ]
    for args, needle in cases:
        result = ghindex(*args)
        check_error(result.returncode, result.stderr, needle)
    assert leftovers(small_fs) == set()


# -- injected errors at each write site (any machine) -------------------------------------------------
def test_encode_journal_io_error_then_resume(inputs, tmp_path, runner, monkeypatch):
    out = tmp_path / "db.h5"
    monkeypatch.setattr(os, "fsync", failing_after(4, OSError(errno.EIO, "Input/output error"), os.fsync))
    line = fails(runner, ["encode", "--model", inputs / "m.ghm", inputs / "big.npz", "--out", out,
                          "--checkpoint-rows", "1000", *CPU],
                 f"Error: {out}.partial.journal: I/O error; inputs up to 2,048 "
                 "of 20,000 are kept; check the disk and rerun with --resume")
    assert "Traceback" not in line
    assert leftovers(tmp_path) == {"db.h5.partial.journal"}
    monkeypatch.undo()
    resume_gives_the_clean_codes(runner, inputs, out)


def test_encode_store_without_space_is_refused_before_hdf5_writes(inputs, tmp_path, runner, monkeypatch):
    """The store checks for room before each flush (HDF5 cannot recover from a failed one)."""
    out = tmp_path / "db.h5"
    real = os.statvfs

    def full_after_five(path, calls=[]):
        calls.append(path)
        st = real(path)
        return st if len(calls) <= 5 else os.statvfs_result(tuple(st)[:3] + (0, 0) + tuple(st)[5:10])

    monkeypatch.setattr(os, "statvfs", full_after_five)
    fails(runner, ["encode", "--model", inputs / "m.ghm", inputs / "big.npz", "--out", out,
                   "--checkpoint-rows", "2000", *CPU],
          f"Error: {out}.partial: no space left on device; inputs up to 6,144 of 20,000 are kept")
    assert leftovers(tmp_path) == {"db.h5.partial.journal"}
    monkeypatch.undo()
    resume_gives_the_clean_codes(runner, inputs, out)


def test_encode_into_a_folder_it_cannot_write(inputs, tmp_path, runner, monkeypatch):
    real_open = os.open

    def deny(path, *args, **kwargs):
        if os.fspath(path).startswith(os.fspath(tmp_path)):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    fails(runner, ["encode", "--model", inputs / "m.ghm", inputs / "big.npz", "--out", tmp_path / "db.h5", *CPU],
          f"Error: {tmp_path / 'db.h5.partial.journal'}: permission denied; nothing was written; "
          f"make {tmp_path} writable and rerun")
    assert leftovers(tmp_path) == set()


def test_build_index_write_fails(inputs, tmp_path, runner, monkeypatch):
    import faiss

    def quota(index, name):
        raise RuntimeError(f"Error in void faiss::write_index_binary: write error in {name}: 0 != 80 "
                           "(Disk quota exceeded)")

    monkeypatch.setattr(faiss, "write_index_binary", quota)
    fails(runner, ["build", "--codes", inputs / "db.h5", "--out", tmp_path / "index"],
          f"Error: {tmp_path / 'index'}: no space left on device; nothing was written; free space and rerun")
    assert leftovers(tmp_path) == set()


def test_train_checkpoint_and_model_write_failures(inputs, tmp_path, runner, monkeypatch):
    model = tmp_path / "m.ghm"
    monkeypatch.setattr(torch, "save", failing_after(1, OSError(errno.EDQUOT, "Disk quota exceeded"), torch.save))
    fails(runner, ["train", inputs / "wide.npz", "--out", model, *TRAIN_ARGS],
          f"Error: {model}.ckpt: no space left on device; the checkpoint of epoch 1 is kept; "
          "free space and rerun with --resume")
    assert leftovers(tmp_path) == {"m.ghm.ckpt", "m.ghm.log.jsonl"}
    monkeypatch.undo()

    import safetensors.torch

    def denied(*args, **kwargs):
        raise Exception("Error while serializing: I/O error: Permission denied (os error 13)")

    monkeypatch.setattr(safetensors.torch, "save_file", denied)
    fails(runner, ["train", inputs / "wide.npz", "--out", model, "--resume", *TRAIN_ARGS],
          f"Error: {model}: permission denied; the checkpoint of epoch 3 is kept; make {tmp_path} writable "
          "and rerun with --resume")
    assert leftovers(tmp_path) == {"m.ghm.ckpt", "m.ghm.log.jsonl"}
    monkeypatch.undo()
    works(runner, ["train", inputs / "wide.npz", "--out", model, "--resume", *TRAIN_ARGS])
    assert leftovers(tmp_path) == {"m.ghm", "m.ghm.ckpt", "m.ghm.log.jsonl"}


def test_eval_report_and_plot_write_failures(inputs, tmp_path, runner, monkeypatch):
    base = ["eval", "--queries", inputs / "q.h5", "--index", inputs / "index"]
    real_write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.parent == tmp_path:
            raise no_space(self)
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    fails(runner, [*base, "--report", tmp_path / "r.json"],
          f"Error: {tmp_path / 'r.json'}: no space left on device; nothing was written; free space and rerun")
    monkeypatch.undo()
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: (_ for _ in ()).throw(
        OSError(errno.EPERM, "Operation not permitted", os.fspath(path))))
    fails(runner, [*base, "--plot", tmp_path / "ev"], f"Error: {tmp_path / 'ev-pr.png'}: permission denied")
    assert leftovers(tmp_path) == set()


def test_query_grid_write_failure(inputs, tmp_path, runner, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **kw: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system", os.fspath(fp))))
    fails(runner, ["query", "--index", inputs / "index", "--ids", "0", "--grid", tmp_path / "g.png"],
          f"Error: {tmp_path / 'g.png'}: read-only file system; nothing was written; make {tmp_path} writable and rerun")
    assert leftovers(tmp_path) == set()


def test_demo_write_failure_says_to_run_it_again(inputs, tmp_path, runner, monkeypatch):
    monkeypatch.setattr(torch, "save", failing_after(0, no_space(), torch.save))
    fails(runner, ["demo", "--data", inputs / "demo", "--out", tmp_path / "demo", "--epochs", "1", "--image-size", "16",
                   "--workers", "0", "--no-progress"],
          f"Error: {tmp_path / 'demo' / 'model.ghm.ckpt'}: no space left on device; "
          "free space and run the demo again (it starts over)")
    assert leftovers(tmp_path / "demo") == set()


def test_any_other_output_oserror_is_one_line(inputs, runner, monkeypatch):
    import ghindex.evaluate

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/where/report.json")

    monkeypatch.setattr(ghindex.evaluate, "evaluate", denied)
    fails(runner, ["eval", "--queries", inputs / "q.h5", "--index", inputs / "index"],
          "Error: /some/where/report.json: permission denied")


@pytest.mark.parametrize("exc, reason", [
    (OSError(errno.ENOSPC, "x"), "no space left on device"),
    (OSError(errno.EDQUOT, "x"), "no space left on device"),
    (OSError(errno.EROFS, "x"), "read-only file system"),
    (PermissionError(errno.EACCES, "x"), "permission denied"),
    (OSError(errno.EPERM, "x"), "permission denied"),
    (OSError(errno.EIO, "x"), "I/O error"),
    (RuntimeError("Unable to synchronously flush file (file write failed: time = ..., filename = 'a.h5', file "
                  "descriptor = 3, errno = 28, error message = 'No space left on device', buf = 0x1)"),
     "no space left on device"),
    (RuntimeError("Can't destroy cache (slist already enabled?)"), None),
    (OSError("Unable to create file (unable to open file: name = 'x.h5', errno = 30, error message = "
             "'Read-only file system', flags = 13, o_flags = 242)"), "read-only file system"),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "no space left on device"),
    (OSError(errno.ENOENT, "No such file or directory"), None),
    (ValueError("bits must be a multiple of 8"), None),
])
def test_output_reason(exc, reason):
    assert output_reason(exc) == reason


def test_output_reason_follows_the_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    except RuntimeError as exc:
        assert output_reason(exc) == "no space left on device"


# -- file modes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_output_file_honours_the_umask(tmp_path, runner, umask):
    rng = np.random.default_rng(1)
    data = tmp_path / "cifar"
    for part in ("train", "test"):
        for c in ("a", "b"):
            (data / part / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(data / part / c / f"{i}.png")
    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        works(runner, ["train", data, "--protocol", "cifar10-II", "--backbone", "smallcnn", "--image-size", "16",
                       "--bits", "16", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--out", out / "m.ghm", *CPU])
        works(runner, ["encode", "--model", out / "m.ghm", data, "--protocol", "cifar10-II", "--split", "database",
                       "--out", out / "db.h5", "--workers", "0", *CPU])
        works(runner, ["encode", "--model", out / "m.ghm", data, "--protocol", "cifar10-II", "--split", "query",
                       "--out", out / "q.h5", "--workers", "0", *CPU])
        works(runner, ["build", "--codes", out / "db.h5", "--out", out / "index"])
        works(runner, ["eval", "--queries", out / "q.h5", "--index", out / "index", "--report", out / "report.json",
                       "--plot", out / "eval"])
        works(runner, ["query", "--index", out / "index", "--ids", "0,1", "--grid", out / "grid.png"])
    finally:
        os.umask(old)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    names = {p.relative_to(out).as_posix() for p in files}
    assert {"m.ghm", "m.ghm.ckpt", "m.ghm.log.jsonl", "m.ghm.splits.npz", "db.h5", "q.h5", "index/index.faiss",
            "index/meta.json", "report.json", "eval-pr.png", "eval-pn.png", "grid.png"} <= names, names
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, (p, oct(p.stat().st_mode))
    for p in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o777 & ~umask, (p, oct(p.stat().st_mode))


# -- messages name what the caller used ------------------------------------------------------------
def test_messages_name_the_option_on_the_cli_and_the_parameter_in_python(inputs, tmp_path, runner):
    build(inputs / "db.h5", tmp_path / "index", gpu="off")
    with pytest.raises(IndexFileError, match=r"use overwrite=True to replace it"):
        build(inputs / "db.h5", tmp_path / "index", gpu="off")
    line = fails(runner, ["build", "--codes", inputs / "db.h5", "--out", tmp_path / "index"],
                 "already exists; use --overwrite to replace it")
    assert "overwrite=True" not in line
    train(inputs / "wide.npz", bits=16, out=tmp_path / "m.ghm", epochs=1, device="cpu", progress=False)
    with pytest.raises(Exception, match=r"resume=True continues that training, overwrite=True starts over"):
        train(inputs / "wide.npz", bits=16, out=tmp_path / "m.ghm", epochs=1, device="cpu", progress=False)
    line = fails(runner, ["train", inputs / "wide.npz", "--bits", "16", "--out", tmp_path / "m.ghm", *CPU],
                 "--resume continues that training, --overwrite starts over")
    assert "=True" not in line


def test_cli_message_rewrites_only_the_commands_own_options():
    from ghindex_cli.build import build as build_command

    assert cli_message("use overwrite=True (--overwrite) to replace it", build_command) == "use --overwrite to replace it"
    assert cli_message("open it with allow_incomplete=True", build_command) == "open it with allow_incomplete=True"
    assert cli_message("overwrite=Trueish", build_command) == "overwrite=Trueish"
    assert str(OutputError("a/b.h5", "no space left on device", "rerun with resume=True")) == \
        "a/b.h5: no space left on device; rerun with resume=True"
