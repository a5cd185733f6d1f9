"""`demo`: the whole product on the shipped CIFAR-10 subset, on a CPU, in a few minutes.

train (smallcnn from scratch, supervised GreedyHash) -> encode database and queries -> build a flat
index -> query a few images (retrieval grid PNG) -> evaluate (mAP, PR curve PNG), next to the mAP of
random codes on the same labels. Nothing is downloaded. Each step is the same library function the
CLI command of that name wraps, so the demo doubles as a worked example.
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import time
from pathlib import Path

import numpy as np

from .data import read_image_folder
from .encode import encode
from .errors import DataError, OutputError
from .evaluate import evaluate
from .index import build
from .io import writing
from .metrics import mean_average_precision
from .query import query
from .store import CodeStore
from .train import output_paths, train

log = logging.getLogger(__name__)

DEFAULT_DATA = "data/cifar10-demo"


def _grid_query_list(data: Path, out: Path) -> Path:
    """A list file with the first query image of each class and its label (class order as in the
    database folder), so the grid can frame neighbours as relevant or not. Paths are relative to
    DATA/query (encode it with that root: the store's paths then stay relative, and the folder portable)."""
    source = read_image_folder(data / "query")
    seen, lines = set(), []
    for path, label in zip(source.paths, source.labels):
        if label not in seen:
            seen.add(label)
            lines.append(f"{os.path.relpath(path, source.root)} {label}")
    listing = out / "grid-queries.txt"
    with writing(listing):
        listing.write_text("\n".join(lines) + "\n")
    return listing


def demo(out: str | os.PathLike = "demo-out", data: str | os.PathLike = DEFAULT_DATA, bits: int = 32,
         backbone: str = "smallcnn", epochs: int = 6, lr: float = 0.01, batch_size: int = 64,
         image_size: int = 32, seed: int = 0, device: str = "cpu", workers: int | None = None,
         progress: bool = True) -> dict:
    """Run the main job end to end into the folder `out`; returns a summary dict.

    `data` holds `database/<class>/` (also the training set) and `query/<class>/`. The defaults
    (smallcnn, 32 px, 6 epochs, lr 0.01) are sized for a 2-core CPU; previous demo outputs in `out`
    are replaced. An output that cannot be written raises OutputError (the demo starts over when run
    again).
    """
    try:
        return _demo(out, data, bits, backbone, epochs, lr, batch_size, image_size, seed, device, workers, progress)
    except OutputError as exc:
        exc.set_hint(f"{exc.remedy} and run the demo again (it starts over)")
        raise


def _demo(out, data, bits, backbone, epochs, lr, batch_size, image_size, seed, device, workers, progress) -> dict:
    data, out = Path(data), Path(out)
    for split in ("database", "query"):
        if not (data / split).is_dir():
            raise DataError(f"{data} must hold {split}/<class>/ folders (the shipped demo data is {DEFAULT_DATA})")
    model = out / "model.ghm"
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        for stale in output_paths(model).values():  # a fresh run, not a resume of an older demo
            Path(stale).unlink(missing_ok=True)
    shutil.rmtree(out / "index", ignore_errors=True)
    timings: dict[str, float] = {}

    def step(name: str, message: str):
        log.info("== %s: %s", name, message)
        return time.perf_counter()

    t = step("train", f"GreedyHash, {backbone} from scratch, {bits} bits, {epochs} epochs on {data / 'database'}")
    train(str(data / "database"), bits=bits, backbone=backbone, weights="none", out=str(model), epochs=epochs,
          lr=lr, batch_size=batch_size, image_size=image_size, seed=seed, device=device, workers=workers,
          progress=progress)
    timings["train"] = time.perf_counter() - t

    t = step("encode", "database and query images -> HDF5 code stores")
    db_summary = encode(str(model), str(data / "database"), str(out / "database.h5"), device=device,
                        workers=workers, overwrite=True, progress=progress)
    q_summary = encode(str(model), str(data / "query"), str(out / "query.h5"), device=device,
                       workers=workers, overwrite=True, progress=progress)
    timings["encode"] = time.perf_counter() - t

    t = step("build", "flat FAISS binary index over the database codes")
    index_meta = build(str(out / "database.h5"), str(out / "index"), index_key="BFlat", gpu="off")
    timings["build"] = time.perf_counter() - t

    t = step("query", "one query image per class, 8 neighbours each")
    encode(str(model), str(_grid_query_list(data, out)), str(out / "grid-queries.h5"), root=str(data / "query"),
           device=device, workers=workers, overwrite=True, progress=False)
    results = query(str(out / "index"), codes=str(out / "grid-queries.h5"), k=8, grid=str(out / "grid.png"))
    timings["query"] = time.perf_counter() - t

    t = step("eval", "mAP@all and curves of the query codes against the index")
    result = evaluate(str(out / "query.h5"), index=str(out / "index"), topk="all", radius=2,
                      report=str(out / "report.json"), plot=str(out / "eval"), progress=False)
    timings["eval"] = time.perf_counter() - t

    # Baseline: random codes of the same width on the same labels (what "no learning" scores).
    with CodeStore.open(out / "query.h5") as q, CodeStore.open(out / "database.h5") as db:
        rng = np.random.default_rng(seed)
        random_map = mean_average_precision(
            rng.integers(0, 256, size=(len(q), q.code_bytes), dtype=np.uint8),
            rng.integers(0, 256, size=(len(db), db.code_bytes), dtype=np.uint8),
            q.labels(), db.labels())

    m = result["metrics"]
    relevant_top8 = [sum(n["relevant"] for n in r["neighbors"]) for r in results]
    return {
        "out": str(out),
        "data": str(data),
        "bits": bits,
        "backbone": backbone,
        "epochs": epochs,
        "database": db_summary["count"],
        "queries": q_summary["count"],
        "map": m["map"],
        "map_tie_avg": m["map_tie_avg"],
        "precision_at_10": m["precision_at"].get("10"),
        "precision_within_radius": m["precision_within_radius"],
        "random_codes_map": random_map,
        "grid_relevant_of_8": relevant_top8,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "seconds_total": round(sum(timings.values()), 1),
        "files": {
            "model": str(model),
            "database_codes": str(out / "database.h5"),
            "query_codes": str(out / "query.h5"),
            "index": str(out / "index"),
            "report": str(out / "report.json"),
            "grid": str(out / "grid.png"),
            **{f"plot_{name}": path for name, path in result.get("plots", {}).items()},
        },
        "index_key": index_meta.get("index_key"),
    }


def format_summary(summary: dict) -> str:
    """What `ghindex demo` prints for people."""
    s = summary["seconds"]
    lines = [
        f"ghindex demo: {summary['backbone']} GreedyHash, {summary['bits']} bits, {summary['epochs']} epochs, "
        f"{summary['database']:,} database / {summary['queries']:,} query images",
        "",
        f"{'step':<8} {'seconds':>8}",
        *(f"{name:<8} {secs:>8.1f}" for name, secs in s.items()),
        f"{'total':<8} {summary['seconds_total']:>8.1f}",
        "",
        f"mAP@all (ties by position)   {summary['map']:.4f}",
        f"mAP@all (tie-averaged)       {summary['map_tie_avg']:.4f}",
        f"mAP@all of random codes      {summary['random_codes_map']:.4f}",
        f"precision@10                 {summary['precision_at_10']:.4f}",
        "relevant among 8 neighbours  " + " ".join(str(n) for n in summary["grid_relevant_of_8"]),
        "",
    ]
    lines += [f"{name:<15} {path}" for name, path in summary["files"].items()]
    files = summary["files"]
    lines += ["", "search it in a browser (needs the serve extra, part of `make install`):",
              f"  ghindex serve --index {shlex.quote(files['index'])} --model {shlex.quote(files['model'])}"]
    return "\n".join(lines)
