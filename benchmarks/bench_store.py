"""Code store throughput: write then read N 64-bit codes with int64 ids, in chunks.

    .venv/bin/python benchmarks/bench_store.py [--rows 10000000] [--batch 1000000] [--dir /tmp]

Write time covers append + flush + mark_complete + close + fsync (data on disk, not just in the page
cache). Reads go through `CodeStore.iter_chunks()` (bounded memory), once after evicting the file
from the page cache (posix_fadvise DONTNEED: a cold read from disk) and once warm. MB/s counts the
payload bytes (codes + ids), not the HDF5 overhead.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ghindex.store import CodeStore  # noqa: E402


def evict(path: str) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def read_all(path: str) -> tuple[float, int, int]:
    t = time.perf_counter()
    rows, checksum = 0, 0
    with CodeStore.open(path) as s:
        for batch in s.iter_chunks():
            rows += len(batch.ids)
            checksum ^= int(np.bitwise_xor.reduce(batch.codes[:, 0])) if len(batch.ids) else 0
    return time.perf_counter() - t, rows, checksum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--batch", type=int, default=1_000_000, help="rows per append")
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--chunk-rows", type=int, default=None, help="HDF5 chunk rows [default: the store's]")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    code_bytes = args.bits // 8
    # One random batch reused (with shifted ids): generating 10M random codes would dominate the run.
    codes = rng.integers(0, 256, size=(args.batch, code_bytes), dtype=np.uint8)
    base_ids = np.arange(args.batch, dtype=np.int64)
    payload = args.rows * (code_bytes + 8)
    path = os.path.join(args.dir, f"bench_store_{os.getpid()}.h5")
    try:
        t = time.perf_counter()
        with CodeStore.create(path, args.bits, source="bench_store", chunk_rows=args.chunk_rows) as s:
            for start in range(0, args.rows, args.batch):
                k = min(args.batch, args.rows - start)
                s.append(codes[:k], base_ids[:k] + start)
            s.mark_complete()
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        write_s = time.perf_counter() - t
        size = os.path.getsize(path)
        with CodeStore.open(path) as s:
            chunk_rows = s.chunk_rows

        cold = evict(path)
        cold_s, rows, _ = read_all(path)
        warm_s, rows2, _ = read_all(path)
        assert rows == rows2 == args.rows, (rows, rows2)
    finally:
        if os.path.exists(path):
            os.remove(path)

    mb = payload / 1e6
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"rows: {args.rows:,} x {args.bits}-bit codes + int64 ids = {mb:.0f} MB payload; appends of {args.batch:,} rows, chunks of {chunk_rows:,} rows")
    print(f"file size: {size / 1e6:.1f} MB ({size / payload:.3f} x payload)")
    print(f"write (append+flush+close+fsync): {write_s:.2f} s = {mb / write_s:.0f} MB/s = {args.rows / write_s / 1e6:.1f} M rows/s")
    label = "cold (evicted from page cache)" if cold else "first"
    print(f"read {label}: {cold_s:.2f} s = {mb / cold_s:.0f} MB/s = {args.rows / cold_s / 1e6:.1f} M rows/s")
    print(f"read warm: {warm_s:.2f} s = {mb / warm_s:.0f} MB/s = {args.rows / warm_s / 1e6:.1f} M rows/s")


if __name__ == "__main__":
    main()
