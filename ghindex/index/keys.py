"""Index keys and parameters: parse a binary factory string, choose one for N codes, check `name=value` params."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable

from ..errors import ConfigError
from ..hashing import check_bits

#: Below this many codes, `index_key="auto"` picks exact flat search.
AUTO_FLAT_MAX = 1_000_000
#: IVF needs this many training points per list (FAISS warns below it).
MIN_POINTS_PER_LIST = 39
#: Default IVF training sample: this many points per list (capped by the store size).
TRAIN_POINTS_PER_LIST = 64

# Index-parameter names accepted per index kind (`--index-param name=value`).
_PARAMS = {
    "flat": {},
    "ivf": {
        "nprobe": "lists visited per query (1..nlist)",
        "train_size": "codes sampled to train the coarse quantizer",
        "kmeans_iters": "k-means iterations",
    },
    "hnsw": {"efSearch": "search breadth", "efConstruction": "construction breadth"},
    "hash": {"nflip": "bits flipped around each query's hash"},
    "multihash": {"nflip": "bits flipped around each query's hash"},
}
_BUILD_ONLY_PARAMS = {"train_size", "kmeans_iters"}


@dataclass(frozen=True)
class IndexSpec:
    """A parsed, validated index key. `nlist` is None for `BIVF` with the list count left to N."""

    kind: str  # flat | ivf | hnsw | hash | multihash
    nlist: int | None = None
    quantizer_m: int | None = None  # BIVF{n}_HNSW{M}: HNSW coarse quantizer
    m: int | None = None  # BHNSW{M}
    b: int | None = None  # BHash{b}, BHash{nhash}x{b}
    nhash: int | None = None

    @property
    def key(self) -> str:
        """The canonical FAISS factory string."""
        if self.kind == "flat":
            return "BFlat"
        if self.kind == "ivf":
            key = f"BIVF{self.nlist if self.nlist is not None else ''}"
            return key + (f"_HNSW{self.quantizer_m}" if self.quantizer_m else "")
        if self.kind == "hnsw":
            return f"BHNSW{self.m}"
        if self.kind == "hash":
            return f"BHash{self.b}"
        return f"BHash{self.nhash}x{self.b}"


_KEY_FORMS = "auto, BFlat, BIVF<nlist>, BIVF, BIVF<nlist>_HNSW<M>, BHNSW<M>, BHash<b>, BHash<nhash>x<b>"
_KEY_PATTERNS = [
    ("flat", re.compile(r"BFlat")),
    ("ivf", re.compile(r"BIVF(?P<nlist>[1-9]\d*)?(?:_HNSW(?P<qm>[1-9]\d*))?")),
    ("hnsw", re.compile(r"BHNSW(?P<m>[1-9]\d*)")),
    ("multihash", re.compile(r"BHash(?P<nhash>[1-9]\d*)x(?P<b>[1-9]\d*)")),
    ("hash", re.compile(r"BHash(?P<b>[1-9]\d*)")),
]


def parse_index_key(index_key: str, bits: int) -> IndexSpec:
    """Parse a binary factory string strictly (FAISS's own parser ignores trailing junk).

    `bits` is the true code length; hash widths are checked against it, never against padding.
    """
    bits = check_bits(bits)
    text = str(index_key).strip()
    for kind, pattern in _KEY_PATTERNS:
        match = pattern.fullmatch(text)
        if not match:
            continue
        groups = {k: int(v) for k, v in match.groupdict().items() if v is not None}
        if kind == "ivf":
            return IndexSpec("ivf", nlist=groups.get("nlist"), quantizer_m=groups.get("qm"))
        if kind == "hnsw":
            if groups["m"] < 2:
                raise ConfigError(f"index key {text!r}: HNSW needs M >= 2 neighbours per node")
            return IndexSpec("hnsw", m=groups["m"])
        if kind == "hash":
            if groups["b"] > min(bits, 64):
                raise ConfigError(
                    f"index key {text!r}: the hash uses {groups['b']} bits but codes have {bits} "
                    f"(at most {min(bits, 64)})"
                )
            return IndexSpec("hash", b=groups["b"])
        if kind == "multihash":
            nhash, b = groups["nhash"], groups["b"]
            if b > 64 or nhash * b > bits:
                raise ConfigError(
                    f"index key {text!r}: {nhash} hashes of {b} bits need {nhash * b} bits "
                    f"(at most 64 each) but codes have {bits}"
                )
            return IndexSpec("multihash", b=b, nhash=nhash)
        return IndexSpec("flat")
    hint = ""
    if text.startswith("IDMap"):
        hint = " (ids are kept automatically: drop the IDMap prefix)"
    raise ConfigError(f"unknown index key {text!r}{hint}; expected one of: {_KEY_FORMS}")


def auto_nlist(n: int) -> int:
    """IVF list count for `n` codes: the power of two nearest sqrt(n), with >= 39 training points per list.

    sqrt(n) rather than FAISS's 4-16 sqrt(n) for float vectors: binary k-means runs on float copies of
    the bits, and more lists make training quadratically slower for little search gain on 64-bit codes.
    """
    target = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    cap = max(1, n // MIN_POINTS_PER_LIST)
    return int(max(1, min(target, 2 ** int(math.log2(cap)))))


def default_nprobe(nlist: int) -> int:
    """Lists visited per query by default (see benchmarks/RESULTS.md for the recall it buys)."""
    return int(min(nlist, max(1, nlist // 32)))


def auto_index_key(n: int) -> str:
    """Exact `BFlat` up to AUTO_FLAT_MAX codes, else `BIVF<auto_nlist(n)>`."""
    return "BFlat" if n <= AUTO_FLAT_MAX else f"BIVF{auto_nlist(n)}"


def resolve_index_key(index_key: str, n: int, bits: int) -> IndexSpec:
    """Turn `auto`/`BIVF` into a concrete spec for `n` codes; refuse IVF list counts that cannot train."""
    if str(index_key).strip().lower() == "auto":
        index_key = auto_index_key(n)
    spec = parse_index_key(index_key, bits)
    if spec.kind != "ivf":
        return spec
    if spec.nlist is None:
        return IndexSpec("ivf", nlist=auto_nlist(n), quantizer_m=spec.quantizer_m)
    if n < MIN_POINTS_PER_LIST * spec.nlist:
        fit = auto_nlist(n)
        raise ConfigError(
            f"index key {spec.key!r} needs at least {MIN_POINTS_PER_LIST * spec.nlist:,} codes to train "
            f"({MIN_POINTS_PER_LIST} per list) but there are {n:,}: use BIVF{fit} or fewer lists, "
            f"'BIVF' (lists chosen from N) or 'auto'"
        )
    return spec


# ------------------------------------------------------------------------------------------ params
def parse_index_params(index_param: Iterable[str] | dict | None, spec: IndexSpec) -> dict[str, int]:
    """`["nprobe=32", ...]` (or a dict) -> {"nprobe": 32}, checked against the index kind."""
    if index_param is None:
        return {}
    items = index_param.items() if isinstance(index_param, dict) else []
    if not isinstance(index_param, dict):
        if isinstance(index_param, str):
            index_param = [index_param]
        parsed = []
        for item in index_param:
            if "=" not in str(item):
                raise ConfigError(f"index parameter {item!r} must look like name=value (e.g. nprobe=32)")
            name, value = str(item).split("=", 1)
            parsed.append((name.strip(), value.strip()))
        items = parsed
    allowed = _PARAMS[spec.kind]
    params: dict[str, int] = {}
    for name, value in items:
        if name not in allowed:
            names = ", ".join(allowed) or "none"
            raise ConfigError(f"index parameter {name!r} does not apply to {spec.key} (accepted: {names})")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"index parameter {name}={value!r} must be an integer") from None
        low = 0 if name == "nflip" else 1
        if number < low:
            raise ConfigError(f"index parameter {name}={number} must be >= {low}")
        params[name] = number
    if spec.kind == "ivf" and spec.nlist is not None and params.get("nprobe", 1) > spec.nlist:
        raise ConfigError(f"index parameter nprobe={params['nprobe']} exceeds nlist={spec.nlist}")
    return params
