"""Searching by stored id: codes from memory (`ghindex.index.lookup`), the item itself first among its
ties or left out (`exclude_self`), in `query` and `ghindex query`."""
import json

import numpy as np
import pytest

from ghindex.errors import ConfigError
from ghindex.hashing import hamming_distances
from ghindex.index import Index, build
from ghindex.index.lookup import CodesById
from ghindex.lifecycle import remove
from ghindex.query import query
from ghindex.store import CodeStore
from ghindex_cli.main import cli

COPIES_OF = 40  #: row whose code rows 5, 12 and 30 copy: three exact copies stored before it
COPIES = (5, 12, 30)


def write_store(path, codes, ids):
    with CodeStore.create(path, codes.shape[1] * 8) as store:
        store.append(codes, ids)
        store.mark_complete()
    return path


@pytest.fixture
def copies(tmp_path):
    """200 random 32-bit codes with ids 500.. (row 40 copied at rows 5, 12, 30), a flat and an IVF index."""
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, (200, 4), dtype=np.uint8)
    codes[list(COPIES)] = codes[COPIES_OF]
    ids = np.arange(200) + 500
    store = write_store(tmp_path / "db.h5", codes, ids)
    build(store, tmp_path / "flat", index_key="BFlat", gpu="off")
    build(store, tmp_path / "ivf", index_key="BIVF2", index_param=["nprobe=2"], gpu="off")
    return dict(store=store, codes=codes, ids=ids, flat=tmp_path / "flat", ivf=tmp_path / "ivf", tmp=tmp_path)


def database_order(codes, ids, row):
    """(id, distance) of every stored code by distance, ties by database position: `eval`'s rule."""
    dist = hamming_distances(codes[row][None], codes)[0]
    order = np.argsort(dist, kind="stable")
    return [(int(ids[j]), int(dist[j])) for j in order]


def got(result):
    return [(n["id"], n["distance"]) for n in result["neighbors"]]


# the IVF index searches every list (exact distances) but returns ties at its k-th distance in its own
# order: its k stays within the exact copies
@pytest.mark.parametrize("kind, k", [("flat", 2), ("flat", 3), ("flat", 4), ("flat", 7), ("ivf", 2), ("ivf", 3)])
def test_the_item_comes_first_among_its_copies_or_is_left_out(copies, kind, k):
    s = copies
    own = int(s["ids"][COPIES_OF])
    ranked = database_order(s["codes"], s["ids"], COPIES_OF)
    assert ranked[:4] == [(505, 0), (512, 0), (530, 0), (own, 0)]  # its copies come before it in the database
    others = [pair for pair in ranked if pair[0] != own]
    first, = query(s[kind], ids=[own], k=k)
    assert got(first) == ([(own, 0)] + others)[:k]  # itself first, then its copies in database order
    assert [n["rank"] for n in first["neighbors"]] == list(range(1, k + 1))
    alone, = query(s[kind], ids=[own], k=k, exclude_self=True)
    assert got(alone) == others[:k]  # exactly the item is gone, still k neighbours
    # a copy stored before the item: itself first too, the rest keeps database order
    copy, = query(s[kind], ids=[505], k=k)
    assert got(copy) == ([(505, 0)] + [pair for pair in ranked if pair[0] != 505])[:k]


def test_exclude_self_with_a_radius_and_the_other_queries_of_a_call(copies):
    s = copies
    plain_row = 100
    results = query(s["flat"], ids=[540, 600], k=5, radius=0, exclude_self=True)
    assert got(results[0]) == [(505, 0), (512, 0), (530, 0)]
    want = [pair for pair in database_order(s["codes"], s["ids"], plain_row) if pair[0] != 600 and pair[1] == 0]
    assert got(results[1]) == want[:5]
    with pytest.raises(ConfigError, match="queries by id only"):
        query(s["flat"], codes=s["store"], exclude_self=True)


def test_a_removed_id_is_still_searched_with_its_stored_code_and_is_not_its_own_neighbour(copies):
    s = copies
    remove(s["flat"], ids=[540])
    ranked = [pair for pair in database_order(s["codes"], s["ids"], COPIES_OF) if pair[0] != 540]
    for exclude_self in (False, True):
        result, = query(s["flat"], ids=[540], k=4, exclude_self=exclude_self)
        assert got(result) == ranked[:4]


def test_query_cli_exclude_self(runner, copies):
    s = copies
    base = ["query", "--index", str(s["flat"]), "--ids", "540", "-k", "3", "--format", "json"]
    result = runner.invoke(cli, base)
    assert result.exit_code == 0, result.output
    assert [n["id"] for n in json.loads(result.stdout)["neighbors"]] == [540, 505, 512]
    result = runner.invoke(cli, base + ["--exclude-self"])
    assert result.exit_code == 0, result.output
    assert [n["id"] for n in json.loads(result.stdout)["neighbors"]] == [505, 512, 530]
    result = runner.invoke(cli, ["query", "--index", str(s["flat"]), "--codes", str(s["store"]), "--exclude-self"])
    assert result.exit_code == 1 and result.stderr.startswith("Error: exclude_self")


# ---- --radius auto: the copy radius the code store recorded from its model -------------------------
def flip(code, positions):
    code = code.copy()
    for b in positions:
        code[b // 8] ^= np.uint8(1 << (b % 8))
    return code


@pytest.fixture
def recorded(copies):
    """The copies' codes with near-copies of row 40 (2 and 5 bits off) in a store that records
    copy_radius 3 (as `ghindex encode` writes it), indexed; and one that records none."""
    s = copies
    codes = s["codes"].copy()
    codes[60], codes[61] = flip(codes[COPIES_OF], [0, 9]), flip(codes[COPIES_OF], [1, 2, 3, 17, 30])
    with CodeStore.create(s["tmp"] / "r.h5", 32, attrs={"copy_radius": 3}) as store:
        store.append(codes, s["ids"])
        store.mark_complete()
    build(s["tmp"] / "r.h5", s["tmp"] / "r", index_key="BFlat", gpu="off")
    build(write_store(s["tmp"] / "plain.h5", codes, s["ids"]), s["tmp"] / "plain", index_key="BFlat", gpu="off")
    return dict(s, index=s["tmp"] / "r", plain=s["tmp"] / "plain", codes=codes)


def test_radius_auto_is_the_recorded_copy_radius(recorded):
    s = recorded
    own = int(s["ids"][COPIES_OF])
    auto, = query(s["index"], ids=[own], k=10, radius="auto")
    three, = query(s["index"], ids=[own], k=10, radius=3)
    assert got(auto) == got(three) == [(own, 0), (505, 0), (512, 0), (530, 0), (560, 2)]  # 561 is 5 bits off
    wider, = query(s["index"], ids=[own], k=10, radius=5)
    assert (561, 5) in got(wider)
    with pytest.raises(ConfigError, match="records no copy radius.*--radius N"):
        query(s["plain"], ids=[own], radius="auto")
    with pytest.raises(ConfigError, match="or 'auto'"):
        query(s["index"], ids=[own], radius="near")


def test_query_cli_radius_auto(runner, recorded):
    s = recorded
    base = ["query", "--ids", "540", "-k", "10", "--format", "json", "--radius"]
    result = runner.invoke(cli, base[:1] + ["--index", str(s["index"])] + base[1:] + ["auto"])
    assert result.exit_code == 0, result.output
    assert [n["id"] for n in json.loads(result.stdout)["neighbors"]] == [540, 505, 512, 530, 560]
    result = runner.invoke(cli, base[:1] + ["--index", str(s["plain"])] + base[1:] + ["auto"])
    last = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 1 and last.startswith("Error: ") and "--radius N" in last
    assert "Traceback" not in result.output
    result = runner.invoke(cli, base[:1] + ["--index", str(s["index"])] + base[1:] + ["near"])
    assert result.exit_code == 2 and "'auto'" in result.output


# ---- CodesById -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_codes_by_id_equal_the_stored_codes(copies, kind):
    s = copies
    index = Index.load(s[kind], gpu="off")
    with CodeStore.open(s["store"]) as store:
        lookup = CodesById(index, store)
        pick = np.array([699, 500, 540, 541, 600])
        found = lookup(pick)
        np.testing.assert_array_equal(found.codes, s["codes"][pick - 500])
        np.testing.assert_array_equal(found.rows, pick - 500)
        assert found.in_index.all()
        assert lookup([]).codes.shape == (0, 4)
        for unknown in (499, -1, 2 ** 70):
            with pytest.raises(ConfigError, match=f"id {unknown} is not in code store"):
                lookup([500, unknown])


def test_codes_by_id_from_a_flat_index_with_ids_out_of_order_and_after_it_changed(copies):
    s = copies
    order = np.random.default_rng(1).permutation(200)  # ids do not ascend with positions
    store = write_store(s["tmp"] / "shuffled.h5", s["codes"][order], s["ids"][order])
    build(store, s["tmp"] / "shuffled", index_key="BFlat", gpu="off")
    index = Index.load(s["tmp"] / "shuffled", gpu="off")
    with CodeStore.open(store) as opened:
        lookup = CodesById(index, opened)
        np.testing.assert_array_equal(lookup(s["ids"]).codes, s["codes"])
        # the index changes under the lookup: an id it no longer holds comes from the store, and
        # the others still find their codes
        index.remove([600, 601])
        found = lookup(s["ids"])
        np.testing.assert_array_equal(found.codes, s["codes"])
        assert sorted(s["ids"][~found.in_index].tolist()) == [600, 601]
