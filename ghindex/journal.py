"""The crash-safe journal of an encode run: append-only records, each fsync'ed and CRC-framed.

`ghindex.local_encode` writes one record describing the run, one per checkpoint (its codes and the
inputs it skipped) and one when the run is done; on `--resume` it replays the valid records. This
module knows the record format and the lock, nothing about codes or stores.
"""
from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from typing import Iterator

from .errors import OutputError, StoreError
from .io import writing

JOURNAL_VERSION = 1  # of the run header (the first record)


class Journal:
    """Append-only, CRC-framed records; holds an exclusive lock so two runs cannot share an output.

    The lock is a POSIX record lock (`lockf`), owned by this process only: DataLoader workers forked
    from it do not inherit it, so a killed run's orphaned workers cannot block `--resume`.

    Record: magic ``GHJ1``, kind (uint8), meta length (uint32), blob length (uint64), meta (JSON),
    blob (raw bytes), CRC-32 of everything before it (uint32), little-endian.

    Writes go straight to the file (no buffer that a failed write would leave behind to fail again
    on close); a record that cannot be written (no space...) raises OutputError and is cut off again.
    """

    MAGIC = b"GHJ1"
    HEAD = struct.Struct("<4sBIQ")
    CRC = struct.Struct("<I")
    HEADER, CHUNK, DONE = 0, 1, 2

    def __init__(self, path: str, out: str):
        import fcntl

        self.path = path
        with writing(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise StoreError(f"another `ghindex encode` is writing {out} ({path} is locked)") from None
            raise
        self.file = open(fd, "r+b", buffering=0)

    def _read(self, n: int) -> bytes:
        """n bytes (fewer only at the end of the file)."""
        parts = []
        while n > 0:
            part = self.file.read(n)
            if not part:
                break
            parts.append(part)
            n -= len(part)
        return b"".join(parts)

    def records(self) -> Iterator[tuple[int, dict, bytes, int]]:
        """Yield (kind, meta, blob, end offset) for each valid record; stop at the first damaged one."""
        f = self.file
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(0)
        offset = 0
        while offset + self.HEAD.size + self.CRC.size <= size:
            head = self._read(self.HEAD.size)
            magic, kind, meta_len, blob_len = self.HEAD.unpack(head)
            end = offset + self.HEAD.size + meta_len + blob_len + self.CRC.size
            if magic != self.MAGIC or end > size or kind not in (self.HEADER, self.CHUNK, self.DONE):
                return
            body = self._read(meta_len + blob_len)
            (crc,) = self.CRC.unpack(self._read(self.CRC.size))
            if zlib.crc32(body, zlib.crc32(head)) != crc:
                return
            try:
                meta = json.loads(body[:meta_len])
            except ValueError:
                return
            yield kind, meta, body[meta_len:], end
            offset = end

    def truncate(self, end: int) -> None:
        with writing(self.path):
            self.file.truncate(end)
            os.fsync(self.file.fileno())

    def write(self, kind: int, meta: dict, blob: bytes = b"") -> None:
        """Append one record and make it durable before returning."""
        body = json.dumps(meta, sort_keys=True).encode()
        head = self.HEAD.pack(self.MAGIC, kind, len(body), len(blob))
        crc = zlib.crc32(blob, zlib.crc32(body, zlib.crc32(head)))
        f = self.file
        end = f.seek(0, os.SEEK_END)
        data = memoryview(b"".join((head, body, blob, self.CRC.pack(crc))))
        try:
            with writing(self.path):
                while data:
                    data = data[f.write(data):]
                os.fsync(f.fileno())
        except OutputError:
            try:  # cut the torn record off (which frees its space); a resume would skip it anyway
                f.truncate(end)
            except OSError:
                pass
            raise

    def close(self) -> None:
        self.file.close()  # also releases the lock
