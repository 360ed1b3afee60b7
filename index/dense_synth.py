"""Write dense datastores from arrays, and synthetic ones for tests and benchmarks.

`write_dense_datastore` writes exactly the format of ``index.dense_format`` through its one
writer, ``index.dense_writer``: shards/part-*.parquet, transform.npz, manifest.json last.
`clustered_keys` draws unit keys shaped like real ones: a power-law mixture of clusters with a
decaying variance spectrum (as PCA-ed hidden states), overlapping enough that IVF needs a
realistic nprobe (recall@10 ~0.96 at nprobe 16 of 1024 lists for 100k keys).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from index.dense_build import next_tokens
from index.dense_format import KeyTransform, Manifest, ModelFingerprint
from index.dense_writer import staged_datastore, write_entries, write_manifest, write_transform

SYNTHETIC_FINGERPRINT = ModelFingerprint(model_id="synthetic", weights_hash="0" * 16, tokenizer_hash="0" * 16, layer=-1)


def clustered_keys(n: int, dim: int = 64, *, clusters: int | None = None, noise: float = 0.8,
                   seed: int = 0) -> np.ndarray:
    """[n, dim] float32 unit keys from a power-law mixture of `clusters` (default sqrt(n)) clusters."""
    rng = np.random.default_rng(seed)
    clusters = clusters or max(16, int(np.sqrt(n)))
    spectrum = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32) * spectrum
    weights = rng.pareto(1.5, clusters) + 1
    which = rng.choice(clusters, n, p=weights / weights.sum())
    keys = centres[which]
    keys += noise * rng.standard_normal((n, dim), dtype=np.float32) * spectrum
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    return keys


def write_dense_datastore(out: str | Path, *, keys: np.ndarray, values: np.ndarray, doc_id: np.ndarray,
                          position: np.ndarray, fingerprint: ModelFingerprint, eos_token_id: int,
                          transform: KeyTransform | None = None, corpus: str = "synthetic",
                          shard_rows: int = 200_000, documents: int | None = None,
                          tokens: int | None = None) -> Manifest:
    """Write rows keys [E, d] float32, values [E, N] int32, doc_id [E], position [E] as a
    datastore directory (replacing a previous datastore there). The transform defaults to the
    identity on d dims."""
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    values = np.ascontiguousarray(values, dtype=np.int32)
    e, d = keys.shape
    if values.ndim != 2 or values.shape[0] != e or len(doc_id) != e or len(position) != e:
        raise ValueError(f"rows disagree: keys {keys.shape}, values {values.shape}, doc_id {len(doc_id)}, "
                         f"position {len(position)}")
    n = values.shape[1]
    transform = transform or KeyTransform(np.zeros(d, np.float32), np.ones(d, np.float32), np.eye(d, dtype=np.float32))
    with staged_datastore(out) as tmp:
        manifest = Manifest(fingerprint=fingerprint, key_dim=d, value_len=n, eos_token_id=int(eos_token_id),
                            entries=e, documents=int(documents if documents is not None else len(np.unique(doc_id))),
                            tokens=int(tokens if tokens is not None else e), corpora=[corpus])
        manifest.transform_sha256 = write_transform(tmp, transform)
        for lo in range(0, e, shard_rows):
            hi = min(e, lo + shard_rows)
            name = f"part-{len(manifest.shards):05d}"
            manifest.shards.append(write_entries(tmp, name, keys[lo:hi], values[lo:hi], doc_id[lo:hi], position[lo:hi],
                                                 np.full(hi - lo, corpus, dtype=object)))
        write_manifest(tmp, manifest)
    return manifest


def synthetic_documents(n_entries: int, *, doc_len: int = 200, vocab: int = 32_000, seed: int = 0) -> list[np.ndarray]:
    """Documents of random tokens (ids in [3, vocab)) with n_entries entries in all (one per
    position but the last): repeated phrases so that suffix matches exist."""
    rng = np.random.default_rng(seed)
    phrases = rng.integers(3, vocab, size=(max(8, n_entries // 50), 8))
    docs, entries = [], 0
    while entries < n_entries:
        length = min(doc_len, n_entries - entries + 1)
        picks = phrases[rng.integers(0, len(phrases), size=(length + 7) // 8)].ravel()[:length]
        docs.append(np.where(rng.random(length) < 0.2, rng.integers(3, vocab, size=length), picks).astype(np.int64))
        entries += length - 1
    return docs


def synthetic_datastore(out: str | Path, n: int, *, dim: int = 64, value_len: int = 20, shard_rows: int = 50_000,
                        vocab: int = 32_000, eos_token_id: int = 2, seed: int = 0,
                        keys: np.ndarray | None = None) -> Manifest:
    """A datastore of `n` entries: clustered keys (or `keys` [n, dim]) and random documents."""
    docs = synthetic_documents(n, vocab=vocab, seed=seed)
    values = np.concatenate([next_tokens(d, value_len, eos_token_id)[:-1] for d in docs])
    doc_id = np.concatenate([np.full(len(d) - 1, i, np.int64) for i, d in enumerate(docs)])
    position = np.concatenate([np.arange(len(d) - 1, dtype=np.int32) for d in docs])
    if keys is None:
        keys = clustered_keys(n, dim, seed=seed)
    return write_dense_datastore(out, keys=keys, values=values, doc_id=doc_id, position=position,
                                 fingerprint=SYNTHETIC_FINGERPRINT, eos_token_id=eos_token_id,
                                 shard_rows=shard_rows, documents=len(docs), tokens=sum(len(d) for d in docs))
