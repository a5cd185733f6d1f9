"""Codes of stored ids from memory: what a search by id searches with (`query --ids`, `serve`).

`CodesById` maps many ids to their packed codes in one vectorised lookup, with no HDF5 read per id:

- a flat index holds every code itself: they are read from FAISS's own buffer (no copy) at the
  positions its id map gives, found by binary search over the id map (sorted once, or as it is when
  its ids ascend, as a build from a store leaves them);
- other index kinds (IVF, HNSW, hash) do not give their codes back by id: the code store's codes and
  its deleted mask are read once, at the first lookup, and kept.

Ids the code store holds but the index does not (rows `remove` marked deleted) still have their
stored code, so they can be searched with as before; `IdCodes.in_index` tells them apart. An id the
store lacks is an error (`ConfigError`, as `query` has always said).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import faiss
import numpy as np

from .. import flatscan
from ..errors import ConfigError
from ..ids import StoreLookup
from .structures import _inner


@dataclass
class IdCodes:
    """The answer of a `CodesById` lookup, one row per id asked for."""

    codes: np.ndarray  #: (n, code_bytes) uint8, at the index's true width
    rows: np.ndarray  #: int64 (n,): each id's row in the code store
    in_index: np.ndarray  #: bool (n,): whether the index holds the id (False: deleted from it by `remove`)


class CodesById:
    """Packed codes of stored ids from memory, for an `Index` and the code store it was built from.

    `rows`: the store's id -> row map when the caller has one already (built from `store.ids()`
    otherwise). A flat index's buffers are looked at afresh on every call (adding or removing codes may
    move them), and its sorted id map is rebuilt when the index changed. Safe to call from several
    threads.
    """

    def __init__(self, index, store, rows: StoreLookup | None = None):
        self.index = index
        self.store = store
        self.rows = rows if rows is not None else StoreLookup(store.ids())
        self._lock = threading.Lock()
        self._positions: tuple[tuple, StoreLookup | None] | None = None  # (what it was built from, map)
        self._store_codes: tuple[np.ndarray, np.ndarray] | None = None  # (codes, live mask), other kinds

    def __call__(self, ids) -> IdCodes:
        """Codes of `ids` (any integers; ConfigError naming the first id the store lacks)."""
        given = np.asarray(ids, dtype=object).reshape(-1)  # Python ints of any size, for the message
        ids = _as_ids(given)
        rows = self.rows.rows(ids)
        if (rows < 0).any():
            raise ConfigError(f"id {given[np.argmax(rows < 0)]} is not in code store {self.store.path}")
        flat = self._flat_codes(ids)
        if flat is None:
            codes, live = self._stored_codes()
            return IdCodes(codes[rows], rows, live[rows])
        codes, in_index = flat
        for n in np.flatnonzero(~in_index):  # deleted from the index: the store still has the code
            row = int(rows[n])
            codes[n] = self.store.read(row, row + 1, paths=False).codes[0]
        return IdCodes(codes, rows, in_index)

    def prepare(self) -> None:
        """Do now what the first lookup would (a long-lived searcher's first request should not pay it)."""
        self(np.zeros(0, np.int64))  # builds the flat index's id map, or reads the store's codes

    def _flat_codes(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(codes, in_index) of `ids` from a flat index's own buffer; None for other index kinds."""
        cpu = self.index.faiss_index
        inner = _inner(cpu)
        if not isinstance(inner, faiss.IndexBinaryFlat):
            return None
        width = self.index.code_bytes
        all_codes = flatscan.faiss_codes(inner)
        id_map = None
        if isinstance(cpu, faiss.IndexBinaryIDMap):
            vector = cpu.id_map
            id_map = faiss.rev_swig_ptr(vector.data(), vector.size()) if vector.size() else np.zeros(0, np.int64)
        else:
            id_map = np.arange(inner.ntotal, dtype=np.int64)  # no id map: positions are the ids
        lookup = self._position_map(id_map, all_codes)
        positions = lookup.rows(ids) if lookup is not None else _ascending_positions(id_map, ids)
        # a position holds the id only if the id map says so there (a map built before the index changed
        # in place could point elsewhere): anything else is read from the store
        safe = np.maximum(positions, 0)
        in_index = (positions >= 0) & (id_map[safe] == ids) if len(id_map) else np.zeros(len(ids), bool)
        codes = np.zeros((len(ids), width), np.uint8)
        if in_index.any():
            codes[in_index] = all_codes[positions[in_index], :width]
        return codes, in_index

    def _position_map(self, id_map: np.ndarray, all_codes: np.ndarray) -> StoreLookup | None:
        """Id -> position map of the flat index, built once per state of the index; None when its ids
        ascend (then a binary search over the id map itself finds them, with no copy)."""
        key = (len(id_map), _address(id_map), _address(all_codes))
        cached = self._positions
        if cached is not None and cached[0] == key:
            return cached[1]
        with self._lock:
            if self._positions is None or self._positions[0] != key:
                ascending = len(id_map) < 2 or bool(np.all(id_map[1:] > id_map[:-1]))
                self._positions = (key, None if ascending else StoreLookup(id_map))
            return self._positions[1]

    def _stored_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """Every code of the store and its live mask (not deleted), read once."""
        if self._store_codes is None:
            with self._lock:
                if self._store_codes is None:
                    self._store_codes = (self.store.codes(), ~self.store.deleted())
        return self._store_codes


def _as_ids(ids: np.ndarray) -> np.ndarray:
    """Integers (an object array) as int64; one outside int64 becomes -1, which no store holds."""
    try:
        return ids.astype(np.int64)
    except OverflowError:
        return np.array([int(i) if -(2 ** 63) <= int(i) < 2 ** 63 else -1 for i in ids], np.int64)


def _ascending_positions(id_map: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if not len(id_map):
        return np.full(len(ids), -1, np.int64)
    pos = np.minimum(np.searchsorted(id_map, ids), len(id_map) - 1)
    return np.where(id_map[pos] == ids, pos, -1)


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0]) if array.size else 0
