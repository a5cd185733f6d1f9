"""GreedyHash core: the sign layer with a straight-through gradient, its penalty, and bit packing.

Bit conventions (shared by database and queries, see DESIGN.md):
- a real value h gives bit 1 when h >= 0 and bit 0 otherwise (sign(0) = +1, never 0);
- bits are packed LSB first: bit i of a code is ``(code[i >> 3] >> (i & 7)) & 1``, as FAISS reads it.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import ConfigError


def check_bits(bits: int) -> int:
    """Return `bits` if it is a positive multiple of 8 (FAISS binary indexes require whole bytes)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits <= 0 or bits % 8:
        raise ConfigError(
            f"bits must be a positive multiple of 8 (FAISS stores whole bytes), got {bits!r}; "
            "for the paper's 12/24-bit settings use 16/32 bits"
        )
    return int(bits)


def sign(h: torch.Tensor) -> torch.Tensor:
    """Elementwise sign with 0 mapped to +1, in h's dtype: values are exactly -1 or +1."""
    return torch.where(h >= 0, torch.ones_like(h), -torch.ones_like(h))


class GreedySign(torch.autograd.Function):
    """B = sgn(H) forward; dL/dH = dL/dB backward (GreedyHash's straight-through update)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return sign(h)

    @staticmethod
    def backward(ctx, grad_b: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad_b


def greedy_sign(h: torch.Tensor) -> torch.Tensor:
    """Binary codes in {-1, +1} whose gradient flows to `h` unchanged."""
    return GreedySign.apply(h)


def quantization_penalty(h: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """mean(|H - sgn(H)|^p): pulls H towards +-1 so the sign loses little (p = 3 in the paper)."""
    return (h - sign(h).detach()).abs().pow(p).mean()


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack an (N, nbits) array of 0/1 (or bool) to (N, nbits/8) uint8, LSB first."""
    bits = np.asarray(bits)
    if bits.ndim != 2:
        raise ConfigError(f"expected a 2-d array of bits (N, nbits), got shape {bits.shape}")
    check_bits(bits.shape[1])
    return np.packbits(bits.astype(bool), axis=1, bitorder="little")


def pack_signs(values) -> np.ndarray:
    """Pack real values (N, nbits) to codes using bit = (value >= 0); accepts numpy or torch."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().float().numpy()
    return pack_bits(np.asarray(values) >= 0)


def unpack_bits(codes: np.ndarray, nbits: int | None = None) -> np.ndarray:
    """Inverse of `pack_bits`: (N, nbytes) uint8 -> (N, nbits) uint8 of 0/1."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ConfigError(f"packed codes must be a 2-d uint8 array, got {codes.dtype} {codes.shape}")
    nbits = codes.shape[1] * 8 if nbits is None else check_bits(nbits)
    return np.unpackbits(codes, axis=1, count=nbits, bitorder="little")


def unpack_signs(codes: np.ndarray, nbits: int | None = None) -> np.ndarray:
    """Packed codes -> (N, nbits) float32 of -1/+1."""
    return unpack_bits(codes, nbits).astype(np.float32) * 2 - 1


def hamming_distances(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Exact (Q, N) int32 Hamming distances between packed codes. Allocates Q x N: small inputs only."""
    queries, database = np.asarray(queries, np.uint8), np.asarray(database, np.uint8)
    if queries.shape[1] != database.shape[1]:
        raise ConfigError(
            f"code widths differ: {queries.shape[1]} vs {database.shape[1]} bytes"
        )
    xor = queries[:, None, :] ^ database[None, :, :]
    return np.bitwise_count(xor).sum(axis=2, dtype=np.int32)


CONFIDENCE_LEVELS = 4  # per bit: 2 bits, kept as two bit planes the width of a code


def pack_confidences(confidences) -> np.ndarray:
    """How sure each bit of a database code is, (N, nbits) values in [0, 1], -> (N, 2 x nbits/8) uint8: each
    bit's level floor(4 x value) (at most 3) as two bit planes packed like codes, the high plane first.

    Why stored: a weighted distance that also discounts the bits a database image is unsure of (ones an edit
    flips) finds edited copies better than |H| of the query alone (`weighted_hamming`); four levels keep
    nearly all of it at a quarter of a float's bits per bit (benchmarks/RESULTS.md, "Copies")."""
    if isinstance(confidences, torch.Tensor):
        confidences = confidences.detach().cpu().float().numpy()
    c = np.asarray(confidences, np.float32)
    level = np.minimum(np.floor(np.clip(c, 0.0, 1.0) * CONFIDENCE_LEVELS), CONFIDENCE_LEVELS - 1).astype(np.uint8)
    return np.concatenate([pack_bits(level >> 1), pack_bits(level & 1)], axis=1)


def surest_confidences(rows: int, nbits: int) -> np.ndarray:
    """Packed confidences of `rows` codes sure of every bit (the top level, as `pack_confidences` of ones):
    for codes that come without confidences, which then rank as they would with none."""
    return np.full((int(rows), check_bits(nbits) // 4), 0xFF, np.uint8)


def unpack_confidences(packed: np.ndarray, nbits: int) -> np.ndarray:
    """Inverse of `pack_confidences` up to its levels: (N, 2 x nbits/8) uint8 -> (N, nbits) float32 weights,
    each the middle of its level ((level + 0.5) / 4)."""
    packed = np.asarray(packed)
    nbits = check_bits(nbits)
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != nbits // 4:
        raise ConfigError(f"packed confidences of {nbits}-bit codes must be (N, {nbits // 4}) uint8, "
                          f"got {packed.dtype} {packed.shape}")
    half = nbits // 8
    level = 2 * unpack_bits(packed[:, :half], nbits) + unpack_bits(packed[:, half:], nbits)
    return (level.astype(np.float32) + 0.5) / CONFIDENCE_LEVELS


def weighted_hamming(projections, candidates: np.ndarray, confidences: np.ndarray | None = None) -> np.ndarray:
    """Asymmetric distances of queries given as continuous hash outputs H to packed codes: for each
    query q and candidate code c, the sum of |H_qk| over the bits k where c differs from the query's
    own code (bit k = H_qk >= 0, as `pack_signs`).

    A query image's code throws away how sure each bit is; the distance keeps it on the query side (and,
    with `confidences`, in 2 bits per bit on the database side): a bit the query has near 0 (a coin flip
    under an edit) costs little when it differs, a confident one a lot. (Asymmetric distances for binary
    codes: Dong et al. 2008, Gordo et al. 2014.)

    `projections`: (Q, bits) floats; `candidates`: (Q, K, code_bytes) packed codes, K per query
    (e.g. a Hamming search's neighbours), or (N, code_bytes) shared by every query. Returns (Q, K) or
    (Q, N) float32.

    `confidences` (optional): the candidates' packed bit confidences (`pack_confidences`), shaped like
    `candidates` with twice the bytes; each differing bit then costs |H_qk| x the candidate's confidence in
    bit k, so a bit the database image itself is unsure of costs less too.
    """
    h = np.asarray(projections, np.float32)
    candidates = np.asarray(candidates, np.uint8)
    if h.ndim != 2:
        raise ConfigError(f"projections must be (queries, bits), got shape {h.shape}")
    nbits = h.shape[1]
    if candidates.shape[-1] * 8 != nbits:
        raise ConfigError(f"codes of {candidates.shape[-1]} bytes do not hold {nbits}-bit projections")
    query_bits = h >= 0
    weights = np.abs(h)
    if confidences is not None:
        confidences = np.asarray(confidences, np.uint8)
        if confidences.shape != candidates.shape[:-1] + (2 * candidates.shape[-1],):
            raise ConfigError(f"confidences of shape {confidences.shape} do not match candidates of shape "
                              f"{candidates.shape} (they hold twice the bytes of each code)")

    def sums(packed: np.ndarray, sure: np.ndarray | None) -> np.ndarray:  # packed: (Q or 1, K, code_bytes) -> (Q, K)
        bits = unpack_bits(packed.reshape(-1, packed.shape[-1]), nbits).astype(bool).reshape(*packed.shape[:2], nbits)
        differ = (bits != query_bits[:, None, :]) * weights[:, None, :]
        if sure is not None:
            differ = differ * unpack_confidences(sure.reshape(-1, sure.shape[-1]), nbits).reshape(*sure.shape[:2], nbits)
        return differ.sum(2, dtype=np.float32)

    if candidates.ndim == 2:  # one candidate set for all queries: in chunks, through the same sums
        out = np.empty((h.shape[0], candidates.shape[0]), np.float32)
        for start in range(0, candidates.shape[0], 1024):
            sure = None if confidences is None else confidences[None, start:start + 1024]
            out[:, start:start + 1024] = sums(candidates[None, start:start + 1024], sure)
        return out
    if candidates.ndim != 3 or candidates.shape[0] != h.shape[0]:
        raise ConfigError(f"candidates must be (queries, K, code bytes) for {h.shape[0]} queries, got {candidates.shape}")
    return sums(candidates, confidences)
