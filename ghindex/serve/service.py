"""The state of one running app: the `Searcher`, its micro-batchers, their worker threads and the metrics.

FAISS, the exact scan and torch run in the executor's threads, never on the event loop; requests that
come while a call runs share the next one (see `batching`). Searches by id join the same batches as
searches by code: a batch looks up the codes of all its ids at once, from memory
(`ghindex.index.lookup`), and then makes one search.
"""
from __future__ import annotations

import functools
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np

from ..images import load_image
from ..hashing import pack_signs
from ..query import RERANK, Queries, Searcher, search_depth
from .batching import MicroBatcher
from .metrics import Metrics

MAX_ENCODE_BATCH = 64  #: images per encoder call
THUMBNAIL_PX = 256  #: longest side of the images served for the page
DEFAULT_MAX_UPLOAD = 20 * 2**20
SCAN_QUERIES_PER_THREAD = 8  #: a scan gets a thread per this many queries (see `scan_threads`)


@dataclass
class SearchJob:
    """One request's queries: codes (with their records), or stored ids, whose codes and records the
    batch looks up (all ids of a batch in one call, from memory). `exclude_self`: ids only.
    `projections`: uploaded images' hash outputs (their codes are their signs): their `RERANK` nearest
    codes are ranked again by weighted Hamming distance, as `ghindex query` does."""

    k: int
    radius: int | None
    codes: np.ndarray | None = None  # (n, code_bytes) uint8
    meta: list[dict] | None = None  # the query records of `codes`
    ids: list[int] | None = None
    exclude_self: bool = False
    projections: np.ndarray | None = None  # (n, bits) float32

    def __len__(self) -> int:
        return len(self.ids) if self.ids is not None else len(self.codes)

    @property
    def depth(self) -> int:
        """Neighbours its search asks for (jobs of one depth share a search)."""
        depth = search_depth(self.k, self.exclude_self and self.ids is not None)
        return max(depth, RERANK) if self.projections is not None else depth


class Service:
    """The searcher, its micro-batchers and the metrics of one running app."""

    def __init__(self, searcher: Searcher, *, batch_window_ms: float = 2.0, max_batch: int = 256,
                 max_upload: int = DEFAULT_MAX_UPLOAD, token: str | None = None):
        self.searcher = searcher
        self.index = searcher.index
        self.max_upload = int(max_upload)
        self.token = token or None
        self.metrics = Metrics(self.index.ntotal, self.index.bits)
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ghindex-serve")
        window = max(0.0, float(batch_window_ms)) / 1000.0
        self.search_batcher = MicroBatcher(
            self._search_batch, window_s=window, max_size=max_batch, size=len,
            key=lambda job: job.depth, executor=self.executor, name="search",
            on_batch=self.metrics.observe_search_batch, announced=True)
        self.encode_batcher = MicroBatcher(
            self._encode_batch, window_s=window, max_size=min(max_batch, MAX_ENCODE_BATCH), size=len,
            executor=self.executor, name="encode", on_batch=self.metrics.observe_encode_batch, announced=True)
        self.searcher.cache_paths()
        if self.searcher.codes_by_id is not None:
            self.searcher.codes_by_id.prepare()
            if self.searcher.encoder is not None:  # image uploads re-rank with them: read them now
                self.searcher.bit_confidences()
        self._thumbnail = functools.lru_cache(maxsize=512)(_thumbnail)

    # ---- work done in the executor, one call per micro-batch
    def _search_batch(self, jobs: list[SearchJob]) -> list:
        out = self._queries(jobs)  # a failed lookup stays that request's answer
        ready = [n for n, q in enumerate(out) if isinstance(q, Queries)]
        if not ready:
            return out
        codes = np.concatenate([out[n].codes for n in ready]) if len(ready) > 1 else out[ready[0]].codes
        dist, found = self.searcher.search(codes, jobs[0].depth, threads=scan_threads(len(codes)))
        start = 0
        for n in ready:
            job, q = jobs[n], out[n]
            stop = start + len(q.codes)
            try:
                scores = (self.searcher.rerank_distances(job.projections, found[start:stop])
                          if job.projections is not None else None)
                out[n] = self.searcher.records(q.meta, dist[start:stop], found[start:stop], job.radius, k=job.k,
                                               self_ids=q.self_ids, exclude_self=job.exclude_self, scores=scores)
            except Exception as exc:  # noqa: BLE001 - this request's error only
                out[n] = exc
            start = stop
        return out

    def _queries(self, jobs: list[SearchJob]) -> list:
        """Each job's `Queries`, or the exception that is its answer: the ids of every job by id are
        looked up in one call (from memory, see `Searcher.codes_for_ids`)."""
        out: list = [Queries(job.codes, job.meta) if job.ids is None else None for job in jobs]
        by_id = [n for n, job in enumerate(jobs) if job.ids is not None]
        if not by_id:
            return out
        try:
            every = self.searcher.codes_for_ids([i for n in by_id for i in jobs[n].ids])
        except Exception:  # noqa: BLE001 - one request's ids failed: look each request's up alone
            every = None
        start = 0
        for n in by_id:
            if every is not None:
                part = slice(start, start + len(jobs[n].ids))
                out[n] = Queries(every.codes[part], every.meta[part], every.self_ids[part])
                start = part.stop
                continue
            try:
                out[n] = self.searcher.codes_for_ids(jobs[n].ids)
            except Exception as exc:  # noqa: BLE001 - this request's error only
                out[n] = exc
        return out

    def _encode_batch(self, image_lists: list[list]) -> list[np.ndarray]:
        """Each request's images -> their hash outputs (the codes are their signs)."""
        images = [img for images in image_lists for img in images]
        projections = self.searcher.hash_outputs(images, batch_size=MAX_ENCODE_BATCH)
        out, start = [], 0
        for images in image_lists:
            out.append(projections[start:start + len(images)])
            start += len(images)
        return out

    def image_job(self, projections: np.ndarray, k: int, radius: int | None, meta: list[dict]) -> SearchJob:
        """The search of uploaded images: by their codes, re-ranked when the code store is there
        (like `ghindex query`, which needs it to read the neighbours' codes)."""
        rerank = self.searcher.codes_by_id is not None
        return SearchJob(k, radius, codes=pack_signs(projections), meta=meta,
                         projections=projections if rerank else None)

    # ---- what handlers call
    async def search(self, job: SearchJob, ticket=None) -> list[dict]:
        return await self.search_batcher.submit(job, ticket)

    async def hash_outputs(self, images: list, ticket=None) -> np.ndarray:
        """The images' hash outputs (their codes are the signs), encoded in a shared micro-batch."""
        return await self.encode_batcher.submit(images, ticket)

    def thumbnail(self, path: str) -> tuple[bytes, str]:
        return self._thumbnail(path)

    async def close(self) -> None:
        await self.search_batcher.stop()
        await self.encode_batcher.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.searcher.close()


def scan_threads(queries: int) -> int:
    """Threads for an exact scan of `queries` codes in the server: one core stays free for the event loop
    (which parses and answers every request), and a small batch gets one thread, which is cheaper per
    query than several: with 2 cores, one thread always."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(faiss.omp_get_max_threads(), cores - 1, queries // SCAN_QUERIES_PER_THREAD))


def _thumbnail(path: str) -> tuple[bytes, str]:
    """A database image at most THUMBNAIL_PX on its longest side: PNG when small, else JPEG."""
    from PIL import Image

    img = load_image(path, THUMBNAIL_PX)
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if img.width * img.height <= 128 * 128:
        img.save(buf, format="PNG", optimize=True)
        return buf.getvalue(), "image/png"
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), "image/jpeg"
