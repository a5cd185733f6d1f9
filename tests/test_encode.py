import functools
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import ghindex
from ghindex.encode import Journal
from ghindex.encode import encode as encode_any_device
from ghindex.errors import ConfigError, DataError, ImageError, StoreError
from ghindex.info import info
from ghindex.store import CodeStore
from ghindex_cli.main import cli

BAD = {"corrupt.jpg", "empty.jpg", "text.jpg"}
# Exact comparisons with Encoder.encode (CPU, fp32) need the CPU: device="auto" means mixed precision
# on a CUDA machine. CUDA has its own test below.
encode = functools.partial(encode_any_device, device="cpu")
CPU = ["--device", "cpu"]


def make_images(folder, per_class=12, classes=("cat", "dog"), seed=0, bad=True):
    rng = np.random.default_rng(seed)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, size=(10, 8, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / c / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
    if bad:
        good = (folder / classes[0] / "001.jpg").read_bytes()
        (folder / classes[0] / "corrupt.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
        (folder / classes[0] / "empty.jpg").write_bytes(b"")
        (folder / classes[1] / "text.jpg").write_text("this is not an image\n")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "imgs")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "m.ghm"
    ghindex.Encoder("smallcnn", 32, image_size=32).save(path)
    return path


def store_contents(path):
    with CodeStore.open(path) as s:
        return s.codes(), s.ids(), s.labels(), s.paths(), s.skipped()


def assert_same_store(a, b):
    ca, cb = store_contents(a), store_contents(b)
    for x, y in zip(ca, cb):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


def test_encode_folder_round_trip_and_bad_images(tmp_path, images, model):
    from ghindex.data import load_data

    out = tmp_path / "codes.h5"
    summary = encode(model, images, out, batch_size=5, workers=0, progress=False)
    source = load_data(images)
    good = [i for i, p in enumerate(source.paths) if os.path.basename(p) not in BAD]
    assert summary["count"] == len(good) == 24 and summary["skipped"] == 3 and summary["inputs"] == 27
    assert summary["status"] == "complete" and summary["store_rows"] == 24 and summary["precision"] == "fp32"
    assert summary["seconds"] > 0 and summary["rate"] > 0
    assert {os.path.basename(x["path"]) for x in summary["skipped_items"]} == BAD
    assert not os.path.exists(f"{out}.partial") and not os.path.exists(f"{out}.partial.journal")

    codes, ids, labels, paths, skipped = store_contents(out)
    enc = ghindex.Encoder.load(model)
    expected = enc.encode([source.paths[i] for i in good], batch_size=5)
    np.testing.assert_array_equal(codes, expected)  # exact fp32 path: same codes as Encoder.encode
    np.testing.assert_array_equal(ids, np.array(good))  # ids = positions in DATA
    np.testing.assert_array_equal(labels, source.labels[good])
    assert paths == [source.paths[i] for i in good]
    reasons = {os.path.basename(x["path"]): x["reason"] for x in skipped}
    assert set(reasons) == BAD
    assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["text.jpg"]
    assert "decode" in reasons["corrupt.jpg"] or "truncat" in reasons["corrupt.jpg"].lower()
    assert all(x["position"] == source.paths.index(x["path"]) for x in skipped)
    with CodeStore.open(out) as s:
        assert s.class_names == ["cat", "dog"] and s.encoder_fingerprint == ghindex.io.file_fingerprint(model)
        assert s.attrs["backbone"] == "smallcnn" and s.attrs["precision"] == "fp32"


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_normalizer_gives_normalize_batchs_floats(channels_last):
    from ghindex.batching import BatchNormalizer, collate_uint8, normalize_batch
    from ghindex.images import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(1)
    normalizer = BatchNormalizer(IMAGENET_MEAN, IMAGENET_STD, channels_last)
    for n in (5, 5, 2):  # the buffer is kept, then resized for a short last batch
        pixels = [torch.from_numpy(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)) for _ in range(n)]
        pixels[0][0, 0] = torch.tensor([0, 128, 255], dtype=torch.uint8)  # both ends of the table
        _, x, _ = collate_uint8([(i, p, "") for i, p in enumerate(pixels)])
        expected = normalize_batch(x.contiguous(), IMAGENET_MEAN, IMAGENET_STD)
        got = normalizer(x)
        assert got.dtype == torch.float32 and got.shape == (n, 3, 7, 7)
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.equal(got, expected)  # bit for bit
        kept = x.index_select(0, torch.tensor([0, n - 1]))  # a batch after dropping bad images: NCHW memory
        assert torch.equal(normalizer(kept), expected[[0, n - 1]])


def test_workers_give_the_same_store(tmp_path, images, model):
    encode(model, images, tmp_path / "a.h5", batch_size=5, workers=0, progress=False)
    encode(model, images, tmp_path / "b.h5", batch_size=5, workers=2, progress=False)
    assert_same_store(tmp_path / "a.h5", tmp_path / "b.h5")


def test_strict_stops_at_the_first_bad_image_and_can_resume(tmp_path, images, model):
    out = tmp_path / "codes.h5"
    with pytest.raises(ImageError, match="corrupt.jpg.*strict"):
        encode(model, images, out, batch_size=2, workers=0, strict=True, progress=False, checkpoint_rows=1)
    assert not out.exists() and os.path.exists(f"{out}.partial")
    with pytest.raises(StoreError, match="interrupted run.*--resume"):
        encode(model, images, out, workers=0, progress=False)
    summary = encode(model, images, out, batch_size=2, workers=0, progress=False, resume=True)
    assert summary["resumed_from"] > 0 and summary["skipped"] == 3
    encode(model, images, tmp_path / "ref.h5", batch_size=2, workers=0, progress=False)
    assert_same_store(out, tmp_path / "ref.h5")


def test_features_with_identity_model(tmp_path, rng):
    feats = rng.normal(size=(50, 16)).astype(np.float32)
    labels = rng.integers(0, 2, size=(50, 3)).astype(np.uint8)
    np.savez(tmp_path / "f.npz", features=feats, labels=labels)
    torch.manual_seed(0)
    enc = ghindex.Encoder("identity", 16, feature_dim=16)
    enc.save(tmp_path / "id.ghm")
    summary = encode(tmp_path / "id.ghm", tmp_path / "f.npz", tmp_path / "c.h5", batch_size=7, progress=False)
    assert summary["count"] == 50
    codes, ids, got_labels, paths, skipped = store_contents(tmp_path / "c.h5")
    np.testing.assert_array_equal(codes, enc.encode(torch.from_numpy(feats)))
    np.testing.assert_array_equal(ids, np.arange(50))
    np.testing.assert_array_equal(got_labels, labels)
    assert paths is None and skipped == []
    with pytest.raises(DataError, match="images"):
        encode(tmp_path / "id.ghm", tmp_path, tmp_path / "x.h5", progress=False)


def test_append_and_mismatches(tmp_path, model):
    a = make_images(tmp_path / "a", per_class=3, seed=1, bad=False)
    b = make_images(tmp_path / "b", per_class=2, seed=2, bad=False)
    out = tmp_path / "codes.h5"
    encode(model, a, out, workers=0, progress=False)
    summary = encode(model, b, out, workers=0, progress=False, append=True)
    assert summary["count"] == 4 and summary["store_rows"] == 10
    with CodeStore.open(out) as s:
        assert list(s.ids()) == list(range(10))  # appended ids continue after the largest id
        assert len(json.loads(s.attrs["history"])) == 2
    before = out.read_bytes()

    torch.manual_seed(1)
    ghindex.Encoder("smallcnn", 64, image_size=32).save(tmp_path / "m64.ghm")
    with pytest.raises(StoreError, match="64-bit codes.*32-bit"):
        encode(tmp_path / "m64.ghm", b, out, workers=0, progress=False, append=True)
    torch.manual_seed(2)
    ghindex.Encoder("smallcnn", 32, image_size=32).save(tmp_path / "other.ghm")
    with pytest.raises(StoreError, match="different model"):
        encode(tmp_path / "other.ghm", b, out, workers=0, progress=False, append=True)
    with pytest.raises(StoreError, match="already exists.*--append.*--overwrite"):
        encode(model, b, out, workers=0, progress=False)
    with pytest.raises(StoreError, match="does not exist"):
        encode(model, b, tmp_path / "none.h5", workers=0, progress=False, append=True)
    assert out.read_bytes() == before  # refusals leave the store untouched
    assert not os.path.exists(f"{out}.partial") and not os.path.exists(f"{out}.partial.journal")
    encode(model, b, out, workers=0, progress=False, overwrite=True)
    with CodeStore.open(out) as s:
        assert len(s) == 4


def test_ids_from_list_column_and_protocol_ids(tmp_path, model):
    imgs = make_images(tmp_path / "imgs", per_class=3, bad=False)
    lines = [f"cat/{i:03d}.{'jpg' if i % 2 else 'png'} {100 + i} 0" for i in range(3)]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    encode(model, tmp_path / "list.txt", tmp_path / "c.h5", root=imgs, ids_from=1, workers=0, progress=False)
    _, ids, labels, paths, _ = store_contents(tmp_path / "c.h5")
    assert list(ids) == [100, 101, 102] and list(labels) == [0, 0, 0]
    (tmp_path / "dup.txt").write_text("cat/000.png 5 0\ncat/001.jpg 5 0\n")
    with pytest.raises(DataError, match="id 5"):
        encode(model, tmp_path / "dup.txt", tmp_path / "d.h5", root=imgs, ids_from=1, workers=0, progress=False)

    make_images(tmp_path / "cifar" / "train", per_class=3, bad=False)
    make_images(tmp_path / "cifar" / "test", per_class=2, seed=5, bad=False)
    encode(model, tmp_path / "cifar", tmp_path / "q.h5", protocol="cifar10-II", split="query", workers=0,
           progress=False)
    with CodeStore.open(tmp_path / "q.h5") as s:
        assert list(s.ids()) == [6, 7, 8, 9]  # positions in the pooled train+test folder
        assert s.attrs["protocol"] == "cifar10-II" and s.attrs["split"] == "query"
    with pytest.raises(ConfigError, match="split"):
        encode(model, tmp_path / "cifar", tmp_path / "x.h5", protocol="cifar10-II", progress=False)


class Interrupt(Exception):
    pass


def test_resume_survives_torn_journal_and_corrupt_partial(tmp_path, images, model, monkeypatch):
    """A crash leaves a journal whose last record may be torn and a partial HDF5 that may be garbage."""
    encode_module = importlib.import_module("ghindex.encode")  # the module, even if ghindex exports encode()

    ref = tmp_path / "ref.h5"
    encode(model, images, ref, batch_size=3, workers=0, progress=False)
    out = tmp_path / "codes.h5"
    real_pack, calls = encode_module.pack_signs, [0]

    def failing_pack(h):
        calls[0] += 1
        if calls[0] == 5:
            raise Interrupt()
        return real_pack(h)

    monkeypatch.setattr(encode_module, "pack_signs", failing_pack)
    with pytest.raises(Interrupt):
        encode(model, images, out, batch_size=3, workers=0, progress=False, checkpoint_rows=1)
    monkeypatch.setattr(encode_module, "pack_signs", real_pack)
    journal = f"{out}.partial.journal"
    size = os.path.getsize(journal)
    with open(journal, "r+b") as f:
        f.truncate(size - 3)  # tear the last record
    with open(f"{out}.partial", "r+b") as f:
        f.seek(0)
        f.write(b"\0" * 4096)  # wreck the HDF5 superblock
    with pytest.raises(StoreError, match="incomplete|not a ghindex|not readable|not an HDF5"):
        CodeStore.open(f"{out}.partial")
    summary = encode(model, images, out, batch_size=3, workers=0, progress=False, resume=True)
    assert 0 < summary["resumed_from"] < 27 and summary["processed"] == 27 - summary["resumed_from"]
    assert_same_store(out, ref)
    again = encode(model, images, out, batch_size=3, workers=0, progress=False, resume=True)
    assert again["status"] == "already complete" and again["count"] == 24


def test_resume_refuses_a_different_run(tmp_path, images, model, monkeypatch):
    encode_module = importlib.import_module("ghindex.encode")  # the module, even if ghindex exports encode()

    out = tmp_path / "codes.h5"
    monkeypatch.setattr(encode_module, "pack_signs", lambda h: (_ for _ in ()).throw(Interrupt()))
    with pytest.raises(Interrupt):
        encode(model, images, out, batch_size=30, workers=0, progress=False)
    monkeypatch.undo()
    other = make_images(tmp_path / "other", per_class=2, bad=False)
    with pytest.raises(StoreError, match="cannot resume.*data fingerprint differs"):
        encode(model, other, out, workers=0, progress=False, resume=True)
    summary = encode(model, other, out, workers=0, progress=False, overwrite=True)
    assert summary["count"] == 4


def _cli_encode_cmd(model, data, out, *extra):
    return [sys.executable, "-m", "ghindex_cli", "-q", "encode", "--model", str(model), str(data), "--out", str(out),
            "--batch-size", "4", "--workers", "1", "--checkpoint-rows", "4", "--no-progress", *CPU, *extra]


def _kill_after_checkpoints(cmd, journal, records, timeout=120):
    """Start `cmd`, SIGKILL it once the journal holds `records` more chunk records than now."""
    def count():
        if not os.path.exists(journal):
            return 0
        with open(journal, "rb") as f:
            return f.read().count(Journal.MAGIC)

    target = count() + records
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while count() < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"encode ended before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _sigkill_resume(tmp_path, model, kills):
    data = make_images(tmp_path / "imgs", per_class=60, bad=True)  # 123 inputs, 3 bad
    ref = tmp_path / "ref.h5"
    encode(model, data, ref, batch_size=4, workers=1, progress=False)
    out = tmp_path / "codes.h5"
    journal = f"{out}.partial.journal"
    for n, records in enumerate(kills):
        _kill_after_checkpoints(_cli_encode_cmd(model, data, out, *(["--resume"] if n else [])), journal, records)
        assert not out.exists()
    summary = encode(model, data, out, batch_size=4, workers=1, progress=False, resume=True, checkpoint_rows=4)
    assert 0 < summary["resumed_from"] < 123 and summary["count"] == 120 and summary["skipped"] == 3
    assert_same_store(out, ref)
    assert not os.path.exists(journal) and not os.path.exists(f"{out}.partial")


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, model):
    _sigkill_resume(tmp_path, model, kills=[3])


@pytest.mark.slow
def test_repeated_sigkills_during_resumed_runs(tmp_path, model):
    _sigkill_resume(tmp_path, model, kills=[1, 2, 4, 3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encode_agrees_with_cpu_and_resumes_exactly(tmp_path, images, model, monkeypatch):
    encode_module = importlib.import_module("ghindex.encode")  # the module, even if ghindex exports encode()

    cpu_codes = store_contents(encode(model, images, tmp_path / "cpu.h5", workers=0, progress=False)["out"])
    for precision, agreement in (("fp32", 0.99), ("auto", 0.9)):
        out = tmp_path / f"cuda-{precision}.h5"
        summary = encode_any_device(model, images, out, device="cuda", precision=precision, batch_size=4,
                                    workers=2, progress=False)
        assert summary["device"].startswith("cuda") and summary["count"] == 24
        assert summary["precision"] == ("fp32" if precision == "fp32" else "bf16")
        got = store_contents(out)
        bits_equal = 1 - np.unpackbits(got[0] ^ cpu_codes[0]).mean()
        assert bits_equal >= agreement, (precision, bits_equal)
        np.testing.assert_array_equal(got[1], cpu_codes[1])
        assert got[3] == cpu_codes[3] and got[4] == cpu_codes[4]
    # resume on the GPU reproduces the uninterrupted GPU run bit for bit
    real_pack, calls = encode_module.pack_signs, [0]

    def failing_pack(h):
        calls[0] += 1
        if calls[0] == 4:
            raise Interrupt()
        return real_pack(h)

    out = tmp_path / "resumed.h5"
    monkeypatch.setattr(encode_module, "pack_signs", failing_pack)
    with pytest.raises(Interrupt):
        encode_any_device(model, images, out, device="cuda", batch_size=4, workers=2, progress=False,
                          checkpoint_rows=1)
    monkeypatch.setattr(encode_module, "pack_signs", real_pack)
    summary = encode_any_device(model, images, out, device="cuda", batch_size=4, workers=2, progress=False,
                                resume=True)
    assert summary["resumed_from"] > 0
    assert_same_store(out, tmp_path / "cuda-auto.h5")


def test_precision_and_device_options(tmp_path, images, model):
    with pytest.raises(ConfigError, match="precision"):
        encode(model, images, tmp_path / "x.h5", precision="fp64", progress=False)
    with pytest.raises(ConfigError, match="fp16 is for CUDA"):
        encode(model, images, tmp_path / "x.h5", precision="fp16", device="cpu", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            encode(model, images, tmp_path / "x.h5", device="cuda", progress=False)
    assert not (tmp_path / "x.h5.partial.journal").exists()


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_encode_and_info(tmp_path, runner, images, model):
    out = tmp_path / "codes.h5"
    result = runner.invoke(cli, ["encode", "--model", str(model), str(images), "--out", str(out), "--workers", "0",
                                 "--batch-size", "8", "--no-progress", "--format", "json", *CPU])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["count"] == 24 and summary["skipped"] == 3

    result = runner.invoke(cli, ["info", str(out)])
    assert result.exit_code == 0, result.output
    assert "rows" in result.stdout and "24" in result.stdout and "single-label (2 classes)" in result.stdout
    assert "empty.jpg" in result.stdout and "complete             yes" in result.stdout
    data = json.loads(runner.invoke(cli, ["info", str(out), "--format", "json"]).stdout)
    assert data["kind"] == "codes" and data["rows"] == 24 and data["bits"] == 32 and data["skipped"] == 3
    assert data["ids_min"] == 0 and data["complete"] is True

    data = json.loads(runner.invoke(cli, ["info", str(model), "--format", "json"]).stdout)
    assert data["kind"] == "model" and data["backbone"] == "smallcnn" and data["bits"] == 32
    assert data["fingerprint"] == ghindex.io.file_fingerprint(model)

    result = runner.invoke(cli, ["encode", "--model", str(model), str(images), "--out", str(out), "--no-progress"])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "already exists" in result.stderr
    assert "Traceback" not in result.output


def test_cli_errors_are_one_line(tmp_path, runner, model):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    result = runner.invoke(cli, ["info", str(junk)])
    assert result.exit_code == 1 and "junk.bin" in result.stderr and "Traceback" not in result.output
    result = runner.invoke(cli, ["info", str(tmp_path / "missing.h5")])
    assert result.exit_code == 1 and "missing.h5" in result.stderr
    result = runner.invoke(cli, ["encode", "--model", str(model), str(tmp_path / "nothing"), "--out",
                                 str(tmp_path / "o.h5")])
    assert result.exit_code == 1 and "not found" in result.stderr


def test_info_on_incomplete_store(tmp_path, rng):
    path = tmp_path / "c.h5.partial"
    s = CodeStore.create(path, 16)
    s.append(np.zeros((3, 2), np.uint8), [0, 1, 2])
    s.flush()
    s.close()
    data = info(path)
    assert data["complete"] is False and data["rows"] == 3


def test_info_on_an_index_directory(tmp_path, runner, rng):
    pytest.importorskip("faiss")
    from ghindex.index import build

    store = tmp_path / "c.h5"
    with CodeStore.create(store, 64) as s:
        s.append(np.packbits(rng.integers(0, 2, size=(100, 64)), axis=1, bitorder="little"), np.arange(100))
        s.mark_complete()
    build(store, tmp_path / "idx")
    data = info(tmp_path / "idx")
    assert data["kind"] == "index" and data["ntotal"] == 100 and data["bits"] == 64
    result = runner.invoke(cli, ["info", str(tmp_path / "idx")])
    assert result.exit_code == 0 and "ntotal" in result.stdout
