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
                  seed: int = 0) -> KeyTransform:
    """Fit the key transform on the hidden states of (a sample of) the corpus."""
    rng = np.random.default_rng(seed)
    rows, total = [], 0
    for i in rng.permutation(len(docs)):
        pos = entry_positions(docs[i])
        if len(pos) == 0:
            continue
        rows.append(hidden_states(target, docs[i].tokens)[pos])
        total += len(pos)
        if total >= max_rows:
            break
    if total < dim:
        raise DatastoreError(f"the corpus has {total} positions, fewer than the key dimension {dim}")
    return KeyTransform.fit(np.concatenate(rows)[:max_rows], dim=dim)


def build_dense_datastore(target, docs: Iterable[Document], out: str | Path, *, dim: int = 64,
                          value_len: int = 20, shard_rows: int = 200_000,
                          transform: KeyTransform | None = None, progress=None) -> Manifest:
    """Extract keys and values for every stored position and write a datastore directory.

    Written into a temporary sibling directory and renamed into place when complete, the
    manifest last: a reader never takes a half-built datastore for a whole one. `progress`,
    if given, is called as progress(done_documents, total_documents) every 100 documents.
    """
    import pyarrow as pa
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
            keys = np.concatenate(buf["key"])
            values = np.concatenate(buf["value"])
            table = pa.table({
                "key": pa.FixedSizeListArray.from_arrays(pa.array(keys.ravel(), pa.float32()), transform.dim),
                "value": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), pa.int32()), value_len),
                "first_token": pa.array(values[:, 0], pa.int32()),
                "doc_id": pa.array(np.concatenate(buf["doc_id"]), pa.int64()),
                "position": pa.array(np.concatenate(buf["position"]), pa.int32()),
                "corpus": pa.array(np.concatenate(buf["corpus"])).dictionary_encode(),
            })
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
