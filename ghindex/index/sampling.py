"""Reading a code source in order: the live (not deleted) rows of a code store as chunks of (codes, ids),
and seeded samples of positions gathered in one sequential pass. Used by `builder` (IVF training sample),
`tuning` (tuning queries) and `drift` (distances to the centroids)."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from ..errors import StoreError
from .codes import _check_ids

#: A callable that yields (codes (n, code_bytes) uint8, ids (n,) int64) chunks, in order, each time it is called.
ChunkSource = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


def sample_positions(n: int, size: int, seed) -> np.ndarray:
    """`size` sorted positions in 0..n-1, drawn without replacement by a generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)


def gather(chunks: ChunkSource, picks: np.ndarray, code_bytes: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, ids) at the sorted positions `picks` of the `n` codes the chunks yield, in one pass."""
    sample = np.empty((len(picks), code_bytes), dtype=np.uint8)
    sample_ids = np.empty(len(picks), dtype=np.int64)
    start = filled = 0
    for codes, ids in chunks():
        lo, hi = np.searchsorted(picks, [start, start + len(codes)])
        sample[filled:filled + hi - lo] = codes[picks[lo:hi] - start]
        sample_ids[filled:filled + hi - lo] = ids[picks[lo:hi] - start]
        filled += hi - lo
        start += len(codes)
        if filled == len(picks):
            break
    if filled != len(picks):
        raise StoreError(f"the code source ended after {start:,} codes, expected {n:,}")
    return sample, sample_ids


def live_chunks(store, name, chunk_rows: int) -> ChunkSource:
    """(codes, ids) of the store's rows in order, in chunks, leaving out rows marked deleted."""
    deleted = store.deleted() if store.num_deleted else None

    def chunks():
        start = 0
        for batch in store.iter_chunks(rows=chunk_rows, paths=False):
            batch_codes = np.asarray(batch.codes, dtype=np.uint8)
            ids = _check_ids(batch.ids, len(batch_codes), f"code store {name}", StoreError)
            if deleted is not None:
                keep = ~deleted[start:start + len(ids)]
                batch_codes, ids = batch_codes[keep], ids[keep]
            start += len(batch.ids)
            yield batch_codes, ids

    return chunks
