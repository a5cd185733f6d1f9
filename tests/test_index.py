"""FAISS binary indexes: exactness against numpy, padding, ids, range search, files, GPU guards, CLI."""
import json
import logging

import faiss
import numpy as np
import pytest

from ghindex.errors import ConfigError, IndexFileError, SearchError, StoreError
from ghindex.hashing import hamming_distances
from ghindex.index import (
    Index,
    auto_index_key,
    auto_nlist,
    build,
    build_from_arrays,
    describe_index,
    estimate_memory,
    gpu_count,
    pad_codes,
    padded_width,
    parse_index_key,
    parse_size,
    resolve_index_key,
)
from ghindex.io import file_fingerprint
from ghindex.store import CodeStore
from ghindex_cli.main import cli

NO_GPU = gpu_count() == 0


def random_codes(rng, n, bits):
    return rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)


def clustered_codes(rng, n, bits, centres=20, flip=0.08):
    """Codes near a few centres (bit flips with probability `flip`): many close neighbours and ties.
    Take queries from the same call as their database, so they share its centres."""
    centre_codes = rng.integers(0, 2, size=(centres, bits), dtype=np.uint8)
    bits01 = centre_codes[rng.integers(0, centres, n)] ^ (rng.random((n, bits)) < flip)
    return np.packbits(bits01.astype(bool), axis=1, bitorder="little")


def make_store(path, codes, ids=None, encoder_fingerprint="ab" * 32):
    ids = np.arange(len(codes)) if ids is None else ids
    with CodeStore.create(path, codes.shape[1] * 8, encoder_fingerprint=encoder_fingerprint) as store:
        store.append(codes, ids)
        store.mark_complete()
    return path


def assert_knn_exact(queries, database, db_ids, distances, ids):
    """Distances are the k smallest true distances (as multisets), and each id has its claimed distance."""
    true = hamming_distances(queries, database)
    k = distances.shape[1]
    np.testing.assert_array_equal(distances, np.sort(true, axis=1)[:, :k])
    position = {int(i): p for p, i in enumerate(db_ids)}
    claimed = np.array([[true[q, position[int(i)]] for i in row] for q, row in enumerate(ids)])
    np.testing.assert_array_equal(claimed, distances)
    for row in ids:
        assert len(set(row.tolist())) == k


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("bits", [8, 16, 24, 48, 64, 96, 128, 160, 256, 520])
def test_flat_equals_numpy_brute_force(rng, bits):
    database, queries = np.split(clustered_codes(rng, 640, bits), [600])
    db_ids = rng.permutation(10_000)[:600] * 7 + 3
    index = build_from_arrays(database, db_ids, index_key="BFlat")
    assert index.padded_bytes == padded_width(bits // 8) and index.code_bytes == bits // 8
    assert faiss.downcast_IndexBinary(index.faiss_index.index).query_batch_size == 1024
    distances, ids = index.search(queries, 15)
    assert distances.dtype == np.int32 and ids.dtype == np.int64 and distances.shape == (40, 15)
    assert_knn_exact(queries, database, db_ids, distances, ids)


def test_padding_to_fast_width_keeps_distances(rng):
    assert [padded_width(w) for w in (1, 3, 4, 5, 6, 9, 12, 17, 20, 21, 24, 40, 64, 65, 96)] == \
        [4, 4, 4, 8, 8, 16, 16, 20, 20, 32, 32, 64, 64, 65, 96]
    codes = random_codes(rng, 300, 48)
    padded = pad_codes(codes, 8)
    assert padded.shape == (300, 8) and not padded[:, 6:].any()
    np.testing.assert_array_equal(hamming_distances(padded[:20], padded), hamming_distances(codes[:20], codes))
    # the same search through ghindex (padded to 8 bytes) and a bare 48-bit FAISS index (generic kernel)
    bare = faiss.IndexBinaryFlat(48)
    bare.add(codes)
    bare_d, _ = bare.search(codes[:50], 20)
    ours_d, _ = build_from_arrays(codes, index_key="BFlat").search(codes[:50], 20)
    np.testing.assert_array_equal(ours_d, bare_d)


def test_ivf_with_nprobe_nlist_equals_flat(rng):
    database, queries = np.split(clustered_codes(rng, 4050, 64), [4000])
    flat_d, _ = build_from_arrays(database, index_key="BFlat").search(queries, 10)
    ivf = build_from_arrays(database, index_key="BIVF32")
    assert ivf.nprobe == 1  # default nlist // 32, at least 1
    ivf.nprobe = 32
    ivf_d, ivf_i = ivf.search(queries, 10)
    np.testing.assert_array_equal(ivf_d, flat_d)
    assert_knn_exact(queries, database, np.arange(4000), ivf_d, ivf_i)


def test_k_beyond_ntotal_and_unfilled_slots(rng):
    database = random_codes(rng, 30, 64)
    distances, ids = build_from_arrays(database).search(database[:3], 100)
    assert distances.shape == (3, 30) and (ids >= 0).all()  # k clamped to what exists
    # a hash index only looks in the query's bucket: the rest are fillers, shown as -1 / -1
    distances, ids = build_from_arrays(database, index_key="BHash16").search(database[:3], 5)
    assert (ids[:, 0] == [0, 1, 2]).all() and (distances[:, 0] == 0).all()
    assert (ids[:, 1:] == -1).all() and (distances[:, 1:] == -1).all()
    hnsw = build_from_arrays(database[:5], index_key="BHNSW8")
    distances, ids = hnsw.search(database[:2], 5)
    assert (distances[ids < 0] == -1).all() and (distances[ids >= 0] >= 0).all()


@pytest.mark.parametrize("key", ["BFlat", "BIVF8", "BHash8"])
def test_range_search_is_distance_at_most_radius(rng, key):
    database, queries = np.split(clustered_codes(rng, 1530, 64, centres=5, flip=0.1), [1500])
    db_ids = np.arange(1500) * 2 + 1
    index = build_from_arrays(database, db_ids, index_key=key)
    if key == "BIVF8":
        index.nprobe = 8
    true = hamming_distances(queries, database)
    assert (true == 9).sum() > 100 and (true <= 5).sum() > 10  # items right at the radius exist
    for radius in (0, 5, 9, 12, 64):
        lims, distances, ids = index.range_search(queries, radius)
        assert lims.shape == (31,) and lims.dtype == np.int64 and distances.dtype == np.int32
        for q in range(30):
            got_ids, got_d = ids[lims[q]:lims[q + 1]], distances[lims[q]:lims[q + 1]]
            if key == "BHash8":  # only the query's 8-bit bucket is searched: a subset, but exact in it
                assert set(got_ids.tolist()) <= set(db_ids[true[q] <= radius].tolist())
                np.testing.assert_array_equal(true[q][(got_ids - 1) // 2], got_d)
                continue
            assert set(got_ids.tolist()) == set(db_ids[true[q] <= radius].tolist())
            np.testing.assert_array_equal(true[q][(got_ids - 1) // 2], got_d)
            assert np.all(np.diff(got_d) >= 0)  # sorted by distance
    assert (np.diff(index.range_search(queries, 64)[0]) == 1500).all() or key == "BHash8"


def test_range_search_refused_on_hnsw_and_bad_radius(rng):
    index = build_from_arrays(random_codes(rng, 100, 64), index_key="BHNSW8")
    with pytest.raises(SearchError, match="no range search"):
        index.range_search(random_codes(rng, 2, 64), 3)
    flat = build_from_arrays(random_codes(rng, 100, 64))
    for bad in (-1, 2.5, True):
        with pytest.raises(SearchError, match="radius"):
            flat.range_search(random_codes(rng, 2, 64), bad)


# -------------------------------------------------------------------------------- wrong input
def test_wrong_width_or_bits_is_a_clear_error(rng):
    index = build_from_arrays(random_codes(rng, 100, 48))
    with pytest.raises(SearchError, match=r"8 bytes \(64 bits\) wide but the index holds 6-byte \(48-bit\)"):
        index.search(random_codes(rng, 3, 64), 5)
    with pytest.raises(SearchError, match="uint8"):
        index.search(np.ones((3, 48), dtype=np.float32), 5)
    with pytest.raises(SearchError, match="k must be"):
        index.search(random_codes(rng, 3, 48), 0)
    with pytest.raises(SearchError, match="bytes"):
        index.add(random_codes(rng, 3, 32), [1, 2, 3])
    with pytest.raises(ConfigError, match="multiple of 8"):
        build_from_arrays(random_codes(rng, 100, 48), bits=44)
    with pytest.raises(ConfigError, match="does not match"):
        build_from_arrays(random_codes(rng, 100, 48), bits=40)
    with pytest.raises(ConfigError, match="ids must be >= 0"):
        build_from_arrays(random_codes(rng, 10, 48), ids=np.arange(10) - 1)
    with pytest.raises(StoreError, match="unique"):
        build_from_arrays(random_codes(rng, 10, 48), ids=np.zeros(10, dtype=np.int64))
    # a single code is accepted as one query
    distances, ids = index.search(random_codes(rng, 1, 48)[0], 2)
    assert distances.shape == (1, 2)


@pytest.mark.parametrize("key", ["BIVF64,Flat", "BIVF16xyz", "BHNSW", "BHNSW1", "IDMap2,BFlat", "Flat",
                                 "BHash100", "BHash4x20", "bflat", "BIVF0", "BIVF-3"])
def test_bad_index_keys_are_refused(key):
    with pytest.raises(ConfigError):
        parse_index_key(key, 64)


def test_index_keys_and_auto_choices():
    assert parse_index_key("BIVF1024_HNSW16", 64).key == "BIVF1024_HNSW16"
    assert parse_index_key("BHash2x16", 64).kind == "multihash"
    assert auto_index_key(5000) == "BFlat" and auto_index_key(10_000_000).startswith("BIVF")
    assert resolve_index_key("BIVF", 100_000, 64).nlist == auto_nlist(100_000) == 256
    assert auto_nlist(1000) * 39 <= 1000  # adjusted so every list gets 39 training points
    with pytest.raises(ConfigError, match="needs at least 159,744 codes to train"):
        resolve_index_key("BIVF4096", 10_000, 64)
    assert parse_size("8G") == 8 << 30 and parse_size("512MiB") == 512 << 20 and parse_size(100) == 100
    with pytest.raises(ConfigError):
        parse_size("lots")
    flat = estimate_memory(parse_index_key("BFlat", 48), 10**6, 48)
    assert flat["resident"] == 10**6 * (8 + 8) and flat["peak"] > flat["resident"]


def test_index_params(rng):
    codes = clustered_codes(rng, 3000, 64)
    ivf = build_from_arrays(codes, index_key="BIVF16", index_param=["nprobe=4", "train_size=1000",
                                                                     "kmeans_iters=5"])
    assert ivf.nprobe == 4 and ivf.meta["train_size"] == 1000
    hnsw = build_from_arrays(codes, index_key="BHNSW8", index_param=["efSearch=77"])
    assert hnsw.faiss_index.index is not None and faiss.downcast_IndexBinary(hnsw.faiss_index.index).hnsw.efSearch == 77
    with pytest.raises(ConfigError, match="does not apply"):
        build_from_arrays(codes, index_key="BFlat", index_param=["nprobe=4"])
    with pytest.raises(ConfigError, match="exceeds nlist"):
        build_from_arrays(codes, index_key="BIVF16", index_param=["nprobe=17"])
    with pytest.raises(ConfigError, match="name=value"):
        build_from_arrays(codes, index_key="BIVF16", index_param=["nprobe"])
    with pytest.raises(ConfigError, match="below 39 points per list"):
        build_from_arrays(codes, index_key="BIVF16", index_param=["train_size=100"])
    with pytest.raises(ConfigError, match="IVF indexes only"):
        build_from_arrays(codes).nprobe = 3
    with pytest.raises(ConfigError, match="nprobe must be"):
        ivf.nprobe = 0


# ------------------------------------------------------------------------ store, files, ids
@pytest.mark.parametrize("key", ["BFlat", "BIVF16", "BHNSW8", "BHash12", "BHash2x12"])
def test_ids_survive_build_save_load(tmp_path, rng, key):
    codes = clustered_codes(rng, 2000, 48)
    ids = rng.choice(10**12, size=2000, replace=False)
    store = make_store(tmp_path / "codes.h5", codes, ids)
    meta = build(store, tmp_path / "index", index_key=key, chunk_rows=300)
    assert meta["ntotal"] == 2000 and meta["index_key"] == key and meta["padded_bytes"] == 8
    index = Index.load(tmp_path / "index", gpu="off")
    distances, found = index.search(codes[:20], 1)
    np.testing.assert_array_equal(found[:, 0], ids[:20])  # exact duplicates of the queries
    assert (distances[:, 0] == 0).all()
    if key == "BFlat":
        assert faiss.downcast_IndexBinary(index.faiss_index.index).query_batch_size == 1024  # not saved by FAISS
        loaded_d, loaded_i = index.search(codes[:50], 10)
        assert_knn_exact(codes[:50], codes, ids, loaded_d, loaded_i)


def test_meta_and_describe_index(tmp_path, rng):
    codes = random_codes(rng, 500, 64)
    store = make_store(tmp_path / "codes.h5", codes, encoder_fingerprint="cd" * 32)
    build(store, tmp_path / "index", index_key="BIVF8", index_param=["nprobe=3"])
    info = describe_index(tmp_path / "index")
    assert info["kind"] == "index" and info["index_key"] == "BIVF8" and info["ntotal"] == 500
    assert info["bits"] == 64 and info["padded_bytes"] == 8 and info["params"] == {"nprobe": 3}
    assert info["store_fingerprint"] == file_fingerprint(store)
    assert info["encoder_fingerprint"] == "cd" * 32
    assert info["store_path"] == str(store.resolve()) and info["index_file_bytes"] > 500 * 8
    assert Index.load(tmp_path / "index").nprobe == 3


def test_output_is_never_clobbered_or_half_written(tmp_path, rng):
    store = make_store(tmp_path / "codes.h5", random_codes(rng, 200, 32))
    out = tmp_path / "index"
    build(store, out)
    with pytest.raises(IndexFileError, match="already exists"):
        build(store, out)
    build(store, out, index_key="BHNSW8", overwrite=True)
    assert describe_index(out)["index_key"] == "BHNSW8"
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(IndexFileError, match="not a ghindex index"):
        build(store, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    # a failing build leaves nothing behind
    with pytest.raises(ConfigError, match="max_memory"):
        build(store, tmp_path / "small", max_memory="1K")
    assert not (tmp_path / "small").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_broken_index_files(tmp_path, rng):
    store = make_store(tmp_path / "codes.h5", random_codes(rng, 100, 64))
    build(store, tmp_path / "index")
    (tmp_path / "index" / "index.faiss").write_bytes(b"not faiss at all")
    with pytest.raises(IndexFileError, match="not a readable FAISS binary index"):
        Index.load(tmp_path / "index")
    with pytest.raises(IndexFileError, match="does not exist"):
        Index.load(tmp_path / "missing")
    with pytest.raises(IndexFileError, match="not an index directory"):
        Index.load(store)
    with pytest.raises(StoreError):
        build(tmp_path / "nope.h5", tmp_path / "i2")


@pytest.mark.parametrize("key", ["BFlat", "BIVF8"])
def test_mmap_load_searches_the_same_and_is_read_only(tmp_path, rng, key):
    codes = clustered_codes(rng, 1000, 64)
    build(make_store(tmp_path / "codes.h5", codes), tmp_path / "index", index_key=key)
    in_ram = Index.load(tmp_path / "index")
    mapped = Index.load(tmp_path / "index", mmap=True)
    for index in (in_ram, mapped):
        if key == "BIVF8":
            index.nprobe = 8
    np.testing.assert_array_equal(in_ram.search(codes[:40], 7)[0], mapped.search(codes[:40], 7)[0])
    with pytest.raises(IndexFileError, match="read-only"):
        mapped.add(codes[:2], [5000, 5001])


@pytest.mark.parametrize("key", ["BFlat", "BIVF8", "BHash12"])
def test_add_then_save_and_load(tmp_path, rng, key):
    codes = clustered_codes(rng, 800, 48)
    index = build_from_arrays(codes[:600], index_key=key)
    index.add(codes[600:], np.arange(600, 800) + 10**9)
    assert index.ntotal == 800
    _, found = index.search(codes[600:610], 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(600, 610) + 10**9)
    index.save(tmp_path / "index")
    loaded = Index.load(tmp_path / "index")
    assert loaded.ntotal == 800 and loaded.meta["ntotal"] == 800
    np.testing.assert_array_equal(loaded.search(codes[600:610], 1)[1], found)
    with pytest.raises(ConfigError, match="unique"):
        index.add(codes[:2], [7, 7])


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU behaviour")
def test_without_gpu_auto_uses_cpu_and_on_fails_cleanly(tmp_path, rng, caplog):
    store = make_store(tmp_path / "codes.h5", random_codes(rng, 100, 64))
    with pytest.raises(ConfigError, match="sees no GPU"):
        build(store, tmp_path / "index", gpu="on")
    assert not (tmp_path / "index").exists()
    with caplog.at_level(logging.INFO, logger="ghindex.index"):
        build(store, tmp_path / "index", gpu="auto")
    assert "no GPU visible to FAISS: building on CPU" in caplog.text
    caplog.clear()
    with pytest.raises(ConfigError, match="sees no GPU"):
        Index.load(tmp_path / "index", gpu="on")
    with caplog.at_level(logging.INFO, logger="ghindex.index"):
        index = Index.load(tmp_path / "index", gpu="auto")
    assert not index.on_gpu and "no GPU visible to FAISS" in caplog.text


@pytest.mark.parametrize("shard", [False, True])
def test_gpu_wrapping_logic_with_a_stand_in_device(monkeypatch, rng, shard):
    """The GPU path (id remapping, shards' successive ids, k limit) with CPU indexes standing in for
    GpuIndexBinaryFlat, so it runs everywhere; real GPUs are checked in the next test."""
    import ghindex.index.gpu as gi  # patched where the names live

    def fake_to_gpu(flat, shard):
        codes = faiss.rev_swig_ptr(flat.xb.data(), flat.ntotal * flat.code_size).reshape(-1, flat.code_size)
        if not shard:
            copy = faiss.IndexBinaryFlat(flat.d)
            copy.add(codes.copy())
            return copy, []
        shards = faiss.IndexBinaryShards(flat.d, True, True)  # threaded, successive ids: as the GPU cloner
        half = flat.ntotal // 2
        for part in (codes[:half], codes[half:]):
            sub = faiss.IndexBinaryFlat(flat.d)
            sub.add(part.copy())
            shards.add_shard(sub)
        return shards, []

    monkeypatch.setattr(gi, "gpu_count", lambda: 2)
    monkeypatch.setattr(gi, "_to_gpu", fake_to_gpu)
    codes = clustered_codes(rng, 2100, 48)
    ids = rng.choice(10**9, 2100, replace=False)
    index = build_from_arrays(codes, ids)
    cpu_d, _ = index.search(codes[:30], 10)
    assert index.to_gpu("on", shard=shard) and index.on_gpu
    gpu_d, gpu_i = index.search(codes[:30], 10)
    np.testing.assert_array_equal(gpu_d, cpu_d)
    assert_knn_exact(codes[:30], codes, ids, gpu_d, gpu_i)
    with pytest.raises(SearchError, match="GPU limit of 2048"):
        index.search(codes[:2], 2049)
    index.add(rng.integers(0, 256, (5, 6), dtype=np.uint8), np.arange(5) + 2 * 10**9)
    assert index.on_gpu and index.search(codes[:1], 1)[1][0, 0] == ids[0]
    ivf = build_from_arrays(codes, index_key="BIVF16")
    assert not ivf.to_gpu("auto")
    with pytest.raises(ConfigError, match="only flat indexes run on GPU"):
        ivf.to_gpu("on")


def test_ivf_training_uses_the_gpu_clustering_index_when_there_is_one(monkeypatch, rng):
    import ghindex.index.gpu as gi  # patched where the names live

    used = []

    def fake_clustering_index(dim):  # a CPU float index stands in for the GPU one k-means assigns with
        index = faiss.IndexFlatL2(dim)
        used.append(dim)
        return index, []

    monkeypatch.setattr(gi, "gpu_count", lambda: 1)
    monkeypatch.setattr(gi, "_gpu_clustering_index", fake_clustering_index)
    codes = clustered_codes(rng, 2000, 48)
    index = build_from_arrays(codes, index_key="BIVF16", gpu="on", index_param=["nprobe=16"])
    assert used == [64]  # built once, for the padded width
    assert index.faiss_index.clustering_index is None  # not left dangling after training
    flat_d, _ = build_from_arrays(codes).search(codes[:20], 5)
    np.testing.assert_array_equal(index.search(codes[:20], 5)[0], flat_d)


@pytest.mark.skipif(NO_GPU, reason="needs faiss-gpu and a CUDA device")
def test_real_gpu_flat_equals_cpu(tmp_path, rng):
    codes = clustered_codes(rng, 5000, 48)
    build(make_store(tmp_path / "codes.h5", codes), tmp_path / "index")
    cpu = Index.load(tmp_path / "index", gpu="off")
    gpu = Index.load(tmp_path / "index", gpu="on")
    mapped = Index.load(tmp_path / "index", mmap=True, gpu="auto")
    assert gpu.on_gpu and mapped.on_gpu and not cpu.on_gpu
    cpu_d, _ = cpu.search(codes[:200], 20)
    for index in (gpu, mapped):
        gpu_d, gpu_i = index.search(codes[:200], 20)
        np.testing.assert_array_equal(gpu_d, cpu_d)
        assert_knn_exact(codes[:200], codes, np.arange(5000), gpu_d, gpu_i)
    with pytest.raises(SearchError, match="2048"):
        gpu.search(codes[:2], 2049)
    lims, distances, ids = gpu.range_search(codes[:5], 6)  # answered by the CPU form
    assert np.array_equal(lims, cpu.range_search(codes[:5], 6)[0])
    gpu.add(codes[:3], [10**9, 10**9 + 1, 10**9 + 2])  # the GPU copy is refreshed
    distances, ids = gpu.search(codes[:1], 2)
    assert distances[0].tolist() == [0, 0] and 10**9 in ids[0]


# ---------------------------------------------------------------------------------------- CLI
def test_cli_build_and_errors(runner, tmp_path, rng):
    codes = clustered_codes(rng, 3000, 48)
    store = make_store(tmp_path / "codes.h5", codes, np.arange(3000) + 100)
    result = runner.invoke(cli, ["build", "--codes", str(store), "--out", str(tmp_path / "flat")])
    assert result.exit_code == 0, result.output
    assert "BFlat" in result.stdout and "3,000" in result.stdout and "searched as 64" in result.stdout
    assert "needs about" in result.stderr  # memory estimate printed before building
    result = runner.invoke(cli, ["build", "--codes", str(store), "--out", str(tmp_path / "ivf"),
                                 "--index-key", "BIVF16", "--index-param", "nprobe=16", "--format", "json"])
    assert result.exit_code == 0, result.output
    meta = json.loads(result.stdout)
    assert meta["index_key"] == "BIVF16" and meta["params"] == {"nprobe": 16} and meta["ntotal"] == 3000
    index = Index.load(tmp_path / "ivf")
    assert index.search(codes[:5], 1)[1][:, 0].tolist() == [100, 101, 102, 103, 104]

    def fails(args, message):
        result = runner.invoke(cli, ["build", "--codes", str(store), *args])
        assert result.exit_code == 1, result.output
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: ") and message in last, result.stderr
        assert "Traceback" not in result.output

    fails(["--out", str(tmp_path / "x"), "--index-key", "BIVF64,Flat"], "unknown index key")
    fails(["--out", str(tmp_path / "x"), "--index-key", "BIVF4096"], "needs at least")
    fails(["--out", str(tmp_path / "x"), "--index-param", "efSearch=3"], "does not apply")
    fails(["--out", str(tmp_path / "x"), "--max-memory", "10K"], "more than max_memory")
    fails(["--out", str(tmp_path / "flat")], "already exists")
    if NO_GPU:
        fails(["--out", str(tmp_path / "x"), "--gpu", "on"], "sees no GPU")
    assert not (tmp_path / "x").exists()
    result = runner.invoke(cli, ["build", "--codes", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "y")])
    assert result.exit_code == 1 and result.stderr.startswith("Error: code store not found")
