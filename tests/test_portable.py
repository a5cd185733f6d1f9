"""Portable outputs (issue 15): a folder holding images, code stores and an index keeps working after it is
copied or moved, because the index records its store relative to itself and a store its images relative
to a root it records relative to itself. Old files (absolute paths only) keep working; `ghindex info`
shows each link and whether it resolves; `--root` points a store at images that moved on their own.
"""
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ghindex.encode import encode
from ghindex.encoder import Encoder
from ghindex.evaluate import evaluate
from ghindex.index import Index, build, describe_index
from ghindex.index.files import store_path_of
from ghindex.query import Searcher, query
from ghindex.store import CodeStore
from ghindex_cli.main import cli

CLASSES = ("red", "green", "blue")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
QUIET = dict(device="cpu", progress=False)


def _image(path: Path, colour, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """SITE/data/{db,q}/<class>/*.png, SITE/work/{model.ghm, db.h5, q.h5, index}: the README's layout."""
    rng = np.random.default_rng(0)
    site = tmp_path_factory.mktemp("portable") / "site"
    for c in CLASSES:
        for i in range(4):
            _image(site / "data" / "db" / c / f"{i}.png", COLOURS[c], rng)
        _image(site / "data" / "q" / c / "0.png", COLOURS[c], rng)
    work = site / "work"
    work.mkdir()
    torch.manual_seed(0)
    Encoder("smallcnn", 16, image_size=16).save(work / "model.ghm")
    encode(work / "model.ghm", site / "data" / "db", work / "db.h5", **QUIET)
    encode(work / "model.ghm", site / "data" / "q", work / "q.h5", **QUIET)
    build(work / "db.h5", work / "index", index_key="BFlat", gpu="off")
    return site


@pytest.fixture
def moved(site, tmp_path):
    """`cp -r` of the site to another place, then the original renamed away (what `mv` or `rsync` to
    another machine leaves): nothing can be found at the recorded absolute paths."""
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(site, copy)
    gone = site.with_name("site-gone")
    site.rename(gone)
    try:
        yield copy
    finally:
        gone.rename(site)


def run(runner, *args):
    result = runner.invoke(cli, ["-q", *map(os.fspath, args)])
    assert result.exit_code == 0, (args, result.output, result.exception)
    assert "Traceback" not in result.output
    return result.stdout


def test_store_records_relative_paths_and_resolves_them(site):
    with h5py.File(site / "work" / "db.h5", "r") as f:
        assert f.attrs["format_version"] == 2
        assert f.attrs["paths_root"] == os.path.join("..", "data", "db")
        assert f.attrs["paths_root_absolute"] == str(site / "data" / "db")
        stored = [p.decode() for p in f["paths"][:3]]
    assert stored == [os.path.join("blue", f"{i}.png") for i in range(3)]  # sorted class order
    with CodeStore.open(site / "work" / "db.h5") as s:
        assert s.paths()[:3] == [str(site / "data" / "db" / "blue" / f"{i}.png") for i in range(3)]
        assert s.read(0, 2).paths == s.paths()[:2]
        assert s.resolved_paths([1, -1, 0]) == [s.paths()[1], None, s.paths()[0]]
        assert s.resolved_paths([0], root="/other")[0] == os.path.join("/other", "blue", "0.png")
        link = s.images_link()
        assert link["recorded"] == os.path.join("..", "data", "db") and link["exists"]
        assert link["resolved"] == str(site / "data" / "db")
    meta = json.loads((site / "work" / "index" / "meta.json").read_text())
    assert meta["store_relpath"] == os.path.join("..", "db.h5")
    assert meta["store_path"] == str(site / "work" / "db.h5")


def test_paths_outside_the_root_stay_absolute(tmp_path, rng):
    (tmp_path / "root").mkdir()
    with CodeStore.create(tmp_path / "s.h5", 8, with_paths=True, paths_root=tmp_path / "root") as s:
        s.append(np.zeros((3, 1), np.uint8), [0, 1, 2],
                 paths=[str(tmp_path / "root" / "a.png"), "/elsewhere/b.png", str(tmp_path / "root" / "x" / ".." / "c.png")])
        s.add_skipped([3], [str(tmp_path / "root" / "bad.png")], ["not an image"])
        s.mark_complete()
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert [p.decode() for p in f["paths"][:]] == ["a.png", "/elsewhere/b.png", "c.png"]
        assert f["skipped/path"][0].decode() == "bad.png"
    shutil.move(tmp_path / "s.h5", tmp_path / "root" / "s.h5")  # recorded relative root no longer there ...
    with CodeStore.open(tmp_path / "root" / "s.h5") as s:  # ... so the recorded absolute one is used
        assert s.paths() == [str(tmp_path / "root" / "a.png"), "/elsewhere/b.png", str(tmp_path / "root" / "c.png")]
        assert s.skipped()[0]["path"] == str(tmp_path / "root" / "bad.png")
    with CodeStore.open(tmp_path / "root" / "s.h5", root="/new") as s:
        assert s.paths() == ["/new/a.png", "/elsewhere/b.png", "/new/c.png"]


def test_copied_folder_query_eval_grid_info_work(moved, runner):
    work = moved / "work"
    # query by id, with paths (the store and its images are found next to the index)
    results = [json.loads(line) for line in run(runner, "query", "--index", work / "index", "--ids", "0,5",
                                                "-k", "4", "--format", "json").splitlines()]
    assert [r["query_id"] for r in results] == [0, 5]
    for r in results:
        assert r["query_path"].startswith(str(moved / "data" / "db")) and os.path.isfile(r["query_path"])
        assert len(r["neighbors"]) == 4
        for n in r["neighbors"]:
            assert n["path"].startswith(str(moved / "data" / "db")) and os.path.isfile(n["path"])
            assert n["label_name"] in CLASSES
    # the grid reads every image it shows: query codes from the copied query store, neighbours' images
    run(runner, "query", "--index", work / "index", "--codes", work / "q.h5", "-k", "3", "--grid", work / "grid.png")
    assert (work / "grid.png").read_bytes()[:4] == b"\x89PNG"
    for r in query(work / "index", codes=work / "q.h5", k=3, gpu="off"):
        assert os.path.isfile(r["query_path"]) and all(os.path.isfile(n["path"]) for n in r["neighbors"])
    # eval through the index: the database is the index's store, found next to it
    run(runner, "eval", "--queries", work / "q.h5", "--index", work / "index", "--report", work / "report.json",
        "--plot", work / "eval")
    report = json.loads((work / "report.json").read_text())
    assert report["database"]["path"] == str(work / "db.h5")
    assert evaluate(work / "q.h5", index=work / "index")["metrics"]["map"] == report["metrics"]["map"]
    # info shows each link, where it leads and that it resolves
    index_info = run(runner, "info", work / "index")
    assert f"link.store           {os.path.join('..', 'db.h5')} -> {work / 'db.h5'} (found)" in index_info
    assert describe_index(work / "index")["store_path"] == str(work / "db.h5")
    store_info = run(runner, "info", work / "db.h5")
    assert f"{os.path.join('..', 'data', 'db')} -> {moved / 'data' / 'db'} (found)" in store_info
    # the service's path: a Searcher resolves the same way (one function each: store_path_of, CodeStore paths)
    with Searcher(work / "index", gpu="off") as searcher:
        assert searcher.store_path == str(work / "db.h5")
        assert os.path.isfile(searcher.item(3)["path"])


def test_root_option_finds_images_moved_on_their_own(moved, runner):
    (moved / "data").rename(moved / "pictures")
    work = moved / "work"
    store_info = run(runner, "info", work / "db.h5")
    assert "(missing)" in [line for line in store_info.splitlines() if line.startswith("link.images")][0]
    lost = json.loads(run(runner, "query", "--index", work / "index", "--ids", "2", "-k", "1", "--format", "json"))
    assert not os.path.exists(lost["query_path"])
    found = json.loads(run(runner, "query", "--index", work / "index", "--ids", "2", "-k", "1", "--format", "json",
                           "--root", moved / "pictures" / "db"))
    assert found["query_path"] == str(moved / "pictures" / "db" / Path(lost["query_path"]).relative_to(moved / "data" / "db"))
    assert os.path.isfile(found["query_path"]) and os.path.isfile(found["neighbors"][0]["path"])
    with Searcher(work / "index", gpu="off", root=moved / "pictures" / "db") as searcher:
        assert os.path.isfile(searcher.item(2)["path"])


def test_index_moved_alone_uses_the_recorded_absolute_store(site, tmp_path, runner):
    shutil.copytree(site, tmp_path / "s")
    shutil.move(tmp_path / "s" / "work" / "index", tmp_path / "index-alone")
    meta = json.loads((tmp_path / "index-alone" / "meta.json").read_text())
    meta["store_path"] = str(tmp_path / "s" / "work" / "db.h5")  # where this copy's store is
    (tmp_path / "index-alone" / "meta.json").write_text(json.dumps(meta))
    assert store_path_of(tmp_path / "index-alone", meta) == str(tmp_path / "s" / "work" / "db.h5")
    result = json.loads(run(runner, "query", "--index", tmp_path / "index-alone", "--ids", "1", "-k", "2",
                            "--format", "json"))
    assert os.path.isfile(result["query_path"])
    info = run(runner, "info", tmp_path / "index-alone")
    assert f"-> {tmp_path / 's' / 'work' / 'db.h5'} (found)" in info


def test_saving_an_index_elsewhere_relinks_its_store(site, tmp_path):
    index = Index.load(site / "work" / "index", gpu="off")
    index.save(tmp_path / "deep" / "er" / "idx")
    meta = json.loads((tmp_path / "deep" / "er" / "idx" / "meta.json").read_text())
    assert meta["store_path"] == str(site / "work" / "db.h5")
    assert os.path.normpath(tmp_path / "deep" / "er" / "idx" / meta["store_relpath"]) == str(site / "work" / "db.h5")
    assert index.meta["store_relpath"] == meta["store_relpath"]


def test_old_absolute_only_files_keep_working(tmp_path, runner, rng):
    """A version-1 store (absolute paths) and an index whose meta has only `store_path`, as written before."""
    images = [tmp_path / "img" / f"{i}.png" for i in range(5)]
    for p in images:
        _image(p, (100, 100, 100), rng)
    with CodeStore.create(tmp_path / "old.h5", 16, label_shape=(), with_paths=True) as s:
        s.append(rng.integers(0, 256, (5, 2), dtype=np.uint8), np.arange(5), labels=np.zeros(5, int),
                 paths=[str(p) for p in images])
        s.mark_complete()
    build(tmp_path / "old.h5", tmp_path / "index", gpu="off")
    meta_file = tmp_path / "index" / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["store_relpath"]
    meta_file.write_text(json.dumps(meta))
    with h5py.File(tmp_path / "old.h5", "r") as f:
        assert f.attrs["format_version"] == 1 and "paths_root" not in f.attrs
    result = json.loads(run(runner, "query", "--index", tmp_path / "index", "--ids", "3", "-k", "5",
                            "--format", "json"))
    assert result["query_path"] == str(images[3]) and {n["path"] for n in result["neighbors"]} == set(map(str, images))
    info = run(runner, "info", tmp_path / "index")
    assert f"link.store           {tmp_path / 'old.h5'} (found)" in info
    store_info = json.loads(run(runner, "info", tmp_path / "old.h5", "--format", "json"))
    assert store_info["paths"] and not store_info["paths_relative"] and store_info["images_link"] is None
    with CodeStore.open(tmp_path / "old.h5", root="/ignored") as s:  # nothing relative to re-root
        assert s.paths() == [str(p) for p in images]


def test_missing_store_is_named_where_it_was_looked_for(moved, runner):
    (moved / "work" / "db.h5").unlink()
    result = runner.invoke(cli, ["-q", "query", "--index", str(moved / "work" / "index"), "--ids", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert str(moved / "work" / "db.h5") in result.stderr
    assert "(missing)" in run(runner, "info", moved / "work" / "index")


def test_info_output_ends_with_one_newline(site, runner):
    for path in (site / "work" / "db.h5", site / "work" / "model.ghm", site / "work" / "index"):
        for fmt in ("text", "json"):
            out = run(runner, "info", path, "--format", fmt)
            assert out.endswith("\n") and not out.endswith("\n\n"), (path, fmt)


def test_service_serves_thumbnails_from_a_moved_folder(moved):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ghindex.serve import create_app

    work = moved / "work"
    with TestClient(create_app(work / "index", work / "model.ghm", gpu="off", device="cpu")) as client:
        item = client.get("/api/items/2").json()
        assert item["path"].startswith(str(moved)) and os.path.isfile(item["path"])
        image = client.get("/api/items/2/image")
        assert image.status_code == 200 and image.headers["content-type"].startswith("image/")
    (moved / "data").rename(moved / "pictures")
    with TestClient(create_app(work / "index", gpu="off", root=moved / "pictures" / "db")) as client:
        assert client.get("/api/items/2/image").status_code == 200
