"""Choose nprobe: recall@10 of the approximate index against exact search, per candidate nprobe.

The calibration queries are keys of the datastore itself, but a decoding query comes from text the
datastore has not seen: its neighbours lie in OTHER documents, usually farther away than a key's own
neighbours (adjacent positions of one document are near-duplicates). So each query's own document is
removed from both result lists before comparing: `CALIBRATION_EXCLUDE` extra neighbours are searched
to make room for it. On real keys this predicts held-out recall within about 0.01 (bench/index.py).
"""

from __future__ import annotations

import math

import numpy as np

CALIBRATION_K = 10                     # recall@10 is what the build calibrates and records
CALIBRATION_EXCLUDE = 256              # extra neighbours searched to drop the query's own document


def other_documents(sims: np.ndarray, ids: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k results per row that are not masked by `own` [q, m] (the query's own
    document): (sims [q, k], ids [q, k]), padded with -inf / -1."""
    out_s = np.full((len(ids), k), -np.inf, np.float32)
    out_i = np.full((len(ids), k), -1, np.int64)
    for r in range(len(ids)):
        keep = np.flatnonzero(~own[r] & (ids[r] >= 0))[:k]
        out_s[r, :len(keep)], out_i[r, :len(keep)] = sims[r, keep], ids[r, keep]
    return out_s, out_i


def cross_document_recall(found: np.ndarray, truth: np.ndarray, query_docs: np.ndarray, doc_of: np.ndarray,
                          k: int = CALIBRATION_K) -> float:
    """recall@k of an approximate search against exact search, both without the query's own
    document: found [q, k + CALIBRATION_EXCLUDE] ids (approximate), truth [q, k] ids (exact, own
    document already dropped, -1 padded), doc_of [E] the document of every id."""
    own = np.where(found >= 0, doc_of[np.maximum(found, 0)], -1) == np.asarray(query_docs)[:, None]
    found = other_documents(np.zeros(found.shape, np.float32), found, own, k)[1]
    hits = total = 0
    for a, b in zip(found, truth):
        b = b[b >= 0]
        hits += len(set(a[a >= 0].tolist()) & set(b.tolist()))
        total += len(b)
    return hits / total if total else 1.0


def calibrate_nprobe(search, set_nprobe, nlist: int, queries: np.ndarray, recall_of, target: float,
                     k: int = CALIBRATION_K, plateau: float = 0.002) -> tuple[int, float]:
    """Smallest nprobe in 1, 2, 4, ..., nlist with recall_of(found ids) >= target: (nprobe, recall).

    Compressed codes (SQ, PQ) cap the recall below 1: once doubling nprobe gains less than
    `plateau`, the smaller nprobe is kept rather than scanning every list for nothing."""
    candidates = sorted({min(nlist, 2 ** i) for i in range(int(math.log2(max(nlist, 1))) + 2)})
    best: tuple[int, float] | None = None
    for nprobe in candidates:
        set_nprobe(nprobe)
        recall = recall_of(search(queries, k + CALIBRATION_EXCLUDE)[1])
        if recall >= target:
            return nprobe, recall
        if best is not None and recall - best[1] < plateau:
            set_nprobe(best[0])
            return best
        best = (nprobe, recall)
    return best

