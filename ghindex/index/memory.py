"""Memory an index needs (estimated before building) and the size strings `max_memory` takes."""
from __future__ import annotations

import re

import numpy as np

from ..errors import ConfigError
from .codes import padded_width
from .keys import TRAIN_POINTS_PER_LIST, IndexSpec, auto_nlist

#: Rows read from the code store per chunk while building.
CHUNK_ROWS = 262_144


def parse_size(text: str | int | None) -> int | None:
    """'8G', '512M', '1.5GiB', '100000' -> bytes (powers of 1024). None stays None."""
    if text is None or isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        return None if text is None else int(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"memory size {text!r} not understood; use e.g. 8G, 512M or a byte count")
    scale = 1024 ** " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * scale)


def format_size(n_bytes: float) -> str:
    """Bytes as a short human string with binary units."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n_bytes) < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError  # unreachable


def estimate_memory(spec: IndexSpec, n: int, bits: int, params: dict | None = None,
                    chunk_rows: int = CHUNK_ROWS) -> dict[str, int]:
    """About how many bytes the index holds (`resident`) and needs at most while building (`peak`).

    Counts padded codes, ids and the index structure, plus the build's transients: chunk buffers, the
    id uniqueness check (8 bytes per code) and, for IVF, the k-means sample as float32 bits.
    """
    params = params or {}
    width = padded_width(bits // 8)
    per_code = {
        "flat": width + 8,  # codes + id map
        "ivf": width + 8,  # codes + ids in inverted lists
        "hnsw": width + 8 + 8 * (spec.m or 32) * 1.1 + 12,  # + level-0/upper links, offsets, levels
        "hash": (width + 8) * 1.25,  # lists grow by doubling; buckets counted below
        "multihash": width + 8 + 8 * (spec.nhash or 1) * 1.25,
    }[spec.kind]
    resident = n * per_code
    transient = 8 * n + min(n, chunk_rows) * (bits // 8 + width + 16)
    if spec.kind == "ivf":
        nlist = spec.nlist or auto_nlist(n)
        resident += nlist * (width + 48)  # centroids + per-list vector headers
        train = min(n, params.get("train_size", TRAIN_POINTS_PER_LIST * nlist))
        transient += train * (width + 8 * width * 4 + 8) + nlist * 8 * width * 4
    elif spec.kind in ("hash", "multihash"):
        buckets = min(n, 2 ** (spec.b or 0)) * (spec.nhash or 1)
        resident += buckets * 96  # hash-map node + two vector headers
    return {"resident": int(resident), "peak": int(resident + transient)}
