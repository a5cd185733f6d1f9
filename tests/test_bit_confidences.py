"""Bit confidences: how sure each bit of a database code is, stored by `encode` and weighed into the re-ranking
of image queries (`ghindex.hashing.pack_confidences`, `weighted_hamming(..., confidences)`)."""
import os

import numpy as np
import pytest
import torch

import ghindex
from ghindex.batching import normalize_batch, view_stack
from ghindex.database_views import code_confidences, combine_outputs
from ghindex.encode import encode
from ghindex.errors import ConfigError, StoreError
from ghindex.hashing import pack_confidences, pack_signs, unpack_bits, unpack_confidences, weighted_hamming
from ghindex.images import load_image
from ghindex.index import build
from ghindex.info import info
from ghindex.lifecycle import add
from ghindex.query import query
from ghindex.sharded_encode import merge_parts
from ghindex.store import CodeStore

from test_encode import make_images

RUN = dict(device="cpu", runtime="torch", workers=0, progress=False)  # torch: outputs exactly as computed below


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random smallcnn whose hash outputs are of a trained model's size (|H| about 1, where the cubic penalty
    pulls them; a fresh layer's are about 0.05, every bit at the lowest level)."""
    torch.manual_seed(0)
    enc = ghindex.Encoder("smallcnn", 32, image_size=32)
    with torch.no_grad():
        enc.hash_layer.weight.mul_(20)
        enc.hash_layer.bias.mul_(20)
    path = tmp_path_factory.mktemp("model") / "m.ghm"
    enc.save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "imgs", per_class=4, bad=False)


def direct(model_path, paths, views):
    """(codes, packed confidences) of each image computed directly: its view stack through the model."""
    enc = ghindex.Encoder.load(model_path).eval()
    c = enc.config
    codes, sure = [], []
    with torch.inference_mode():
        for p in paths:
            stack = view_stack(load_image(p), views, c.image_size)
            values = combine_outputs(enc.hash(normalize_batch(stack.permute(0, 3, 1, 2).contiguous(), c.mean, c.std)).float(),
                                     views)
            codes.append(pack_signs(values))
            sure.append(pack_confidences(code_confidences(values, views)))
    return np.concatenate(codes), np.concatenate(sure)


def test_levels_pack_and_unpack():
    values = np.array([[0.0, 0.24, 0.25, 0.49, 0.5, 0.74, 0.75, 1.0] * 2], np.float32)
    packed = pack_confidences(values)
    assert packed.shape == (1, 4) and packed.dtype == np.uint8  # 16 bits: two planes of 2 bytes
    levels = np.array([0, 0, 1, 1, 2, 2, 3, 3] * 2)
    np.testing.assert_array_equal(unpack_bits(packed[:, :2], 16)[0], levels >> 1)  # the high plane first
    np.testing.assert_array_equal(unpack_bits(packed[:, 2:], 16)[0], levels & 1)
    np.testing.assert_array_equal(unpack_confidences(packed, 16)[0], (levels + 0.5) / 4)
    np.testing.assert_array_equal(pack_confidences(torch.from_numpy(values)), packed)  # torch as numpy
    np.testing.assert_array_equal(pack_confidences(np.array([[-3.0, 7.0] * 8])), pack_confidences(np.array([[0, 1.0] * 8])))
    with pytest.raises(ConfigError, match="packed confidences"):
        unpack_confidences(packed, 32)
    with pytest.raises(ConfigError, match="multiple of 8"):
        pack_confidences(np.zeros((1, 12)))


def test_weighted_hamming_weighs_each_differing_bit_by_the_candidates_confidence(rng):
    h = rng.normal(size=(3, 32)).astype(np.float32)
    codes = rng.integers(0, 256, (5, 4), dtype=np.uint8)
    sure = pack_confidences(rng.random((5, 32)))
    weight = unpack_confidences(sure, 32)
    bits = unpack_bits(codes, 32).astype(bool)
    brute = np.array([[(np.abs(hq) * w)[(hq >= 0) != b].sum() for b, w in zip(bits, weight)] for hq in h])
    np.testing.assert_allclose(weighted_hamming(h, codes, sure), brute, rtol=1e-6)
    per_query = weighted_hamming(h, np.stack([codes] * 3), np.stack([sure] * 3))
    np.testing.assert_allclose(per_query, brute, rtol=1e-6)
    # every bit at one level: the plain distance times that level's weight (the ranking is unchanged)
    top = pack_confidences(np.ones((5, 32)))
    np.testing.assert_allclose(weighted_hamming(h, codes, top), 0.875 * weighted_hamming(h, codes), rtol=1e-6)
    with pytest.raises(ConfigError, match="do not match candidates"):
        weighted_hamming(h, codes, sure[:, :4])


def test_store_keeps_confidences_only_where_created_with_them(tmp_path, rng):
    codes = rng.integers(0, 256, (6, 2), dtype=np.uint8)
    sure = pack_confidences(rng.random((6, 16)))
    with CodeStore.create(tmp_path / "a.h5", 16, confidences=True) as s:
        with pytest.raises(StoreError, match="append needs them"):
            s.append(codes, np.arange(6))
        with pytest.raises(StoreError, match=r"expected confidences of shape \(6, 4\)"):
            s.append(codes, np.arange(6), confidences=sure[:, :2])
        s.append(codes[:4], np.arange(4), confidences=sure[:4])
        s.append(codes[4:], np.arange(4, 6), confidences=sure[4:])
        s.mark_complete()
    with CodeStore.open(tmp_path / "a.h5") as s:
        assert s.has_confidences
        np.testing.assert_array_equal(s.confidences(), sure)
        np.testing.assert_array_equal(s.read(2, 5).confidences, sure[2:5])
        np.testing.assert_array_equal(np.concatenate([b.confidences for b in s.iter_chunks(rows=4)]), sure)
    assert info(tmp_path / "a.h5")["bit_confidences"] is True
    with CodeStore.create(tmp_path / "b.h5", 16) as s:
        with pytest.raises(StoreError, match="without bit confidences"):
            s.append(codes, np.arange(6), confidences=sure)
        s.append(codes, np.arange(6))
        s.mark_complete()
    with CodeStore.open(tmp_path / "b.h5") as s:
        assert not s.has_confidences and s.confidences() is None and s.read().confidences is None
    # a store whose confidences lost rows is damaged, and said to be
    import h5py
    with h5py.File(tmp_path / "a.h5", "a") as f:
        f["confidences"].resize(5, axis=0)
    with pytest.raises(StoreError, match="confidences has 5 rows but codes has 6"):
        CodeStore.open(tmp_path / "a.h5")


@pytest.mark.parametrize("views", [0, 2])
def test_encode_stores_the_confidences_of_its_codes(tmp_path, images, model, views):
    out = tmp_path / "codes.h5"
    encode(model, images, out, views=views, batch_size=5, **RUN)
    with CodeStore.open(out) as s:
        codes, sure = direct(model, s.paths(), views)
        np.testing.assert_array_equal(s.codes(), codes)
        np.testing.assert_array_equal(s.confidences(), sure)
        levels = unpack_confidences(s.confidences(), s.bits)
    assert len(np.unique(levels)) > 1  # not one level for every bit: the confidences say something


def test_appends_resume_merge_and_add_carry_them(tmp_path, images, model, rng):
    out = tmp_path / "codes.h5"
    paths = sorted(str(p) for p in images.rglob("*.*"))
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("\n".join(paths[:5]) + "\n")
    second.write_text("\n".join(paths[5:]) + "\n")
    encode(model, first, out, **RUN)
    encode(model, second, out, append=True, **RUN)
    with CodeStore.open(out) as s:
        assert len(s) == len(paths)
        np.testing.assert_array_equal(s.confidences(), direct(model, s.paths(), 0)[1])
    # a store made before confidences existed: appends add none, and stay appendable
    old = tmp_path / "old.h5"
    with CodeStore.open(out) as s, CodeStore.create(old, s.bits, encoder_fingerprint=s.encoder_fingerprint,
                                                   with_paths=True, attrs={"model": str(model)}) as o:
        o.append(s.codes()[:5], s.ids()[:5], paths=s.paths()[:5])
        o.mark_complete()
    encode(model, second, old, append=True, **RUN)
    with CodeStore.open(old) as s:
        assert len(s) == len(paths) and not s.has_confidences
    # sharded parts merge with their confidences; parts that differ in having them are refused
    parts = []
    for n, listing in enumerate((first, second)):
        part = tmp_path / f"part{n}.h5"
        encode(model, listing, part, **RUN)
        parts.append(str(part))
    merge_parts(parts, str(tmp_path / "merged.h5"), "two parts", "fp")
    with CodeStore.open(tmp_path / "merged.h5") as s:
        np.testing.assert_array_equal(s.confidences(), np.concatenate([CodeStore.open(p).confidences() for p in parts]))
    with pytest.raises(StoreError, match="bit confidences differ"):
        merge_parts([parts[0], str(old)], str(tmp_path / "bad.h5"), "mixed", "fp")
    # add: new images' rows join the store with their confidences; codes from elsewhere at the top level
    index = tmp_path / "index"
    base = tmp_path / "base.h5"
    encode(model, first, base, with_paths=False, **RUN)  # no paths: bare codes can join it below
    build(base, index, index_key="BFlat", gpu="off")
    add(index, second, model=model, runtime="torch", workers=0)
    with CodeStore.open(base) as s:
        np.testing.assert_array_equal(s.confidences(), direct(model, paths, 0)[1])  # ids: listing order
    bare = tmp_path / "bare.h5"
    with CodeStore.open(base) as s, CodeStore.create(bare, s.bits, encoder_fingerprint=s.encoder_fingerprint) as b:
        b.append(rng.integers(0, 256, (2, s.code_bytes), dtype=np.uint8), [900, 901])
        b.mark_complete()
    add(index, codes=bare, keep_ids=True)
    with CodeStore.open(base) as s:
        rows = np.isin(s.ids(), [900, 901])
        assert rows.sum() == 2 and (unpack_confidences(s.confidences()[rows], s.bits) == 0.875).all()


def test_image_queries_rerank_with_the_stores_confidences(tmp_path, images, model):
    store, index = tmp_path / "codes.h5", tmp_path / "index"
    encode(model, images, store, **RUN)
    build(store, index, index_key="BFlat", gpu="off")
    with CodeStore.open(store) as s:
        codes, sure, stored_paths = s.codes(), s.confidences(), s.paths()
    queries = stored_paths[:3]
    h = ghindex.Encoder.load(model).hash_outputs(queries)
    with_sure, plain = weighted_hamming(h, codes, sure), weighted_hamming(h, codes)
    results = query(index, model=model, images=queries, k=len(codes))
    for qi, r in enumerate(results):
        got = {n["id"]: n["weighted_distance"] for n in r["neighbors"]}
        assert got == pytest.approx({i: float(with_sure[qi, i]) for i in range(len(codes))}, abs=1e-4)
    assert not np.allclose(with_sure, 0.875 * plain)  # the confidences are not one level: they change distances


def test_a_run_journaled_before_confidences_resumes_without_them(tmp_path, images, model, monkeypatch):
    import importlib

    from ghindex.journal import Journal

    class Interrupt(Exception):
        pass

    encode_module = importlib.import_module("ghindex.encode")
    calls = []

    def pack_then_fail(h):
        calls.append(1)
        if len(calls) > 1:
            raise Interrupt()
        return pack_signs(h)

    out = tmp_path / "codes.h5"
    monkeypatch.setattr(encode_module, "pack_signs", pack_then_fail)
    with pytest.raises(Interrupt):
        encode(model, images, out, batch_size=3, checkpoint_rows=1, **RUN)
    monkeypatch.undo()
    # rewrite the journal as a run of an earlier ghindex wrote it: no "confidences" in the header, bare codes
    path = f"{out}.partial.journal"
    journal = Journal(path, str(out))
    records = [(kind, meta, blob) for kind, meta, blob, _ in journal.records()]
    journal.truncate(0)
    for kind, meta, blob in records:
        if kind == Journal.HEADER:
            assert meta.pop("confidences") is True
        elif kind == Journal.CHUNK:
            blob = np.frombuffer(blob, np.uint8).reshape(-1, 3 * 4)[:, :4].tobytes()  # 32 bits: 4 bytes a code
        journal.write(kind, meta, blob)
    journal.close()
    assert sum(kind == Journal.CHUNK for kind, _, _ in records) >= 1  # something to replay
    encode(model, images, out, resume=True, batch_size=3, **RUN)
    with CodeStore.open(out) as s:
        assert not s.has_confidences
        np.testing.assert_array_equal(s.codes(), direct(model, s.paths(), 0)[0])
