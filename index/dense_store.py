"""Load a dense datastore for retrieval: keys in a FAISS index, values in arrays by id."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index import faiss_ops
from index.cache import cache_root
from index.dense_format import (TRANSFORM, DatastoreError, KeyTransform, Manifest, ModelFingerprint,
                                check_compatible, read_manifest, sha256_file)


NPROBE = 32         # IVF-Flat above faiss_ops.EXACT_MAX keys: recall@50 0.97 over 48k keys (1,024 lists)


def build_faiss_index(keys: np.ndarray, *, nprobe: int = NPROBE, seed: int = 0):
    """Inner-product index over unit keys [E, d], by the artifacts' rule (faiss_ops.choose_factory:
    exact up to faiss_ops.EXACT_MAX keys, IVF above) with positional ids; an IVF is trained on a
    sample of faiss_ops.TRAIN_PER_LIST keys per list."""
    import faiss

    keys = np.ascontiguousarray(keys, dtype=np.float32)
    e, d = keys.shape
    factory = faiss_ops.choose_factory(e, d)
    if faiss_ops.is_exact(factory):
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss_ops.make_index(factory, d)
        rng = np.random.default_rng(seed)
        faiss_ops.train_index(index, keys[rng.choice(e, faiss_ops.training_size(factory, e), replace=False)],
                              seed=seed, use_gpu=False)
        faiss_ops.set_nprobe(index, nprobe)
    if e:
        index.add(keys)
    return index


INDEX_CACHE = "dense-faiss"      # cache_root()'s folder of the trained indexes of dense datastores


def cached_faiss_index(manifest: Manifest, keys: np.ndarray, *, nprobe: int = NPROBE, seed: int = 0,
                       rows: tuple[int, int] | None = None):
    """:func:`build_faiss_index` of a datastore's keys (or of its rows [lo, hi) given as `rows`,
    `keys` being those rows: an index shard's part), the trained IVF index kept on disk.

    Training the IVF is most of a load (93k keys, 1,000 GSM8K answers: 1.2 s of k-means at every
    ``sense generate``), and its result depends only on the keys, the factory and the seed: it is
    written once under ``$SENSE_CACHE_DIR/dense-faiss``, named by the
    manifest's checksums of the keys' shards and transform, the factory, the seed and the FAISS
    version, and read back on later loads. A file that does not read, or whose size or dimension
    is not the keys', is built again. An exact (Flat) index is only the keys copied: never cached.
    The file is written to a temporary name and renamed, so a concurrent load reads a whole one or
    none; an unwritable cache only costs the training."""
    import faiss

    e, d = keys.shape
    factory = faiss_ops.choose_factory(e, d)
    if faiss_ops.is_exact(factory) or not manifest.shards or not all(s.get("sha256") for s in manifest.shards):
        return build_faiss_index(keys, nprobe=nprobe, seed=seed)
    ident = json.dumps({"shards": [(s["path"], s["rows"], s["sha256"]) for s in manifest.shards],
                        "transform": manifest.transform_sha256, "rows": rows, "entries": e, "dim": d, "factory": factory,
                        "train_per_list": faiss_ops.TRAIN_PER_LIST, "seed": seed, "faiss": faiss.__version__},
                       sort_keys=True)
    path = cache_root() / INDEX_CACHE / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.faiss"
    if path.is_file():
        try:
            index = faiss_ops.read_index(path, mmap=path.stat().st_size > faiss_ops.IN_MEMORY_MAX)
            if index.ntotal == e and index.d == d and index.is_trained:
                faiss_ops.set_nprobe(index, nprobe)
                return index
        except RuntimeError:            # truncated or not an index: build it again
            pass
    index = build_faiss_index(keys, nprobe=nprobe, seed=seed)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        faiss_ops.write_index(index, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError):     # a read-only or full cache: the index is still built
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return index


@dataclass
class DenseStore:
    """keys: [E, d] float32 (unit norm); values: [E, N] int32; first_token: [E] int32."""

    manifest: Manifest
    transform: KeyTransform
    keys: np.ndarray
    values: np.ndarray
    first_token: np.ndarray
    index: object = None
    nprobe: int = NPROBE
    # successors[i]: how many rows after row i continue its document position by position (so row
    # i + j holds position + j for j <= successors[i]); None when unknown
    successors: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = build_faiss_index(self.keys, nprobe=self.nprobe)

    def __len__(self) -> int:
        return len(self.keys)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product top-k of [q, d] queries: (similarities [q, k], ids [q, k]; -1 = none)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.keys.shape[1]:
            raise ValueError(f"queries have dimension {queries.shape[1]}, keys {self.keys.shape[1]}")
        return self.index.search(queries, k)

    @classmethod
    def load(cls, root: str | Path, *, expect: ModelFingerprint | None = None,
             verify_checksums: bool = True) -> "DenseStore":
        """Read a datastore directory; with `expect`, refuse one built for another model."""
        import pyarrow.parquet as pq

        root = Path(root)
        manifest = read_manifest(root)
        if expect is not None:
            check_compatible(manifest, expect)
        tpath = root / TRANSFORM
        if not tpath.is_file():
            raise DatastoreError(f"{root}: {TRANSFORM} is missing")
        if verify_checksums and sha256_file(tpath) != manifest.transform_sha256:
            raise DatastoreError(f"{tpath}: checksum mismatch (corrupt or replaced)")
        transform = KeyTransform.load(tpath)
        keys, values, first, docs, positions = [], [], [], [], []
        for shard in manifest.shards:
            path = root / shard["path"]
            if not path.resolve().is_relative_to(root.resolve()):
                raise DatastoreError(f"{root}: shard path {shard['path']!r} points outside the datastore")
            if not path.is_file():
                raise DatastoreError(f"{path}: shard listed in the manifest is missing")
            if verify_checksums and sha256_file(path) != shard["sha256"]:
                raise DatastoreError(f"{path}: checksum mismatch (corrupt or truncated)")
            try:
                table = pq.read_table(path, columns=["key", "value", "first_token", "doc_id", "position"])
            except Exception as exc:  # pyarrow raises several types for corrupt files
                raise DatastoreError(f"{path}: unreadable Parquet ({exc})") from None
            if table.num_rows != shard["rows"]:
                raise DatastoreError(f"{path}: {table.num_rows} rows, the manifest says {shard['rows']}")
            keys.append(table.column("key").combine_chunks().flatten().to_numpy().reshape(-1, manifest.key_dim))
            values.append(table.column("value").combine_chunks().flatten().to_numpy()
                          .reshape(-1, manifest.value_len))
            first.append(table.column("first_token").to_numpy())
            docs.append(table.column("doc_id").to_numpy())
            positions.append(table.column("position").to_numpy())
        d, n = manifest.key_dim, manifest.value_len
        keys = np.ascontiguousarray(np.concatenate(keys), dtype=np.float32) if keys else np.zeros((0, d), np.float32)
        return cls(manifest=manifest, transform=transform, keys=keys,
                   # cached only where the checksums proved the keys are the manifest's
                   index=cached_faiss_index(manifest, keys) if verify_checksums else None,
                   values=np.concatenate(values).astype(np.int32) if values else np.zeros((0, n), np.int32),
                   first_token=np.concatenate(first).astype(np.int32) if first else np.zeros(0, np.int32),
                   successors=successor_runs(np.concatenate(docs), np.concatenate(positions)) if docs else None)


def successor_runs(doc_id: np.ndarray, position: np.ndarray, cap: int = 255) -> np.ndarray:
    """[E] uint8: for each row, how many following rows continue its document at the next
    positions (capped at `cap`; drafts are far shorter)."""
    if doc_id.shape != position.shape or doc_id.ndim != 1:
        raise ValueError("doc_id and position must be 1-d arrays of the same length")
    out = np.zeros(len(doc_id), dtype=np.int64)
    if len(doc_id) > 1:
        cont = (doc_id[1:] == doc_id[:-1]) & (position[1:] == position[:-1] + 1)   # row i+1 continues row i
        # out[i] = length of the run of True in cont starting at i: scan it reversed
        rev = cont[::-1]
        idx = np.arange(len(rev))
        last_break = np.maximum.accumulate(np.where(rev, -1, idx))
        out[:-1] = (idx - last_break)[::-1]
    return np.minimum(out, cap).astype(np.uint8)
