import os

import h5py
import numpy as np
import pytest

from ghindex.errors import StoreError
from ghindex.hashing import pack_bits
from ghindex.store import CodeBatch, CodeStore


def random_codes(rng, n, bits=64):
    return pack_bits(rng.integers(0, 2, size=(n, bits)))


def make_store(path, rng, n=1000, bits=64, label_shape=(), with_paths=True, chunk_rows=64, batches=(300, 1, 0, 699)):
    codes = random_codes(rng, n, bits)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    if label_shape == ():
        labels = rng.integers(0, 10, size=n)
    elif label_shape is None:
        labels = None
    else:
        labels = rng.integers(0, 2, size=(n, *label_shape)).astype(np.uint8)
    paths = [f"/data/img_{i:05d}_é.jpg" for i in range(n)] if with_paths else None
    with CodeStore.create(path, bits, encoder_fingerprint="ab" * 32, source="test", label_shape=label_shape,
                          with_paths=with_paths, chunk_rows=chunk_rows, attrs={"class_names": list("abcdefghij")}) as s:
        start = 0
        for k in batches:
            s.append(codes[start : start + k], ids[start : start + k],
                     None if labels is None else labels[start : start + k],
                     None if paths is None else paths[start : start + k])
            start += k
        assert start == n
        s.mark_complete()
    return codes, ids, labels, paths


@pytest.mark.parametrize("label_shape", [(), (5,), None])
def test_round_trip(tmp_path, rng, label_shape):
    path = tmp_path / "c.h5"
    codes, ids, labels, paths = make_store(path, rng, label_shape=label_shape)
    with CodeStore.open(path) as s:
        assert len(s) == 1000 and s.bits == 64 and s.code_bytes == 8
        assert s.has_labels == (label_shape is not None) and s.has_paths
        assert s.label_shape == label_shape
        np.testing.assert_array_equal(s.codes(), codes)
        np.testing.assert_array_equal(s.ids(), ids)
        assert s.ids().dtype == np.int64
        if labels is None:
            assert s.labels() is None
        else:
            np.testing.assert_array_equal(s.labels(), labels)
            assert s.labels().dtype == (np.int64 if label_shape == () else np.uint8)
        assert s.paths() == paths
        a = s.attrs
        assert a["format_version"] == 1 and a["bits"] == 64 and a["bit_order"] == "little"
        assert a["encoder_fingerprint"] == "ab" * 32 and a["source"] == "test" and a["complete"] is True
        assert a["created"].endswith("+00:00")
        assert s.class_names == list("abcdefghij")
        batch = s.read(10, 20)
        assert isinstance(batch, CodeBatch)
        np.testing.assert_array_equal(batch.codes, codes[10:20])
        assert batch.paths == paths[10:20]
        assert s.read(990, 5000).codes.shape == (10, 8)
        assert s.read(10, 20, paths=False).paths is None


def test_layout_is_plain_hdf5(tmp_path, rng):
    path = tmp_path / "c.h5"
    codes, ids, labels, _ = make_store(path, rng)
    with h5py.File(path, "r") as f:
        assert f["codes"].dtype == np.uint8 and f["codes"].shape == (1000, 8)
        assert f["codes"].chunks == (64, 8) and f["codes"].maxshape == (None, 8)
        assert f["ids"].dtype == np.int64 and f["labels"].dtype == np.int64
        np.testing.assert_array_equal(f["codes"][:], codes)
        # LSB-first bit order, as FAISS reads it
        bits = np.unpackbits(f["codes"][:1], axis=1, bitorder="little")
        assert bits[0, 3] == (f["codes"][0, 0] >> 3) & 1


@pytest.mark.parametrize("rows", [1, 63, 64, 65, 1000, 5000, None])
def test_iter_chunks_covers_every_row_once(tmp_path, rng, rows):
    path = tmp_path / "c.h5"
    codes, ids, labels, paths = make_store(path, rng)
    with CodeStore.open(path) as s:
        batches = list(s.iter_chunks(rows))
        assert all(len(b.codes) == len(b.ids) == len(b.labels) == len(b.paths) for b in batches)
        if rows:
            assert all(len(b.codes) <= rows for b in batches)
        np.testing.assert_array_equal(np.concatenate([b.codes for b in batches]), codes)
        np.testing.assert_array_equal(np.concatenate([b.ids for b in batches]), ids)
        np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), labels)
        assert sum((b.paths for b in batches), []) == paths
        part = list(s.iter_chunks(100, start=250, stop=777, paths=False))
        np.testing.assert_array_equal(np.concatenate([b.ids for b in part]), ids[250:777])
        assert all(b.paths is None for b in part)


def test_empty_store(tmp_path):
    path = tmp_path / "e.h5"
    with CodeStore.create(path, 32) as s:
        s.mark_complete()
    with CodeStore.open(path) as s:
        assert len(s) == 0 and s.codes().shape == (0, 4) and list(s.iter_chunks()) == []
        assert s.labels() is None and s.paths() is None and s.skipped() == []


def test_non_utf8_paths_round_trip(tmp_path, rng):
    raw = os.fsdecode(b"/data/caf\xe9.jpg")  # latin-1 name: not UTF-8 -> surrogate escape
    path = tmp_path / "c.h5"
    with CodeStore.create(path, 8, with_paths=True) as s:
        s.append(random_codes(rng, 3, 8), [1, 2, 3], paths=[raw, "/data/ok.jpg", b"/data/b\xff.jpg"])
        s.add_skipped([7], [raw], ["not an image"])
        s.set_attrs(model=raw)
        s.mark_complete()
    with CodeStore.open(path) as s:
        got = s.paths()
        assert got[0] == raw and os.fsencode(got[0]) == b"/data/caf\xe9.jpg"
        assert got[1] == "/data/ok.jpg" and os.fsencode(got[2]) == b"/data/b\xff.jpg"
        assert s.skipped() == [{"position": 7, "path": raw, "reason": "not an image"}]
        assert s.attrs["model"] == raw
    with CodeStore.create(tmp_path / "s.h5", 8, source=f"folder:{raw}") as s:
        s.mark_complete()
    with CodeStore.open(tmp_path / "s.h5") as s:
        assert s.attrs["source"] == f"folder:{raw}"


def test_incomplete_store_is_refused(tmp_path, rng):
    path = tmp_path / "c.h5"
    s = CodeStore.create(path, 16)
    s.append(random_codes(rng, 5, 16), np.arange(5))
    s.flush()
    with pytest.raises(StoreError, match="incomplete code store.*5 rows.*--resume"):
        CodeStore.open(path)
    with CodeStore.open(path, allow_incomplete=True) as r:
        assert len(r) == 5 and not r.complete
    s.mark_complete()
    s.close()
    with CodeStore.open(path) as r:
        assert r.complete


def test_append_mode_marks_incomplete_until_completed(tmp_path, rng):
    path = tmp_path / "c.h5"
    make_store(path, rng, n=10, batches=(10,))
    with CodeStore.open(path, mode="a") as s:
        s.append(random_codes(rng, 2), [100, 101], [1, 2], ["x", "y"])
        assert not s.complete
    with pytest.raises(StoreError, match="incomplete"):
        CodeStore.open(path)
    with CodeStore.open(path, mode="a", allow_incomplete=True) as s:
        s.mark_complete()
    with CodeStore.open(path) as s:
        assert len(s) == 12 and list(s.ids()[-2:]) == [100, 101]


def test_bad_files_give_store_errors_naming_the_file(tmp_path, rng):
    missing = tmp_path / "missing.h5"
    with pytest.raises(StoreError, match="not found.*missing.h5"):
        CodeStore.open(missing)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(StoreError, match="text.h5.*not an HDF5"):
        CodeStore.open(text)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(StoreError, match="empty.h5"):
        CodeStore.open(empty)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreError, match="foreign.h5.*not a ghindex code store"):
        CodeStore.open(foreign)
    good = tmp_path / "good.h5"
    make_store(good, rng, n=5000, with_paths=False, chunk_rows=1024, batches=(5000,))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="truncated.h5"):
        with CodeStore.open(truncated) as s:
            s.codes()
    with pytest.raises(StoreError, match="is a directory"):
        CodeStore.open(tmp_path)
    newer = tmp_path / "newer.h5"
    make_store(newer, rng, n=3, batches=(3,))
    with h5py.File(newer, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="newer"):
        CodeStore.open(newer)


def test_append_validation(tmp_path, rng):
    path = tmp_path / "c.h5"
    with CodeStore.create(path, 32, label_shape=(), with_paths=True) as s:
        with pytest.raises(StoreError, match=r"\(n, 4\) uint8"):
            s.append(random_codes(rng, 2, 64), [1, 2], [0, 0], ["a", "b"])
        with pytest.raises(StoreError, match="integer ids"):
            s.append(random_codes(rng, 2, 32), [1], [0, 0], ["a", "b"])
        with pytest.raises(StoreError, match="needs labels"):
            s.append(random_codes(rng, 2, 32), [1, 2], None, ["a", "b"])
        with pytest.raises(StoreError, match="paths"):
            s.append(random_codes(rng, 2, 32), [1, 2], [0, 0])
        assert len(s) == 0
    with pytest.raises(StoreError, match="already exists"):
        CodeStore.create(path, 32)
    with CodeStore.open(path, allow_incomplete=True) as s:
        with pytest.raises(StoreError, match="read-only"):
            s.append(random_codes(rng, 1, 32), [1], [0], ["a"])
    with pytest.raises(Exception, match="multiple of 8"):
        CodeStore.create(tmp_path / "x.h5", 12)


def test_fingerprint_is_file_sha256(tmp_path, rng):
    from ghindex.io import file_fingerprint

    path = tmp_path / "c.h5"
    make_store(path, rng, n=10, batches=(10,))
    with CodeStore.open(path) as s:
        assert s.fingerprint == file_fingerprint(path)
