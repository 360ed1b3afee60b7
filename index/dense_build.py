"""The dense datastore's rows, model-free: documents, entry positions, values (the next tokens),
the windows long documents are read in, and entries assembled from per-window keys.

The target's side (hidden states -> keys, the single-process builder) is
``decoding.dense_extract``; the files are written by ``index.dense_writer``; the Ray Data pipeline
(``pipelines.build_datastore``) writes the same format at scale and must agree with both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Document:
    """Token ids of one document. Positions before `store_from` are context only (e.g. the
    prompt of an instruction pair): they condition the hidden states but get no entries.
    `doc_id`: its id in a pipeline build ((file index << 40) | record), None in memory."""

    tokens: Sequence[int]
    corpus: str = "default"
    store_from: int = 0
    doc_id: int | None = None


def next_tokens(tokens: np.ndarray, n: int, eos: int) -> np.ndarray:
    """[T, n] int32: row t holds tokens[t+1 : t+1+n], padded with `eos`."""
    padded = np.concatenate([tokens.astype(np.int32), np.full(n, eos, dtype=np.int32)])
    idx = np.arange(1, len(tokens) + 1)[:, None] + np.arange(n)[None, :]
    return padded[idx]


def entry_positions(doc: Document) -> np.ndarray:
    """Positions t with an entry: from max(store_from - 1, 0) (the last context position predicts
    the first stored token) to the second-to-last token (the last has no next token)."""
    start = max(doc.store_from - 1, 0)
    return np.arange(start, max(len(doc.tokens) - 1, start))


def windows(n_tokens: int, store_from: int, max_len: int, overlap: int) -> list[tuple[int, int, int]]:
    """Windows (start, end, store_lo) that cover a document's entry positions exactly once.

    Each window is run on its own (at most `max_len` tokens); it stores the entry positions in
    [store_lo, end). The first window starts at 0; each next one starts `overlap` tokens before
    the previous end, so every stored position has its full left context when the document fits
    in one window and at least `overlap` tokens of it otherwise.
    """
    if not 0 <= overlap < max_len:
        raise ValueError(f"need 0 <= overlap < max_len, got overlap={overlap}, max_len={max_len}")
    lo_entry = max(store_from - 1, 0)
    hi_entry = n_tokens - 1                    # exclusive: the last token has no next token
    out, start, stored_to = [], 0, 0
    while stored_to < hi_entry:
        end = min(start + max_len, n_tokens)
        if end > lo_entry:
            out.append((start, end, max(stored_to, lo_entry)))
        stored_to = end
        start = end - overlap
    return out


@dataclass
class Extracted:
    """Entries of a set of documents (rows ordered by document, then position)."""

    keys: np.ndarray        # [E, d] float32
    values: np.ndarray      # [E, N] int32
    doc_ids: np.ndarray     # [E] int64
    positions: np.ndarray   # [E] int32
    corpus: np.ndarray      # [E] str
    forward_tokens: int = 0  # tokens run through the model (windows overlap, so >= document tokens)


def assemble_entries(docs: Sequence[Document], doc_ids: Sequence[int], keys_by_doc: list[list[np.ndarray]], *,
                     dim: int, value_len: int, eos: int, forward_tokens: int = 0) -> Extracted:
    """Entries from per-document key blocks (one block per window, as `run_windows` returns)."""
    keys, values, ids, pos, corp = [], [], [], [], []
    for d, doc_id, doc_keys in zip(docs, doc_ids, keys_by_doc):
        if not doc_keys:
            continue
        k = np.concatenate(doc_keys)
        p = entry_positions(d)
        if len(p) != len(k):
            raise ValueError(f"document {doc_id}: {len(k)} keys for {len(p)} entry positions")
        keys.append(k)
        values.append(next_tokens(np.asarray(d.tokens, dtype=np.int64), value_len, eos)[p])
        ids.append(np.full(len(p), doc_id, dtype=np.int64))
        pos.append(p.astype(np.int32))
        corp.append(np.full(len(p), d.corpus, dtype=object))
    return Extracted(
        keys=np.concatenate(keys) if keys else np.zeros((0, dim), np.float32),
        values=np.concatenate(values).astype(np.int32) if values else np.zeros((0, value_len), np.int32),
        doc_ids=np.concatenate(ids) if ids else np.zeros(0, np.int64),
        positions=np.concatenate(pos) if pos else np.zeros(0, np.int32),
        corpus=np.concatenate(corp) if corp else np.zeros(0, object),
        forward_tokens=forward_tokens)


def sample_rows_for_fit(docs: Sequence[Document], rows_by_doc: Sequence[np.ndarray | None], max_rows: int,
                        seed: int = 0) -> np.ndarray:
    """The transform's fitting sample, chosen as `fit_transform` chooses it: documents in a seeded
    random order until `max_rows` entry positions, truncated to `max_rows`.
    rows_by_doc[i]: [n_i, H] hidden states of document i's entry positions (None: not computed)."""
    rng = np.random.default_rng(seed)
    chosen, total = [], 0
    for i in rng.permutation(len(docs)):
        n = len(entry_positions(docs[i]))
        if n == 0:
            continue
        if rows_by_doc[i] is None:
            raise ValueError(f"document {i} is in the sample but its hidden states were not computed")
        chosen.append(rows_by_doc[i])
        total += n
        if total >= max_rows:
            break
    return np.concatenate(chosen)[:max_rows] if chosen else np.zeros((0, 0), np.float32)
