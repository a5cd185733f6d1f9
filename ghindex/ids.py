"""Item ids: parsing the ids a user gives, and mapping ids to the rows (database positions) of a store."""
from __future__ import annotations

import numpy as np

from .errors import ConfigError


def parse_ids(ids) -> list[int]:
    """'3,17' / ['3', '17'] / [3, 17] -> [3, 17] (ConfigError for anything else)."""
    if isinstance(ids, (str, bytes)):
        ids = [ids]
    out = []
    for item in ids:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                value = int(part)
            except ValueError:
                raise ConfigError(f"ids must be integers separated by commas, got {part!r}") from None
            out.append(value)
    return out


class StoreLookup:
    """Map the ids a search returns to rows of the code store (database positions)."""

    def __init__(self, store_ids: np.ndarray):
        store_ids = np.asarray(store_ids, np.int64)
        self.order = np.argsort(store_ids, kind="stable")
        self.sorted_ids = store_ids[self.order]

    def rows(self, ids) -> np.ndarray:
        """Rows of `ids` (any shape); -1 where an id is -1 or not in the store."""
        ids = np.asarray(ids, np.int64)
        if not len(self.sorted_ids):
            return np.full(ids.shape, -1, np.int64)
        pos = np.clip(np.searchsorted(self.sorted_ids, ids), 0, len(self.sorted_ids) - 1)
        found = (self.sorted_ids[pos] == ids) & (ids >= 0)
        return np.where(found, self.order[pos], -1)
