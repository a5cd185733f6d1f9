import os

import numpy as np
import pytest
import torch
from PIL import Image

from ghindex.data import (
    ImageDataset, collate, load_data, load_split, protocol_splits, read_list_file,
)
from ghindex.errors import DataError


def _img(path, color=(255, 0, 0), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).convert(mode).save(path)


@pytest.fixture
def folder(tmp_path):
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 255, 0))):
        for i in range(3):
            _img(tmp_path / "f" / cls / f"{i}.png", color)
    (tmp_path / "f" / "cat" / "notes.md").write_text("not an image")
    return tmp_path / "f"


def test_image_folder_labels_in_sorted_class_order(folder):
    src = load_data(folder)
    assert src.kind == "images" and len(src) == 6
    assert src.class_names == ["cat", "dog"]
    assert src.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert all(os.path.isabs(p) for p in src.paths)
    assert src.item_ids.tolist() == list(range(6))


def test_flat_folder_has_no_labels(tmp_path):
    for i in range(2):
        _img(tmp_path / f"{i}.jpg")
    src = load_data(tmp_path)
    assert len(src) == 2 and src.labels is None


def test_list_file_single_and_multi_hot(tmp_path):
    (tmp_path / "single.txt").write_text("# comment\na/1.jpg 3\n\na/2.jpg 0\n")
    src = load_data(tmp_path / "single.txt")
    assert src.labels.tolist() == [3, 0] and not src.multi_label
    assert src.paths[0] == str(tmp_path / "a" / "1.jpg")
    (tmp_path / "multi.txt").write_text("x.jpg 0 1 1\ny.jpg 1 0 0\n")
    src = load_data(tmp_path / "multi.txt", root="/data")
    assert src.multi_label and src.labels.tolist() == [[0, 1, 1], [1, 0, 0]] and src.num_classes == 3
    assert src.paths[1] == "/data/y.jpg"


@pytest.mark.parametrize("text, message", [
    ("a.jpg 1\nb.jpg 1 0\n", "line 2: expected 1 label"),
    ("a.jpg 0 1\nb.jpg 0 2\n", "line 2: multi-hot labels must be 0 or 1"),
    ("a.jpg cat\n", "line 1: labels must be integers"),
    ("# only a comment\n", "has no entries"),
])
def test_list_file_bad_lines_name_the_line(tmp_path, text, message):
    (tmp_path / "l.txt").write_text(text)
    with pytest.raises(DataError, match=message) as info:
        read_list_file(tmp_path / "l.txt")
    assert "l.txt" in str(info.value)


def test_list_file_ids_column(tmp_path):
    (tmp_path / "l.txt").write_text("a.jpg 1001 2\nb.jpg 1002 5\n")
    src = load_data(tmp_path / "l.txt", ids_column=1)
    assert src.item_ids.tolist() == [1001, 1002] and src.labels.tolist() == [2, 5]


def test_array_files(tmp_path):
    feats = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.savez(tmp_path / "a.npz", features=feats, labels=np.arange(5))
    src = load_data(tmp_path / "a.npz")
    assert src.kind == "features" and np.array_equal(src.features, feats) and src.labels.tolist() == [0, 1, 2, 3, 4]
    feats[1, 2] = np.nan
    np.savez(tmp_path / "nan.npz", features=feats)
    with pytest.raises(DataError, match="NaN or inf in 1 row"):
        load_data(tmp_path / "nan.npz")
    np.savez(tmp_path / "nofeat.npz", x=feats)
    with pytest.raises(DataError, match="no 'features'"):
        load_data(tmp_path / "nofeat.npz")


def test_unknown_data_kinds(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data(tmp_path / "missing")
    (tmp_path / "x.csv").write_text("1")
    with pytest.raises(DataError, match="cannot tell what"):
        load_data(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_data(tmp_path / "empty")


def _cifar_like_labels():
    train = np.repeat(np.arange(10), 5000)
    test = np.repeat(np.arange(10), 1000)
    return np.concatenate([train, test]), 50000


def test_cifar10_I_published_sizes_disjoint_and_seeded():
    labels, n_train = _cifar_like_labels()
    s = protocol_splits(labels, n_train, "cifar10-I", seed=0)
    assert (len(s["query"]), len(s["train"]), len(s["database"])) == (1000, 5000, 59000)
    assert np.bincount(labels[s["query"]]).tolist() == [100] * 10
    assert np.bincount(labels[s["train"]]).tolist() == [500] * 10
    assert not set(s["query"]) & set(s["database"])
    assert not set(s["query"]) & set(s["train"])
    assert set(s["train"]) <= set(s["database"])  # training images are part of the database
    again = protocol_splits(labels, n_train, "cifar10-I", seed=0)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    other = protocol_splits(labels, n_train, "cifar10-I", seed=1)
    assert not np.array_equal(s["query"], other["query"])


def test_cifar10_II_official_split():
    labels, n_train = _cifar_like_labels()
    s = protocol_splits(labels, n_train, "cifar10-II")
    assert len(s["query"]) == 10000 and s["query"].min() == 50000
    assert np.array_equal(s["train"], s["database"]) and len(s["train"]) == 50000


def test_load_split_over_folder(tmp_path):
    for part, n in (("train", 2), ("test", 1)):
        for cls in ("a", "b"):
            for i in range(n):
                _img(tmp_path / part / cls / f"{i}.png")
    q = load_split(tmp_path, "cifar10-II", "query")
    assert len(q) == 2 and q.item_ids.tolist() == [4, 5] and "split=query" in q.description
    with pytest.raises(DataError, match="at least 600"):
        load_split(tmp_path, "cifar10-I", "query")
    with pytest.raises(DataError, match="unknown protocol"):
        load_split(tmp_path, "cifar10-III", "query")


def test_image_dataset_reports_bad_images(folder):
    bad = folder / "dog" / "broken.jpg"
    bad.write_text("this is text")
    src = load_data(folder)
    ds = ImageDataset(src, transform=lambda im: torch.ones(3, 4, 4), image_shape=(3, 4, 4))
    idx, x, errors = collate([ds[i] for i in range(len(ds))])
    assert x.shape == (7, 3, 4, 4) and idx.tolist() == list(range(7))
    bad_rows = [i for i, e in enumerate(errors) if e]
    assert [src.paths[i] for i in bad_rows] == [str(bad)]
    assert "broken.jpg" in errors[bad_rows[0]] and x[bad_rows[0]].abs().sum() == 0
