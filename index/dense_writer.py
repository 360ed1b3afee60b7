"""The one writer of the dense datastore format (``index.dense_format``).

Every builder writes through these functions: the single-process builder
(``decoding.dense_extract.build_dense_datastore``), the array and synthetic writer
(``index.dense_synth.write_dense_datastore``) and the Ray pipeline's stages
(``pipelines.stages``). Each file is written whole and atomically (``index.storage``: a local
path or an ``s3://`` URI) and comes back as its manifest entry {"path", "rows", "sha256"}; the
manifest is written last. A local datastore is built inside ``staged_datastore``: a temporary
sibling directory renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index import storage
from index.dense_format import MANIFEST, TRANSFORM, DatastoreError, KeyTransform, Manifest

SHARDS, TOKENS = "shards", "tokens"


def entries_table(keys: np.ndarray, values: np.ndarray, doc_ids: np.ndarray, positions: np.ndarray,
                  corpus: np.ndarray) -> pa.Table:
    """One datastore shard as an Arrow table (the row schema of ``index.dense_format``).
    keys [E, d] float32, values [E, N] int32, doc_ids [E], positions [E], corpus [E] str."""
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


def tokens_table(doc_ids: Sequence[int], docs: Sequence) -> pa.Table:
    """The documents' token streams (for the sparse index) as an Arrow table. docs: objects with
    ``tokens``, ``store_from`` and ``corpus`` (``index.dense_build.Document``, ``index.records.Document``)."""
    return pa.table({
        "doc_id": pa.array(list(doc_ids), pa.int64()),
        "tokens": pa.array([np.asarray(d.tokens, np.int32) for d in docs], pa.list_(pa.int32())),
        "store_from": pa.array([int(d.store_from) for d in docs], pa.int32()),
        "corpus": pa.array([d.corpus for d in docs], pa.string()),
    })


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_table(root: str | Path, rel: str, table: pa.Table) -> dict:
    """Write `table` as Parquet at root/rel (whole, atomically); its manifest entry."""
    data = table_bytes(table)
    storage.write_bytes_atomic(storage.join(root, rel), data)
    return {"path": rel, "rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest()}


def write_entries(root: str | Path, name: str, keys: np.ndarray, values: np.ndarray, doc_ids: np.ndarray,
                  positions: np.ndarray, corpus: np.ndarray) -> dict:
    """An entry shard shards/<name>.parquet; its manifest entry (for ``Manifest.shards``)."""
    return write_table(root, f"{SHARDS}/{name}.parquet", entries_table(keys, values, doc_ids, positions, corpus))


def write_tokens(root: str | Path, name: str, doc_ids: Sequence[int], docs: Sequence, folder: str = TOKENS) -> dict:
    """A token-stream table <folder>/<name>.parquet; its manifest entry (``Manifest.token_shards``)."""
    return write_table(root, f"{folder}/{name}.parquet", tokens_table(doc_ids, docs))


def write_transform(root: str | Path, transform: KeyTransform) -> str:
    """transform.npz; its sha256 (for ``Manifest.transform_sha256``)."""
    buf = io.BytesIO()
    np.savez(buf, mean=transform.mean, std=transform.std, components=transform.components)
    data = buf.getvalue()
    storage.write_bytes_atomic(storage.join(root, TRANSFORM), data)
    return hashlib.sha256(data).hexdigest()


def write_manifest(root: str | Path, manifest: Manifest) -> None:
    """manifest.json, atomically: written last, it makes the directory a datastore."""
    storage.write_bytes_atomic(storage.join(root, MANIFEST), manifest.to_json().encode())


@contextlib.contextmanager
def staged_datastore(out: str | Path) -> Iterator[Path]:
    """A local datastore directory to fill (its shards/ made): a temporary sibling of `out`,
    renamed to `out` when the block ends without an error (a previous datastore there is replaced,
    anything else refused), removed otherwise. A reader never takes a half-built datastore for a
    whole one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / SHARDS).mkdir()
        yield tmp
        if out.exists():
            if not (out / MANIFEST).is_file() and any(out.iterdir()):
                raise DatastoreError(f"{out} exists and is not a datastore: refusing to replace it")
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
