"""Single-process dense datastore builder, for small corpora (tests, demo).

The Ray Data pipeline writes the same format at scale and must agree with this builder.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.dense_format import (MANIFEST, TRANSFORM, DatastoreError, KeyTransform, Manifest, model_fingerprint,
                                sha256_file, write_manifest_atomically)


@dataclass(frozen=True)
class Document:
    """Token ids of one document. Positions before `store_from` are context only (e.g. the
    prompt of an instruction pair): they condition the hidden states but get no entries."""

    tokens: Sequence[int]
    corpus: str = "default"
    store_from: int = 0


def hidden_states(target, tokens: Sequence[int]) -> np.ndarray:
    """[T, H] hidden states of the target's configured layer for every position of `tokens`."""
    _, out = target.prefill(list(tokens))
    return out.hidden.float().cpu().numpy()


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


def fit_transform(target, docs: Sequence[Document], dim: int = 64, max_rows: int = 20000,
                  seed: int = 0, *, max_len: int | None = None, overlap: int | None = None,
                  batch_tokens: int = 8192) -> KeyTransform:
    """Fit the key transform on the hidden states of (a sample of) the corpus: documents in a
    seeded random order until `max_rows` entry positions are collected."""
    max_len, overlap = _window_defaults(target, max_len, overlap)
    rng = np.random.default_rng(seed)
    need, total = set(), 0
    for i in rng.permutation(len(docs)):
        n = len(entry_positions(docs[i]))
        if n:
            need.add(int(i))
            total += n
            if total >= max_rows:
                break
    if total < dim:
        raise DatastoreError(f"the corpus has {total} positions, fewer than the key dimension {dim}")
    order = sorted(need)
    rows = run_windows(target, [docs[i] for i in order], max_len=max_len, overlap=overlap,
                       batch_tokens=batch_tokens, fn=lambda h: h)
    by_doc: list = [None] * len(docs)
    for i, r in zip(order, rows):
        by_doc[i] = np.concatenate(r)
    return KeyTransform.fit(sample_rows_for_fit(docs, by_doc, max_rows, seed), dim=dim)


def _window_defaults(target, max_len: int | None, overlap: int | None) -> tuple[int, int]:
    max_len = max_len or min(int(target.context_window), 4096)
    return max_len, max_len // 2 if overlap is None else overlap


def entries_table(keys: np.ndarray, values: np.ndarray, doc_ids: np.ndarray, positions: np.ndarray,
                  corpus: np.ndarray):
    """One datastore shard as an Arrow table (the row schema of ``index.dense_format``).
    keys [E, d] float32, values [E, N] int32, doc_ids [E], positions [E], corpus [E] str."""
    import pyarrow as pa

    e = len(keys)
    if not (values.shape[0] == len(doc_ids) == len(positions) == len(corpus) == e):
        raise ValueError(f"column lengths differ: keys {e}, values {values.shape[0]}, doc_ids {len(doc_ids)}, "
                         f"positions {len(positions)}, corpus {len(corpus)}")
    d, n = keys.shape[1], values.shape[1]
    return pa.table({
        "key": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(keys, np.float32).ravel(),
                                                          pa.float32()), d),
        "value": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values, np.int32).ravel(),
                                                            pa.int32()), n),
        "first_token": pa.array(np.asarray(values[:, 0], np.int32), pa.int32()),
        "doc_id": pa.array(np.asarray(doc_ids, np.int64), pa.int64()),
        "position": pa.array(np.asarray(positions, np.int32), pa.int32()),
        "corpus": pa.array(np.asarray(corpus, dtype=object).astype(str), pa.string()).dictionary_encode(),
    })


def tokens_table(doc_ids: Sequence[int], docs: Sequence[Document]):
    """The documents' token streams (for the sparse index) as an Arrow table."""
    import pyarrow as pa

    return pa.table({
        "doc_id": pa.array(list(doc_ids), pa.int64()),
        "tokens": pa.array([np.asarray(d.tokens, np.int32) for d in docs], pa.list_(pa.int32())),
        "store_from": pa.array([int(d.store_from) for d in docs], pa.int32()),
        "corpus": pa.array([d.corpus for d in docs], pa.string()),
    })


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


def hidden_states_batch(target, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Hidden states [T_i, H] (float32) of the target's configured layer for several sequences in
    one right-padded forward (equal to running each alone, up to float rounding)."""
    import torch

    if not seqs:
        return []
    lens = [len(s) for s in seqs]
    t = max(lens)
    ids = torch.zeros((len(seqs), t), dtype=torch.long, device=target.device)
    mask = torch.zeros((len(seqs), t), dtype=torch.long, device=target.device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    want_layers = target.hidden_layer != -1
    with torch.inference_mode():
        out = target._base(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=want_layers)
        hidden = out.hidden_states[target.hidden_layer] if want_layers else out.last_hidden_state
        hidden = hidden.float().cpu().numpy()
    return [hidden[i, :n] for i, n in enumerate(lens)]


@dataclass
class Extracted:
    """Entries of a set of documents (rows ordered by document, then position)."""

    keys: np.ndarray        # [E, d] float32
    values: np.ndarray      # [E, N] int32
    doc_ids: np.ndarray     # [E] int64
    positions: np.ndarray   # [E] int32
    corpus: np.ndarray      # [E] str
    forward_tokens: int = 0  # tokens run through the model (windows overlap, so >= document tokens)


def run_windows(target, docs: Sequence[Document], *, max_len: int, overlap: int, batch_tokens: int, fn,
                counter: list | None = None) -> list[list[np.ndarray]]:
    """For each document, [fn(hidden states of its stored positions) per window], windows of
    similar length batched into forwards of up to `batch_tokens` padded tokens. `counter`, if
    given, gets the number of tokens run through the model appended."""
    jobs = []       # (doc index, window index, start, end, store_lo)
    for i, d in enumerate(docs):
        for w, (s, e, lo) in enumerate(windows(len(d.tokens), d.store_from, max_len, overlap)):
            jobs.append((i, w, s, e, lo))
    jobs.sort(key=lambda j: j[3] - j[2])
    out: list[dict] = [dict() for _ in docs]
    batch: list = []

    def run(batch):
        seqs = [docs[i].tokens[s:e] for i, _, s, e, _ in batch]
        if counter is not None:
            counter.append(sum(len(q) for q in seqs))
        for (i, w, s, e, lo), h in zip(batch, hidden_states_batch(target, seqs)):
            hi = min(e, len(docs[i].tokens) - 1)
            out[i][w] = fn(h[lo - s: hi - s])

    for job in jobs:
        width = job[3] - job[2]
        if batch and (len(batch) + 1) * width > batch_tokens:
            run(batch)
            batch = []
        batch.append(job)
    if batch:
        run(batch)
    return [[parts[w] for w in sorted(parts)] for parts in out]


def extract_entries(target, transform: KeyTransform, docs: Sequence[Document], doc_ids: Sequence[int], *,
                    value_len: int, eos: int, max_len: int, overlap: int,
                    batch_tokens: int = 8192) -> Extracted:
    """Keys and values for every entry position of `docs` (rows by document, then position)."""
    counter: list[int] = []
    keys_by_doc = run_windows(target, docs, max_len=max_len, overlap=overlap, batch_tokens=batch_tokens,
                              fn=transform, counter=counter)
    return assemble_entries(docs, doc_ids, keys_by_doc, dim=transform.dim, value_len=value_len, eos=eos,
                            forward_tokens=sum(counter))


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


def build_dense_datastore(target, docs: Iterable[Document], out: str | Path, *, dim: int = 64,
                          value_len: int = 20, shard_rows: int = 200_000,
                          transform: KeyTransform | None = None, progress=None) -> Manifest:
    """Extract keys and values for every stored position and write a datastore directory.

    Written into a temporary sibling directory and renamed into place when complete, the
    manifest last: a reader never takes a half-built datastore for a whole one. `progress`,
    if given, is called as progress(done_documents, total_documents) every 100 documents.
    """
    import pyarrow.parquet as pq

    docs = [d for d in docs]
    valid = [d for d in docs if len(d.tokens) >= 2]
    eos = min(target.eos_token_ids) if target.eos_token_ids else 0
    transform = transform or fit_transform(target, valid, dim=dim)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "shards").mkdir()
        transform.save(tmp / TRANSFORM)
        manifest = Manifest(fingerprint=model_fingerprint(target), key_dim=transform.dim, value_len=value_len,
                            eos_token_id=eos, skipped=len(docs) - len(valid))
        buf: dict[str, list] = {k: [] for k in ("key", "value", "first_token", "doc_id", "position", "corpus")}

        def flush() -> None:
            if not buf["key"]:
                return
            table = entries_table(np.concatenate(buf["key"]), np.concatenate(buf["value"]),
                                  np.concatenate(buf["doc_id"]), np.concatenate(buf["position"]),
                                  np.concatenate(buf["corpus"]))
            name = f"shards/part-{len(manifest.shards):05d}.parquet"
            pq.write_table(table, tmp / name)
            manifest.shards.append({"path": name, "rows": table.num_rows, "sha256": sha256_file(tmp / name)})
            for v in buf.values():
                v.clear()

        rows = 0
        for doc_id, doc in enumerate(docs):
            if len(doc.tokens) < 2:
                continue
            tokens = np.asarray(doc.tokens, dtype=np.int64)
            pos = entry_positions(doc)
            manifest.documents += 1
            manifest.tokens += len(tokens)
            if doc.corpus not in manifest.corpora:
                manifest.corpora.append(doc.corpus)
            if len(pos) == 0:
                continue
            buf["key"].append(transform(hidden_states(target, tokens)[pos]))
            buf["value"].append(next_tokens(tokens, value_len, eos)[pos])
            buf["doc_id"].append(np.full(len(pos), doc_id, dtype=np.int64))
            buf["position"].append(pos.astype(np.int32))
            buf["corpus"].append(np.full(len(pos), doc.corpus, dtype=object))
            rows += len(pos)
            manifest.entries += len(pos)
            if rows >= shard_rows:
                flush()
                rows = 0
            if progress is not None and (doc_id + 1) % 100 == 0:
                progress(doc_id + 1, len(docs))
        flush()
        manifest.transform_sha256 = sha256_file(tmp / TRANSFORM)
        write_manifest_atomically(tmp, manifest)
        if out.exists():
            if not (out / MANIFEST).is_file() and any(out.iterdir()):
                raise DatastoreError(f"{out} exists and is not a datastore: refusing to replace it")
            shutil.rmtree(out)
        tmp.rename(out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
