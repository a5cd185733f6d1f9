"""IVF drift: how far codes sit from the centroids of an IVF index's trained lists, measured on a sample
of the build's codes (`drift_reference`, recorded at build time) and of each add's (`_drift_report`);
see `ghindex.lifecycle`'s docstring for when a rebuild is recommended."""
from __future__ import annotations

import numpy as np

from .codes import pad_codes
from .sampling import gather, live_chunks, sample_positions
from .structures import _inner

#: New codes this many times farther from their IVF centroids than the build's codes: rebuild.
#: (Fresh codes of the build's distribution measure about 1.0; see tests/test_lifecycle.py.)
DRIFT_REBUILD_RATIO = 1.25
#: Codes sampled to measure distances to the centroids (at build time and per add).
DRIFT_SAMPLE = 20_000
# Rows per read of a code store (the side store's rows in `add`; a store's codes for a reference).
_READ_ROWS = 262_144


def centroid_distances(index, codes: np.ndarray) -> np.ndarray:
    """Hamming distance of each code to its nearest IVF centroid (the list it is assigned to)."""
    ivf = _inner(index.faiss_index)
    d, _ = ivf.quantizer.search(pad_codes(np.ascontiguousarray(codes), index.padded_bytes), 1)
    return d[:, 0].astype(np.float64)


def drift_reference(index, chunks, n: int, seed: int = 0) -> dict:
    """Mean distance to the nearest centroid of up to DRIFT_SAMPLE seeded codes of an IVF index's own
    codes (`chunks()` yields their (codes, ids)): what `add` compares new codes with."""
    codes, _ = gather(chunks, sample_positions(n, min(n, DRIFT_SAMPLE), [int(seed), 2]), index.code_bytes, n)
    return {"mean_distance": round(float(centroid_distances(index, codes).mean()), 4), "sample": len(codes),
            "rebuild_ratio": DRIFT_REBUILD_RATIO}


def _drift_sample_positions(index, count: int) -> np.ndarray | None:
    if index.kind != "ivf":
        return None
    return sample_positions(count, min(count, DRIFT_SAMPLE), [0, 3])


def _drift_report(index, base, meta: dict, distances: np.ndarray | None, count: int) -> dict | None:
    """This add's and all adds' mean distance to the centroids against the build's (IVF only)."""
    if distances is None:
        return None
    reference = meta.get("drift")
    if not reference:  # built before builds recorded it: measure the store's codes now, once
        n = len(base) - base.num_deleted
        reference = drift_reference(index, live_chunks(base, base.path, _READ_ROWS), n)
        reference["measured"] = "at the first add (the build did not record it)"
        index.meta["drift"] = reference
    build_mean = float(reference["mean_distance"])
    mean = float(distances.mean())
    previous = meta.get("lifecycle", {}).get("drift") or {}
    before = int(previous.get("added_codes", 0))
    overall = (previous.get("added_mean_distance", 0.0) * before + mean * count) / (before + count)

    def ratio(value: float) -> float:
        if build_mean > 0:
            return round(value / build_mean, 4)
        return 1.0 if value == 0 else float("inf")

    report = {
        "build_mean_distance": build_mean,
        "last_add_mean_distance": round(mean, 4),
        "last_add_ratio": ratio(mean),
        "added_codes": before + count,
        "added_mean_distance": round(overall, 4),
        "added_ratio": ratio(overall),
        "rebuild_ratio": DRIFT_REBUILD_RATIO,
    }
    report["rebuild_recommended"] = max(report["last_add_ratio"], report["added_ratio"]) > DRIFT_REBUILD_RATIO
    return report
