"""The target's side of the dense datastore: hidden states of the configured layer -> keys, read
in windows batched into forwards, the key transform fitted on them, and the single-process
builder for small corpora (tests, the demo stores, ``sense build-dense``).

Model-free pieces (documents, positions, values, windows) are ``index.dense_build``; the files
are written by ``index.dense_writer``. The Ray Data pipeline (``pipelines.stages``,
``pipelines.first_pass``, ``pipelines.distill``) runs the same functions on its workers and must
agree with this builder.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from decoding.fingerprint import model_fingerprint
from index.dense_build import (Document, Extracted, assemble_entries, entry_positions, next_tokens,
                               sample_rows_for_fit, windows)
from index.dense_format import DatastoreError, KeyTransform, Manifest
from index.dense_writer import staged_datastore, write_entries, write_manifest, write_transform


FIT_ROWS = 20000        # positions the key transform is fitted on (fit_transform's default)


def hidden_states(target, tokens: Sequence[int]) -> np.ndarray:
    """[T, H] hidden states of the target's configured layer for every position of `tokens`."""
    _, out = target.prefill(list(tokens), reuse=False)      # a document, not a prompt to keep
    return out.hidden.float().cpu().numpy()


def fit_transform(target, docs: Sequence[Document], dim: int = 64, max_rows: int = 20000,
                  seed: int = 0, *, max_len: int | None = None, overlap: int | None = None,
                  batch_tokens: int = 8192) -> KeyTransform:
    """Fit the key transform on the hidden states of (a sample of) the corpus: documents in a
    seeded random order until `max_rows` entry positions are collected."""
    max_len, overlap = window_defaults(target, max_len, overlap)
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


def window_defaults(target, max_len: int | None, overlap: int | None) -> tuple[int, int]:
    max_len = max_len or min(int(target.context_window), 4096)
    return max_len, max_len // 2 if overlap is None else overlap


PAD_SLACK = 1.25        # a batch's longest window at most 1.25x its shortest: padding stays under 20%


def hidden_states_batch(target, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Hidden states [T_i, H] (float32) of the target's configured layer for several sequences in
    one right-padded forward (equal to running each alone, up to float rounding)."""
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


def window_states(target, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Hidden states [T_i, H] (float32) of the configured layer for each window: on the lean
    forward one prefill each (the engine's own prompt forward; 80 GSM8K documents of ~176
    tokens, bfloat16, 2-core Zen 3: 696-699 tokens/s against 555-573 for right-padded batches
    of up to 8,192 tokens through the model's forward), elsewhere :func:`hidden_states_batch`, as
    for a window of the whole context (a prefill keeps room for a token)."""
    if target.lean is None or any(len(s) >= target.context_window for s in seqs):
        return hidden_states_batch(target, seqs)
    with torch.inference_mode():
        return [hidden_states(target, s) for s in seqs]


def run_windows(target, docs: Sequence[Document], *, max_len: int, overlap: int, batch_tokens: int, fn,
                on_tokens=None) -> list[list[np.ndarray]]:
    """For each document, [fn(hidden states of its stored positions) per window], windows of
    similar length batched into forwards of up to `batch_tokens` padded tokens (one window a
    forward on the lean forward: :func:`window_states`). A batch also ends
    where the next window is more than ``PAD_SLACK`` times its shortest one, so padding never
    costs more than that share of the compute (one batch of a 100- and a 436-token window padded
    both to 436 and ran 2.2x the tokens, slower than the two alone). `on_tokens(n)`, if given,
    is called after each forward with the n tokens it ran (counting, progress)."""
    jobs = []       # (doc index, window index, start, end, store_lo)
    for i, d in enumerate(docs):
        for w, (s, e, lo) in enumerate(windows(len(d.tokens), d.store_from, max_len, overlap)):
            jobs.append((i, w, s, e, lo))
    jobs.sort(key=lambda j: j[3] - j[2])
    out: list[dict] = [dict() for _ in docs]
    batch: list = []

    def run(batch):
        seqs = [docs[i].tokens[s:e] for i, _, s, e, _ in batch]
        for (i, w, s, e, lo), h in zip(batch, window_states(target, seqs)):
            hi = min(e, len(docs[i].tokens) - 1)
            out[i][w] = fn(h[lo - s: hi - s])
        if on_tokens is not None:
            on_tokens(sum(len(q) for q in seqs))

    for job in jobs:
        width = job[3] - job[2]
        if batch and ((len(batch) + 1) * width > batch_tokens
                      or width > PAD_SLACK * (batch[0][3] - batch[0][2])):
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
                              fn=transform, on_tokens=counter.append)
    return assemble_entries(docs, doc_ids, keys_by_doc, dim=transform.dim, value_len=value_len, eos=eos,
                            forward_tokens=sum(counter))


def states_by_window(target, docs: Sequence[Document], states: Sequence[np.ndarray | None], *, max_len: int,
                     overlap: int, batch_tokens: int = 8192, fn=lambda h: h,
                     on_tokens=None) -> list[list[np.ndarray]]:
    """:func:`run_windows`'s result, fn(hidden states) per window of each document, from hidden
    states already at hand where they are what its forward would compute: `states[i]` the rows
    of document i's entry positions (``generate_greedy_with_states``), taken where they are all
    there and the document fits one window (its rows then see their whole left context, as the
    decode steps that computed them did). The other documents run the forward."""
    out: list = [None] * len(docs)
    rest = []
    for i, (d, h) in enumerate(zip(docs, states)):
        if h is not None and len(d.tokens) <= max_len and len(h) == len(entry_positions(d)):
            out[i] = [fn(h)] if len(h) else []
        else:
            rest.append(i)
    if rest:
        ran = run_windows(target, [docs[i] for i in rest], max_len=max_len, overlap=overlap,
                          batch_tokens=batch_tokens, fn=fn, on_tokens=on_tokens)
        for i, r in zip(rest, ran):
            out[i] = r
    return out


def build_dense_datastore(target, docs: Iterable[Document], out: str | Path, *, dim: int = 64,
                          value_len: int = 20, shard_rows: int = 200_000,
                          transform: KeyTransform | None = None, progress=None) -> Manifest:
    """Extract keys and values for every stored position and write a datastore directory.

    Written into a temporary sibling directory and renamed into place when complete, the
    manifest last: a reader never takes a half-built datastore for a whole one. `progress`,
    if given, is called as progress(done_documents, total_documents) every 100 documents.
    """
    docs = [d for d in docs]
    valid = [d for d in docs if len(d.tokens) >= 2]
    eos = min(target.eos_token_ids) if target.eos_token_ids else 0
    rows_of: dict[int, np.ndarray] = {}
    with_entries = [i for i, d in enumerate(docs) if len(d.tokens) >= 2 and len(entry_positions(d))]
    if transform is None and sum(len(entry_positions(docs[i])) for i in with_entries) <= FIT_ROWS:
        # The fit reads every document (a small corpus): one forward pass serves the fit and the
        # keys, the same windows and batches fit_transform would run.
        max_len, overlap = window_defaults(target, None, None)
        rows = run_windows(target, [docs[i] for i in with_entries], max_len=max_len, overlap=overlap,
                           batch_tokens=8192, fn=lambda h: h)
        rows_of = {i: np.concatenate(r) for i, r in zip(with_entries, rows)}
        by_valid = [rows_of.get(i) for i, d in enumerate(docs) if len(d.tokens) >= 2]
        transform = KeyTransform.fit(sample_rows_for_fit(valid, by_valid, FIT_ROWS, 0), dim=dim)
    transform = transform or fit_transform(target, valid, dim=dim, max_rows=FIT_ROWS)
    with staged_datastore(out) as tmp:
        manifest = Manifest(fingerprint=model_fingerprint(target), key_dim=transform.dim, value_len=value_len,
                            eos_token_id=eos, skipped=len(docs) - len(valid),
                            key_dtype=str(target.dtype).removeprefix("torch."))
        manifest.transform_sha256 = write_transform(tmp, transform)
        buf: dict[str, list] = {k: [] for k in ("key", "value", "doc_id", "position", "corpus")}

        def flush() -> None:
            if not buf["key"]:
                return
            manifest.shards.append(write_entries(tmp, f"part-{len(manifest.shards):05d}",
                                                 *(np.concatenate(buf[k]) for k in buf)))
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
            hidden = rows_of[doc_id] if doc_id in rows_of else hidden_states(target, tokens)[pos]
            buf["key"].append(transform(hidden))
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
        write_manifest(tmp, manifest)
    return manifest
