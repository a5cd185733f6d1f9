"""Compiled (numba) kernels behind `ghindex.metrics`: one pass over the database per query that counts
items per (distance, relevance) bucket, and the closed-form tie-averaged AP. See `ghindex.metrics`
for the definitions and why the pass needs no sort.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from .popcount import popcount


@numba.njit(cache=True, nogil=True)
def _tie_averaged_ap(counts, relevant, topk, harmonic, logp):
    """Expected AP@topk when items at equal distance come in uniformly random order.

    `counts[d]`, `relevant[d]`: items and relevant items at distance d; `harmonic[i]` = sum_{j<=i} 1/j;
    `logp`: scratch of length >= topk + 1.

    Derivation (McSherry & Najork 2008, extended to the top-K denominator). Take a tie bucket of n
    items, m relevant, after c items of which r are relevant. Its i-th slot has rank c + i; it is
    relevant with probability m/n, and then the number of relevant items among its i - 1
    predecessors in the bucket is hypergeometric with mean (i - 1)(m - 1)/(n - 1). So the bucket adds
        E = sum_i (m/n) (r + 1 + (i-1)(m-1)/(n-1)) / (c+i)
          = (m/n) [ (r+1) h1 + (m-1)/(n-1) h2 ],  h1 = sum_i 1/(c+i) = H(c+n) - H(c),
                                                  h2 = sum_i (i-1)/(c+i) = n - (c+1) h1
    to the AP numerator, independently of the other buckets. If the cutoff K lands inside a bucket
    (only its first t = K - c slots count), the number X of relevant items among those t slots is
    hypergeometric(n, m, t) and is also in the denominator (relevant items in the top K). Given
    X = x, the x relevant items lie uniformly among the t slots, so the partial bucket adds
    (x/t) [(r+1) h1 + (x-1)/(t-1) h2] with h1, h2 over t slots, and
        E[AP] = sum_x P(X = x) (A + partial(x)) / (r + x)      (0 when r + x = 0),
    where A is the sum of the full buckets before it. Without a split bucket, E[AP] = A / r.
    """
    c = 0
    r = 0
    total = 0.0
    for d in range(counts.shape[0]):
        n = counts[d]
        if n == 0:
            continue
        m = relevant[d]
        if c + n <= topk:
            if m > 0:
                h1 = harmonic[c + n] - harmonic[c]
                bucket = (r + 1) * h1
                if n > 1:
                    bucket += (m - 1) / (n - 1) * (n - (c + 1) * h1)
                total += m / n * bucket
            c += n
            r += m
            if c >= topk:
                break
            continue
        # the cutoff splits this bucket: t of its n slots are inside the top K
        t = topk - c
        h1 = harmonic[c + t] - harmonic[c]
        h2 = t - (c + 1) * h1
        x_lo = max(0, t - (n - m))
        x_hi = min(t, m)
        # log hypergeometric pmf by the ratio recurrence, then normalised (no under/overflow)
        logp[0] = 0.0
        best = 0.0
        for k in range(1, x_hi - x_lo + 1):
            x = x_lo + k - 1
            logp[k] = logp[k - 1] + math.log((m - x) * (t - x) / ((x + 1.0) * (n - m - t + x + 1.0)))
            if logp[k] > best:
                best = logp[k]
        norm = 0.0
        expected = 0.0
        for k in range(x_hi - x_lo + 1):
            x = x_lo + k
            p = math.exp(logp[k] - best)
            norm += p
            if r + x == 0:
                continue
            partial = 0.0
            if x > 0:
                partial = (r + 1) * h1
                if t > 1:
                    partial += (x - 1) / (t - 1) * h2
                partial *= x / t
            expected += p * (total + partial) / (r + x)
        return expected / norm
    if r == 0:
        return 0.0
    return total / r


@numba.njit(cache=True, parallel=True)
def _query_stats_kernel(q_words, db_words, multi, q_int, db_int, q_mask, db_mask, topk,
                        slot_of_rank, harmonic, n_blocks, ap, ap_avg, dist_counts, dist_relevant, relevant_at):
    n_queries, n_words = q_words.shape
    n_db = db_words.shape[0]
    n_mask = q_mask.shape[1]
    n_dist = dist_counts.shape[1]
    n_slots = relevant_at.shape[1]
    max_rank = slot_of_rank.shape[0] - 1
    n_blocks = min(n_queries, n_blocks)
    for block in numba.prange(n_blocks):
        # per-thread scratch, reused for every query of the block
        hist = np.empty(2 * n_dist, np.int64)  # hist[2d + relevant]: items seen so far
        offset = np.empty(n_dist, np.int64)
        offset_rel = np.empty(n_dist, np.int64)
        rec_dist = np.empty(n_db, np.uint16)  # one record per relevant item, in database order
        rec_rel_before = np.empty(n_db, np.int32)
        rec_other_before = np.empty(n_db, np.int32)
        slot_hits = np.empty(n_slots, np.int64)
        logp = np.empty(topk + 1 if topk < n_db else 1, np.float64)  # only a split bucket uses it
        for q in range(block * n_queries // n_blocks, (block + 1) * n_queries // n_blocks):
            hist[:] = 0
            # One pass in database order. When item j arrives, hist[] holds the items at its
            # distance that come before it, which is all its rank within the tie needs (ties by
            # database position); the offset of its distance is known once the pass is over.
            # Every item writes a record; only relevant ones advance n_rec (no branch).
            n_rec = 0
            if n_words == 1 and not multi:
                # the common case (<= 64 bits, single-label) as a tight loop
                code = q_words[q, 0]
                label = q_int[q]
                for j in range(n_db):
                    rel = np.int64(label == db_int[j])
                    c = (popcount(code ^ db_words[j, 0]) << 1) | rel
                    before = hist[c]
                    hist[c] = before + 1
                    rec_dist[n_rec] = c >> 1
                    rec_rel_before[n_rec] = before
                    rec_other_before[n_rec] = hist[c ^ 1]
                    n_rec += rel
            else:
                for j in range(n_db):
                    dist = 0
                    for w in range(n_words):
                        dist += popcount(q_words[q, w] ^ db_words[j, w])
                    rel = 0
                    if multi:
                        for w in range(n_mask):
                            if q_mask[q, w] & db_mask[j, w]:
                                rel = 1
                                break
                    elif q_int[q] == db_int[j]:
                        rel = 1
                    c = (dist << 1) | rel
                    before = hist[c]
                    hist[c] = before + 1
                    rec_dist[n_rec] = dist
                    rec_rel_before[n_rec] = before
                    rec_other_before[n_rec] = hist[c ^ 1]
                    n_rec += rel
            seen = 0
            seen_rel = 0
            for d in range(n_dist):
                offset[d] = seen  # items at smaller distances
                offset_rel[d] = seen_rel
                dist_counts[q, d] = hist[2 * d] + hist[2 * d + 1]
                dist_relevant[q, d] = hist[2 * d + 1]
                seen += hist[2 * d] + hist[2 * d + 1]
                seen_rel += hist[2 * d + 1]
            slot_hits[:] = 0
            ap_sum = 0.0
            found = 0
            for i in range(n_rec):
                d = rec_dist[i]
                rank = offset[d] + rec_rel_before[i] + rec_other_before[i] + 1
                if rank <= topk:
                    ap_sum += (offset_rel[d] + rec_rel_before[i] + 1) / rank
                    found += 1
                if rank <= max_rank:
                    slot_hits[slot_of_rank[rank]] += 1
            ap[q] = ap_sum / found if found > 0 else 0.0
            running = 0
            for s in range(n_slots):
                running += slot_hits[s]
                relevant_at[q, s] = running
            ap_avg[q] = _tie_averaged_ap(dist_counts[q], dist_relevant[q], topk, harmonic, logp)


def _harmonic(n: int) -> np.ndarray:
    """H[i] = 1 + 1/2 + ... + 1/i for i = 0..n (H[0] = 0)."""
    out = np.zeros(n + 1, np.float64)
    np.cumsum(1.0 / np.arange(1, n + 1, dtype=np.float64), out=out[1:])
    return out
