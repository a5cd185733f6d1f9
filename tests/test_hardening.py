"""Bad input through the CLI: the matrix of issue 8.

Every failing case must exit non-zero with exactly one `Error: ...` line on stderr that names the problem
and the file, print no traceback, and leave no output file behind (or the previous one untouched).
Unusual but valid inputs (1x1, 16-bit, CMYK, animated, non-UTF-8 and non-ASCII names) must simply work.

What `encode` does with each kind of image (README "Failure behaviour"):

| image                               | default                      | --strict                       |
|-------------------------------------|------------------------------|--------------------------------|
| 1x1, 16-bit PNG, CMYK JPEG, animated GIF (first frame), non-UTF-8 / non-ASCII name | encoded | encoded |
| corrupt JPEG, zero bytes, text named .jpg, decompression bomb, unreadable | skipped, recorded in the store (path + reason) and the summary | exit 1, `Error: FILE: reason (strict: ... --resume)`; OUT not written |

Kept small: identity-backbone models on .npz features, a smallcnn at 16 px for images, fixtures built once.
"""
import builtins
import errno
import json
import os
import pickle
import re
import shutil
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ghindex.encode import encode
from ghindex.encoder import Encoder
from ghindex.errors import ConfigError, SearchError
from ghindex.images import load_image
from ghindex.index import Index, build
from ghindex.query import query
from ghindex.store import CodeStore
from ghindex_cli.main import cli

CPU = ["--device", "cpu"]


# -- helpers -----------------------------------------------------------------------------------------
def snapshot(paths):
    """Bytes of every file under each path (None if absent): to prove a failure changed nothing."""
    state = {}
    for p in map(Path, paths):
        if p.is_dir():
            state[p] = {q.relative_to(p): q.read_bytes() for q in sorted(p.rglob("*")) if q.is_file()}
        else:
            state[p] = p.read_bytes() if p.exists() else None
    return state


def fails(runner, args, *needles, code=1, untouched=()):
    """Run `ghindex -q ARGS`; assert the failure contract and return the error line."""
    before = snapshot(untouched)
    result = runner.invoke(cli, ["-q", *map(os.fspath, args)])
    assert result.exit_code == code, (args, result.output)
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no uncaught exception
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    if code == 1:  # our errors: the one line is all there is (click's usage errors add a usage line)
        assert result.stderr.strip() == errors[0], result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert snapshot(untouched) == before, "a failing command changed or created an output"
    return errors[0]


def works(runner, args):
    result = runner.invoke(cli, ["-q", *map(os.fspath, args)])
    assert result.exit_code == 0, (args, result.output, result.exception)
    assert "Traceback" not in result.output
    return result


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width, height) -> bytes:
    """A PNG whose header claims width x height RGB pixels and holds no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def gif_claiming(width, height) -> bytes:
    """A valid 4x4 GIF whose logical screen claims width x height."""
    import io

    buf = io.BytesIO()
    Image.new("P", (4, 4)).save(buf, "GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def rgb(rng, h=12, w=10):
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


class Payload:
    """Unpickling this creates `target`: proof that a file was (or was not) unpickled."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


# -- images ------------------------------------------------------------------------------------------
VALID = {  # file name -> writer; each must encode, default and --strict
    "one_pixel.png": lambda p, rng: Image.new("RGB", (1, 1), (200, 10, 10)).save(p),
    "deep16.png": lambda p, rng: Image.fromarray(rng.integers(0, 65535, (12, 10)).astype(np.uint16)).save(p),
    "cmyk.jpg": lambda p, rng: Image.new("CMYK", (12, 10), (10, 200, 30, 5)).save(p),
    "animated.gif": lambda p, rng: rgb(rng).save(p, save_all=True, append_images=[rgb(rng), rgb(rng)], duration=40),
    "café_猫.png": lambda p, rng: rgb(rng).save(p),
    b"raw\xffname.png": lambda p, rng: rgb(rng).save(p, format="PNG"),
}


def _corrupt_jpeg(p, rng):
    rgb(rng, 40, 40).save(p, format="JPEG")
    data = Path(p).read_bytes()
    Path(p).write_bytes(data[: len(data) // 2])


BAD = {  # file name -> (writer, words of the reason)
    "corrupt.jpg": (_corrupt_jpeg, "truncated"),
    "zero.jpg": (lambda p, rng: open(p, "wb").close(), "empty file (0 bytes)"),
    "text.jpg": (lambda p, rng: Path(p).write_text("this is not an image\n"), "not an image file"),
    "bomb.png": (lambda p, rng: Path(p).write_bytes(png_header_only(9000, 9000)), "image too large"),
    "bomb.gif": (lambda p, rng: Path(p).write_bytes(gif_claiming(30000, 30000)), "decompression bomb"),
    b"broken\xfe.jpg": (lambda p, rng: Path(p).write_bytes(b"\xff\xd8\xff\xe0 not really"), "cannot decode"),
}


def write_case(folder: Path, name, writer, rng) -> str:
    path = os.fsdecode(os.path.join(os.fsencode(folder), os.fsencode(name)))  # str, surrogate-escaped if need be
    writer(path, rng)
    return path


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("imodel") / "cnn.ghm"
    Encoder("smallcnn", 16, image_size=16).save(path)
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """One folder with every valid and bad case, plus a good image per class."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("zoo") / "imgs"
    files = {}
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            rgb(rng).save(root / c / f"good{i}.png")
    for name, writer in VALID.items():
        files[name] = write_case(root / "a", name, writer, rng)
    for name, (writer, _) in BAD.items():
        files[name] = write_case(root / "b", name, writer, rng)
    return root, files


def test_unusual_valid_images_decode_to_sensible_rgb(zoo):
    _, files = zoo
    for name in VALID:
        img = load_image(files[name])
        assert img.mode == "RGB" and img.size[0] >= 1
    deep = np.asarray(load_image(files["deep16.png"]))
    assert deep.std() > 10 and deep.max() < 255  # scaled from 16 bits, not clipped to white
    cmyk = np.asarray(load_image(files["cmyk.jpg"]))[0, 0]
    assert cmyk[1] < 100 < cmyk[0]  # magenta-heavy CMYK becomes a red-ish RGB, not garbage
    animated = Image.open(files["animated.gif"])
    assert animated.n_frames == 3 and load_image(files["animated.gif"]).size == (10, 12)  # first frame


def test_encode_skips_and_records_bad_images_and_keeps_every_valid_one(runner, tmp_path, zoo, image_model):
    root, files = zoo
    out = tmp_path / "codes.h5"
    result = works(runner, ["encode", "--model", image_model, root, "--out", out, "--workers", "0",
                            "--no-progress", *CPU])
    n_valid, n_bad = len(VALID) + 4, len(BAD)
    assert re.search(rf"^count +{n_valid} of {n_valid + n_bad} inputs$", result.stdout, re.M)
    lines = result.stdout_bytes.splitlines()
    for name, (_, reason) in BAD.items():  # the summary lists each skipped file (its exact bytes) and why
        line = next(line for line in lines if line.startswith(b"skipped  " + os.fsencode(files[name]) + b": "))
        assert reason.encode() in line
    with CodeStore.open(out) as s:
        paths = s.paths()
        assert len(s) == n_valid and sorted(paths) == sorted(
            [files[n] for n in VALID] + [str(p) for p in root.glob("*/good*.png")])
        assert os.fsencode(files[b"raw\xffname.png"]) in [os.fsencode(p) for p in paths]  # the exact bytes
        skipped = {os.fsencode(x["path"]): x["reason"] for x in s.skipped()}
    assert skipped.keys() == {os.fsencode(files[n]) for n in BAD}
    for name, (_, reason) in BAD.items():
        assert reason in skipped[os.fsencode(files[name])]
    assert re.search(rf"^skipped +{n_bad}$", works(runner, ["info", out]).stdout, re.M)

    # the undecodable name comes back out of query in every format (exact bytes in csv, escaped in JSON)
    works(runner, ["build", "--codes", out, "--out", tmp_path / "index"])
    raw = files[b"raw\xffname.png"]
    for fmt in ("table", "csv", "json"):
        result = works(runner, ["query", "--index", tmp_path / "index", "--model", image_model, raw,
                                "-k", "100", "--format", fmt])
        if fmt == "json":
            assert raw in [n["path"] for n in json.loads(result.stdout)["neighbors"]]
        else:
            assert raw.encode("utf-8", "surrogateescape") in result.stdout_bytes


def test_strict_accepts_every_valid_image(runner, tmp_path, zoo, image_model):
    root, files = zoo
    folder = tmp_path / "valid"
    (folder / "a").mkdir(parents=True)
    for name in VALID:
        target = os.path.join(os.fsencode(folder / "a"), name if isinstance(name, bytes) else name.encode())
        shutil.copy(os.fsencode(files[name]), target)
    result = works(runner, ["encode", "--model", image_model, folder, "--out", tmp_path / "c.h5", "--strict",
                            "--workers", "0", "--no-progress", "--format", "json", *CPU])
    assert json.loads(result.stdout)["count"] == len(VALID)


@pytest.mark.parametrize("name", list(BAD), ids=lambda n: os.fsdecode(n))
def test_strict_stops_at_a_bad_image_with_one_line(runner, tmp_path, zoo, image_model, name):
    _, files = zoo
    folder = tmp_path / "data"
    (folder / "c").mkdir(parents=True)
    bad = shutil.copy(os.fsencode(files[name]), os.path.join(os.fsencode(folder / "c"), os.fsencode(name)))
    rgb(np.random.default_rng(1)).save(folder / "c" / "zz_good.png")
    out = tmp_path / "codes.h5"
    line = fails(runner, ["encode", "--model", image_model, folder, "--out", out, "--strict", "--workers", "0",
                          "--no-progress", *CPU], BAD[name][1], "strict", "--resume", untouched=[out])
    assert os.fsdecode(bad) in line or os.fsdecode(bad).encode("unicode_escape").decode() in line


def test_unreadable_image(runner, tmp_path, image_model, monkeypatch):
    folder = tmp_path / "data"
    (folder / "c").mkdir(parents=True)
    rng = np.random.default_rng(2)
    rgb(rng).save(folder / "c" / "locked.png")
    rgb(rng).save(folder / "c" / "open.png")
    locked = str(folder / "c" / "locked.png")
    os.chmod(locked, 0)
    if os.access(locked, os.R_OK):
        # Running as root: permissions do not stop reads. Simulate what the OS says to anyone else.
        real_open = builtins.open

        def guarded_open(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and os.fsdecode(file) == locked:
                raise PermissionError(errno.EACCES, "Permission denied", locked)
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
    args = ["encode", "--model", image_model, folder, "--workers", "0", "--no-progress", "--format", "json", *CPU]
    summary = json.loads(works(runner, [*args, "--out", tmp_path / "a.h5"]).stdout)
    assert summary["count"] == 1 and summary["skipped_items"][0]["path"] == locked
    assert summary["skipped_items"][0]["reason"] == "permission denied"
    fails(runner, [*args, "--out", tmp_path / "b.h5", "--strict"], "locked.png: permission denied",
          untouched=[tmp_path / "b.h5"])


def test_folder_with_an_undecodable_name(runner, tmp_path, image_model):
    folder = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"d\xe9j\xe0")))
    (folder / "c").mkdir(parents=True)
    rgb(np.random.default_rng(3)).save(folder / "c" / "x.png")
    out = tmp_path / "codes.h5"
    works(runner, ["encode", "--model", image_model, folder, "--out", out, "--workers", "0", "--no-progress", *CPU])
    with CodeStore.open(out) as s:
        assert s.attrs["source"] == f"folder:{folder}" and s.paths() == [str(folder / "c" / "x.png")]
    assert str(folder).encode("utf-8", "surrogateescape") in works(runner, ["info", out]).stdout_bytes


# -- codes, stores, models, indexes ------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Feature arrays, identity models (16 and 24 bits), stores, an index, and broken copies of each."""
    d = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(60, 8)).astype(np.float32)
    labels = np.repeat(np.arange(3), 20)
    np.savez(d / "f.npz", features=feats, labels=labels)
    np.savez(d / "nolabels.npz", features=feats)
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        bad = feats.copy()
        bad[7, 3] = value
        np.savez(d / f"{name}.npz", features=bad, labels=labels)
    torch.manual_seed(0)
    for bits in (16, 24):
        Encoder("identity", bits, feature_dim=8).save(d / f"m{bits}.ghm")
    quiet = dict(device="cpu", progress=False)
    encode(d / "m16.ghm", d / "f.npz", d / "db.h5", **quiet)
    encode(d / "m16.ghm", d / "f.npz", d / "q.h5", **quiet)
    encode(d / "m24.ghm", d / "f.npz", d / "q24.h5", **quiet)
    encode(d / "m16.ghm", d / "nolabels.npz", d / "nolabels.h5", **quiet)
    build(d / "db.h5", d / "index", gpu="off")
    with CodeStore.create(d / "empty.h5", 16, label_shape=()) as s:
        s.mark_complete()

    store = (d / "db.h5").read_bytes()
    (d / "truncated.h5").write_bytes(store[: len(store) // 2])
    with h5py.File(d / "foreign.h5", "w") as f:
        f["features"] = feats
    shutil.copy(d / "db.h5", d / "incomplete.h5")
    with h5py.File(d / "incomplete.h5", "a") as f:
        f.attrs["complete"] = False
    model = (d / "m16.ghm").read_bytes()
    (d / "truncated.ghm").write_bytes(model[: len(model) // 2])
    shutil.copy(d / "db.h5", d / "foreign.ghm")  # an HDF5 file named like a model
    with open(d / "evil.ghm", "wb") as f:
        pickle.dump({"state_dict": Payload(str(d / "PWNED-pickle"))}, f)
    torch.save({"state_dict": Payload(str(d / "PWNED-torch"))}, d / "evil-torch.ghm")
    torch.save({"weight": Payload(str(d / "PWNED-weights"))}, d / "evil.pt")
    for c in ("a", "b"):
        (d / "imgs" / c).mkdir(parents=True)
        rgb(rng).save(d / "imgs" / c / "x.png")
    shutil.copytree(d / "index", d / "index-truncated")
    faiss_bytes = (d / "index" / "index.faiss").read_bytes()
    (d / "index-truncated" / "index.faiss").write_bytes(faiss_bytes[: len(faiss_bytes) // 2])
    shutil.copytree(d / "index", d / "index-foreign")
    shutil.copy(d / "db.h5", d / "index-foreign" / "index.faiss")
    (d / "not-an-index").mkdir()
    (d / "not-an-index" / "index.faiss").write_bytes(faiss_bytes)
    return d


def test_broken_code_stores(runner, files, tmp_path):
    d = files
    for name, words in (("truncated.h5", ["truncated"]), ("foreign.h5", ["not a ghindex code store"]),
                        ("incomplete.h5", ["incomplete", "--resume"])):
        store = d / name
        out = tmp_path / f"index-{name}"
        line = fails(runner, ["build", "--codes", store, "--out", out], name, *words, untouched=[out])
        assert "another process" not in line  # a truncated file is not "locked"
        fails(runner, ["build", "--codes", store, "--out", d / "index", "--overwrite"], name, *words,
              untouched=[d / "index"])  # the previous index survives
        fails(runner, ["query", "--index", d / "index", "--codes", store], name, *words)
        report = tmp_path / f"{name}.json"
        fails(runner, ["eval", "--queries", store, "--index", d / "index", "--report", report], name, *words,
              untouched=[report])
        fails(runner, ["eval", "--queries", d / "q.h5", "--database", store], name, *words)
        if name == "incomplete.h5":  # info still describes it, and says so
            assert "complete             no" in works(runner, ["info", store]).stdout
        else:
            fails(runner, ["info", store], name, *words)


def test_codes_of_another_bit_length_than_the_index(runner, files):
    d = files
    fails(runner, ["query", "--index", d / "index", "--codes", d / "q24.h5"], "q24.h5", "24-bit", "16-bit")
    fails(runner, ["eval", "--queries", d / "q24.h5", "--index", d / "index"], "q24.h5", "24 bits", "16 bits")
    fails(runner, ["query", "--index", d / "index", "--model", d / "m24.ghm", __file__], "m24.ghm", "24-bit")
    with pytest.raises(SearchError, match="3 bytes"):
        Index.load(d / "index", gpu="off").search(np.zeros((1, 3), np.uint8), 1)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_features(runner, files, tmp_path, kind):
    d = files
    out = tmp_path / "codes.h5"
    fails(runner, ["encode", "--model", d / "m16.ghm", d / f"{kind}.npz", "--out", out, *CPU],
          f"{kind}.npz", "NaN or inf", "1 row", untouched=[out, f"{out}.partial"])
    fails(runner, ["encode", "--model", d / "m16.ghm", d / f"{kind}.npz", "--out", d / "q.h5", "--overwrite", *CPU],
          "NaN or inf", untouched=[d / "q.h5"])  # --overwrite does not lose the old store on bad input
    model = tmp_path / "m.ghm"
    fails(runner, ["train", d / f"{kind}.npz", "--bits", "16", "--epochs", "1", "--out", model, *CPU],
          f"{kind}.npz", "NaN or inf", untouched=[model, f"{model}.ckpt", f"{model}.log.jsonl"])
    with pytest.raises(ConfigError, match="NaN or inf"):
        Encoder.load(d / "m16.ghm").encode(torch.tensor([[float(kind)] * 8]))


def test_broken_or_foreign_model_files(runner, files, tmp_path):
    d = files
    for name, words in (("truncated.ghm", ["truncated"]), ("foreign.ghm", ["not a ghindex model"]),
                        ("evil.ghm", ["refusing to unpickle"]), ("evil-torch.ghm", ["refusing to unpickle"]),
                        ("missing.ghm", ["not found"])):
        out = tmp_path / f"{name}.h5"
        fails(runner, ["encode", "--model", d / name, d / "f.npz", "--out", out, *CPU], name, *words,
              untouched=[out, f"{out}.partial", f"{out}.partial.journal"])
        fails(runner, ["query", "--index", d / "index", "--model", d / name, __file__], name, *words)
        if name == "foreign.ghm":  # info describes what the file really is
            assert re.search(r"^kind +codes$", works(runner, ["info", d / name]).stdout, re.M)
        elif name != "missing.ghm":
            fails(runner, ["info", d / name], name, *words)
    fails(runner, ["train", d / "imgs", "--backbone", "smallcnn", "--weights", d / "evil.pt",
                   "--bits", "16", "--epochs", "1", "--out", tmp_path / "w.ghm"],
          "evil.pt", "refusing to unpickle", untouched=[tmp_path / "w.ghm"])
    assert not list(d.glob("PWNED*")), "a pickle payload was executed"


def test_broken_or_foreign_indexes(runner, files):
    d = files
    for name, words in (("index-truncated", ["index.faiss", "truncated"]),
                        ("index-foreign", ["index.faiss", "not a readable FAISS binary index"]),
                        ("not-an-index", ["meta.json"]), ("db.h5", ["not an index directory"]),
                        ("missing", ["does not exist"])):
        fails(runner, ["query", "--index", d / name, "--ids", "1"], name, *words)
        fails(runner, ["eval", "--queries", d / "q.h5", "--index", d / name], name, *words)


# -- arguments -----------------------------------------------------------------------------------------
def test_k_and_radius(runner, files):
    d = files
    base = ["query", "--index", d / "index", "--ids", "0"]
    for k in ("0", "-3"):
        fails(runner, [*base, "-k", k], "'-k'", code=2)
    fails(runner, [*base, "--radius", "-1"], "'--radius'", code=2)
    fails(runner, ["eval", "--queries", d / "q.h5", "--index", d / "index", "--topk", "0"], "'--topk'", code=2)
    fails(runner, ["eval", "--queries", d / "q.h5", "--index", d / "index", "--radius", "-2"], "'--radius'", code=2)
    with pytest.raises(ConfigError, match="k must be"):
        query(d / "index", ids=[0], k=0)
    with pytest.raises(SearchError, match="radius"):
        Index.load(d / "index", gpu="off").range_search(np.zeros((1, 2), np.uint8), -1)
    # k beyond the database: every code, once, nearest first
    neighbours = json.loads(works(runner, [*base, "-k", "1000", "--format", "json"]).stdout)["neighbors"]
    assert sorted(n["id"] for n in neighbours) == list(range(60))
    assert [n["distance"] for n in neighbours] == sorted(n["distance"] for n in neighbours)
    result = json.loads(works(runner, ["eval", "--queries", d / "q.h5", "--index", d / "index", "--topk", "1000",
                                       "--format", "json"]).stdout)
    assert 0 <= result["metrics"]["map"] <= 1
    within = json.loads(works(runner, [*base, "-k", "1000", "--radius", "0", "--format", "json"]).stdout)
    assert {n["distance"] for n in within["neighbors"]} == {0}


def test_bits_not_a_multiple_of_8(runner, files, tmp_path):
    model = tmp_path / "m.ghm"
    for bits in ("12", "0", "-8"):
        fails(runner, ["train", files / "f.npz", "--bits", bits, "--epochs", "1", "--out", model, *CPU],
              "multiple of 8", untouched=[model, f"{model}.ckpt"])


def test_empty_queries_and_databases(runner, files, tmp_path):
    d = files
    fails(runner, ["query", "--index", d / "index"], "give exactly one kind of query")
    fails(runner, ["query", "--index", d / "index", "--ids", ","], "give exactly one kind of query")
    fails(runner, ["query", "--index", d / "index", "--codes", d / "empty.h5"], "empty.h5", "holds no codes")
    fails(runner, ["eval", "--queries", d / "empty.h5", "--database", d / "db.h5"], "empty.h5", "holds no codes")
    fails(runner, ["eval", "--queries", d / "q.h5", "--database", d / "empty.h5"], "empty.h5", "holds no codes")
    out = tmp_path / "index"
    fails(runner, ["build", "--codes", d / "empty.h5", "--out", out], "empty.h5", "holds no codes", untouched=[out])
    (tmp_path / "nothing").mkdir()
    for command in (["encode", "--model", d / "m16.ghm", tmp_path / "nothing", "--out", tmp_path / "c.h5"],
                    ["train", tmp_path / "nothing", "--out", tmp_path / "m.ghm"]):
        fails(runner, command, "nothing", "no images found", untouched=[tmp_path / "c.h5", tmp_path / "m.ghm"])
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    fails(runner, ["encode", "--model", d / "m16.ghm", tmp_path / "empty.txt", "--out", tmp_path / "c.h5"],
          "empty.txt", "no entries", untouched=[tmp_path / "c.h5"])


def test_labels_missing_for_eval(runner, files, tmp_path):
    d = files
    report = tmp_path / "r.json"
    fails(runner, ["eval", "--queries", d / "nolabels.h5", "--database", d / "db.h5", "--report", report],
          "nolabels.h5", "no labels", untouched=[report])
    fails(runner, ["eval", "--queries", d / "q.h5", "--database", d / "nolabels.h5"], "nolabels.h5", "no labels")
    fails(runner, ["train", d / "nolabels.npz", "--bits", "16", "--out", tmp_path / "m.ghm"], "no labels",
          untouched=[tmp_path / "m.ghm"])
