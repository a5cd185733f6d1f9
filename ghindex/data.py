"""Data sources for training and encoding: image folders, list files, feature arrays, named protocols.

One API for all of them: `load_data(data)` or `load_split(data, protocol, split)` return a `DataSource`
(paths or feature rows, plus labels), and `ImageDataset` feeds it to a torch DataLoader.

Labels are either single-label class indices, shape (N,) int64, or multi-hot rows, shape (N, C) uint8.
Positions: every source remembers each item's position in the data it was read from (`positions`), which
is also the default id of its code, so splits of one pool keep distinct, stable ids.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .errors import DataError, ImageError
from .images import load_image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
LIST_EXTENSIONS = frozenset({".txt", ".list", ".lst", ".tsv"})
ARRAY_EXTENSIONS = frozenset({".npz", ".h5", ".hdf5"})
PROTOCOLS = ("cifar10-I", "cifar10-II")
SPLITS = ("train", "query", "database")


@dataclass
class DataSource:
    kind: str  # "images" or "features"
    description: str  # what was read, for provenance (stored with codes and models)
    paths: list[str] | None = None  # absolute image paths (kind == "images")
    features: np.ndarray | None = None  # (N, D) float32 (kind == "features")
    labels: np.ndarray | None = None  # (N,) int64 or (N, C) uint8 multi-hot
    class_names: list[str] | None = None
    positions: np.ndarray = field(default=None)  # (N,) int64 position in the original data
    ids: np.ndarray | None = None  # explicit ids (list file column), else None -> positions
    root: str | None = None  # the folder the images' paths are relative to (folder, list file's root)

    def __post_init__(self):
        if self.positions is None:
            self.positions = np.arange(len(self), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths) if self.kind == "images" else len(self.features)

    @property
    def multi_label(self) -> bool:
        return self.labels is not None and self.labels.ndim == 2

    @property
    def num_classes(self) -> int:
        if self.labels is None:
            return 0
        if self.labels.ndim == 2:
            return int(self.labels.shape[1])
        return len(self.class_names) if self.class_names else int(self.labels.max(initial=-1)) + 1

    @property
    def item_ids(self) -> np.ndarray:
        """Ids of the items' codes: the explicit ids if given, else positions in the original data."""
        return self.ids if self.ids is not None else self.positions

    def subset(self, indices, description: str | None = None) -> "DataSource":
        idx = np.asarray(indices, dtype=np.int64)
        take = lambda a: None if a is None else a[idx]  # noqa: E731
        return dataclasses.replace(
            self,
            description=description or self.description,
            paths=None if self.paths is None else [self.paths[i] for i in idx],
            features=take(self.features),
            labels=take(self.labels),
            positions=self.positions[idx],
            ids=take(self.ids),
        )


# -- readers -----------------------------------------------------------------------------------
def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return found


def read_image_folder(folder: str | os.PathLike) -> DataSource:
    """A folder with one sub-folder per class (labels = sorted class order), or a flat folder of images
    (no labels). Files are taken in sorted order; unknown extensions and hidden files are ignored."""
    folder = os.path.abspath(os.fspath(folder))
    entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
    classes = [e for e in entries if os.path.isdir(os.path.join(folder, e))]
    if classes:
        paths, labels = [], []
        for label, name in enumerate(classes):
            found = _walk_images(os.path.join(folder, name))
            paths.extend(found)
            labels.extend([label] * len(found))
        source = DataSource("images", f"folder:{folder}", paths=paths,
                            labels=np.asarray(labels, dtype=np.int64), class_names=classes, root=folder)
    else:
        paths = [os.path.join(folder, e) for e in entries if _is_image(e)]
        source = DataSource("images", f"folder:{folder}", paths=paths, root=folder)
    if not len(source):
        raise DataError(f"no images found in {folder} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return source


def read_list_file(path: str | os.PathLike, root: str | os.PathLike | None = None,
                   ids_column: int | None = None) -> DataSource:
    """Lines `relative/path [label]` or `relative/path 0 1 0 1 ...` (multi-hot), whitespace separated.

    One label column gives single-label classes; several 0/1 columns give multi-hot labels; no column
    gives unlabelled images. `ids_column` (1-based column after the path) holds integer ids instead of a
    label. Paths are relative to `root` (default: the list file's folder). Blank lines and `#` comments
    are skipped. A malformed line raises DataError naming the file and line number.
    """
    path = os.fspath(path)
    base = os.path.abspath(os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(path)))
    paths, rows, ids, width = [], [], [], None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            tokens = os.fsdecode(raw).split("#", 1)[0].split() if not raw.lstrip().startswith(b"#") else []
            if not tokens:
                continue
            rel, rest = tokens[0], tokens[1:]
            where = f"{path}, line {lineno}"
            if ids_column is not None:
                if not 1 <= ids_column <= len(rest):
                    raise DataError(f"{where}: no column {ids_column} to take ids from")
                try:
                    ids.append(int(rest.pop(ids_column - 1)))
                except ValueError:
                    raise DataError(f"{where}: id column {ids_column} is not an integer") from None
            if width is None:
                width = len(rest)
            elif len(rest) != width:
                raise DataError(f"{where}: expected {width} label column(s), found {len(rest)}")
            try:
                values = [int(t) for t in rest]
            except ValueError:
                raise DataError(f"{where}: labels must be integers, got {' '.join(rest)!r}") from None
            if width > 1 and any(v not in (0, 1) for v in values):
                raise DataError(f"{where}: multi-hot labels must be 0 or 1")
            if width == 1 and values[0] < 0:
                raise DataError(f"{where}: class label must be >= 0")
            paths.append(rel if os.path.isabs(rel) else os.path.join(base, rel))
            rows.append(values)
    if not paths:
        raise DataError(f"list file {path} has no entries")
    labels = None
    if width == 1:
        labels = np.asarray(rows, dtype=np.int64)[:, 0]
    elif width and width > 1:
        labels = np.asarray(rows, dtype=np.uint8)
    return DataSource("images", f"list:{os.path.abspath(path)}", paths=paths, labels=labels,
                      ids=np.asarray(ids, dtype=np.int64) if ids_column is not None else None, root=base)


def read_array_file(path: str | os.PathLike) -> DataSource:
    """`.npz` or `.h5` holding `features` (N, D) float and optionally `labels` ((N,) or (N, C))."""
    path = os.fspath(path)
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("features", "labels") if k in f.files}
        else:
            import h5py

            with h5py.File(path, "r") as f:
                arrays = {k: f[k][()] for k in ("features", "labels") if k in f}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read array file {path}: {str(exc).splitlines()[0]}") from None
    if "features" not in arrays:
        raise DataError(f"array file {path} has no 'features' array")
    features = np.asarray(arrays["features"])
    if features.ndim != 2 or features.shape[0] == 0 or not np.issubdtype(features.dtype, np.number):
        raise DataError(f"{path}: 'features' must be a non-empty numeric (N, D) array, got {features.dtype} {features.shape}")
    features = features.astype(np.float32, copy=False)
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(axis=1).sum())
        raise DataError(f"{path}: 'features' contains NaN or inf in {bad} row(s)")
    labels = arrays.get("labels")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape[0] != features.shape[0] or labels.ndim not in (1, 2):
            raise DataError(f"{path}: 'labels' shape {labels.shape} does not match {features.shape[0]} feature rows")
        labels = labels.astype(np.int64) if labels.ndim == 1 else (labels != 0).astype(np.uint8)
    return DataSource("features", f"array:{os.path.abspath(path)}", features=features, labels=labels)


def load_data(data: str | os.PathLike, root: str | os.PathLike | None = None,
              ids_column: int | None = None) -> DataSource:
    """Open an image folder, a list file or an array file, chosen by what `data` is."""
    name = os.fspath(data)
    if os.path.isdir(name):
        if ids_column is not None:
            raise DataError("ids can only be taken from a column of a list file")
        return read_image_folder(name)
    if not os.path.exists(name):
        raise DataError(f"data not found: {name}")
    ext = os.path.splitext(name)[1].lower()
    if ext in LIST_EXTENSIONS:
        return read_list_file(name, root, ids_column)
    if ids_column is not None:
        raise DataError("ids can only be taken from a column of a list file")
    if ext in ARRAY_EXTENSIONS:
        return read_array_file(name)
    raise DataError(
        f"cannot tell what {name} is: expected an image folder, a list file "
        f"({', '.join(sorted(LIST_EXTENSIONS))}) or an array file ({', '.join(sorted(ARRAY_EXTENSIONS))})"
    )


# -- protocols ---------------------------------------------------------------------------------
def cifar_pool(folder: str | os.PathLike) -> tuple[DataSource, int]:
    """The pooled train+test source of a CIFAR-style folder (train/<class>/, test/<class>/), train first.
    Returns (pool, number of training items)."""
    folder = os.fspath(folder)
    parts = [os.path.join(folder, s) for s in ("train", "test")]
    if not all(os.path.isdir(p) for p in parts):
        raise DataError(f"{folder} must hold train/<class>/ and test/<class>/ folders for a cifar10 protocol")
    train, test = read_image_folder(parts[0]), read_image_folder(parts[1])
    if train.class_names != test.class_names or train.labels is None:
        raise DataError(f"{folder}: train/ and test/ must hold the same class sub-folders")
    pool = DataSource("images", f"folder:{os.path.abspath(folder)}", paths=train.paths + test.paths,
                      labels=np.concatenate([train.labels, test.labels]), class_names=train.class_names,
                      root=os.path.abspath(folder))
    return pool, len(train)


def protocol_splits(labels: np.ndarray, n_train: int, protocol: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Split indices into a pool (first `n_train` items: official train, rest: official test).

    - ``cifar10-I``: per class, 100 queries and 500 training items drawn from the whole pool with
      `seed`; database = every item that is not a query (training items included).
    - ``cifar10-II``: query = official test, train = database = official train (seed unused).
    Each returned index array is sorted.
    """
    labels = np.asarray(labels)
    if protocol == "cifar10-II":
        train = np.arange(n_train, dtype=np.int64)
        return {"train": train, "query": np.arange(n_train, len(labels), dtype=np.int64), "database": train.copy()}
    if protocol != "cifar10-I":
        raise DataError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    rng = np.random.default_rng(seed)
    query, train = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 600:
            raise DataError(f"cifar10-I needs at least 600 items per class; class {c} has {len(members)}")
        perm = rng.permutation(members)
        query.append(perm[:100])
        train.append(perm[100:600])
    query = np.sort(np.concatenate(query))
    is_query = np.zeros(len(labels), dtype=bool)
    is_query[query] = True
    return {"train": np.sort(np.concatenate(train)), "query": query, "database": np.flatnonzero(~is_query)}


def load_split(data: str | os.PathLike, protocol: str, split: str, seed: int = 0) -> DataSource:
    """One split (train | query | database) of a named protocol over a CIFAR-style folder."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    pool, n_train = cifar_pool(data)
    indices = protocol_splits(pool.labels, n_train, protocol, seed)[split]
    return pool.subset(indices, description=f"{pool.description} protocol={protocol} split={split} seed={seed}")


# -- torch dataset -----------------------------------------------------------------------------
class ImageDataset(torch.utils.data.Dataset):
    """Items `(i, tensor, error)`: a bad image yields a zero tensor and its one-line error message.

    `transform` maps an RGB PIL image to a tensor (e.g. `Encoder.preprocess`-style); images are decoded
    with `decode_size` (`images.load_image`'s size: the model's `EncoderConfig.decode_size`). For feature
    sources the row itself is returned and `transform` is not used.
    """

    def __init__(self, source: DataSource, transform: Callable | None = None, image_shape=(3, 224, 224),
                 decode_size: int | None = None):
        self.source = source
        self.transform = transform
        self.image_shape = tuple(image_shape)
        self.decode_size = decode_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        if self.source.kind == "features":
            return i, torch.from_numpy(self.source.features[i]), ""
        try:
            return i, self.transform(load_image(self.source.paths[i], self.decode_size)), ""
        except ImageError as exc:
            return i, torch.zeros(self.image_shape), str(exc)


def collate(batch):
    """Collate `(i, tensor, error)` items into (indices LongTensor, stacked tensors, list of errors)."""
    idx, tensors, errors = zip(*batch)
    return torch.as_tensor(idx, dtype=torch.long), torch.stack(tensors), list(errors)
