"""The datastore side of the index build, and the Ray tasks (plain functions;
``pipelines.build_index.build_artifact`` wraps them with ray.remote, one CPU each).

Global entry ids are the datastore's row order (its Parquet files in manifest order, rows in file
order), as ``DenseStore.load`` numbers them; an index shard is a contiguous id range (`Piece`s of
files). Every problem with the datastore is a one-line ``DatastoreError``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index import faiss_ops, storage
from index.artifact_format import safe_relpath, sha256_bytes
from index.calibration import CALIBRATION_EXCLUDE, other_documents
from index.dense_format import MANIFEST as DATASTORE_MANIFEST
from index.dense_format import DatastoreError, Manifest


@dataclass(frozen=True)
class Piece:
    """Rows lo..hi-1 of datastore file `file` (index into the manifest's shard list)."""

    file: int
    lo: int
    hi: int


def read_datastore(uri: str) -> tuple[Manifest, bytes]:
    """The datastore's manifest (validated: safe shard paths, row counts adding up)."""
    path = storage.join(uri, DATASTORE_MANIFEST)
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise DatastoreError(f"{uri}: no {DATASTORE_MANIFEST}: not a datastore, or its build did not finish") from None
    manifest = Manifest.from_json(raw.decode("utf-8", "replace"), where=path)
    for s in list(manifest.shards) + list(getattr(manifest, "token_shards", None) or []):
        safe_relpath(s.get("path"), path)
    rows = sum(int(s["rows"]) for s in manifest.shards)
    if rows != manifest.entries:
        raise DatastoreError(f"{path}: shards hold {rows} rows, the manifest says {manifest.entries} entries")
    if manifest.entries == 0:
        raise DatastoreError(f"{uri}: the datastore has no entries: nothing to index")
    return manifest, raw


def plan_shards(rows: list[int], n: int) -> list[tuple[int, list[Piece]]]:
    """Split ids 0..sum(rows)-1 into n contiguous near-equal ranges: [(id_start, pieces)]."""
    total = sum(rows)
    n = max(1, min(n, total))
    bounds = [total * i // n for i in range(n + 1)]
    starts = np.concatenate([[0], np.cumsum(rows)])
    plan = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        pieces = []
        for f, (s, e) in enumerate(zip(starts[:-1], starts[1:])):
            lo, hi = max(a, s), min(b, e)
            if lo < hi:
                pieces.append(Piece(f, int(lo - s), int(hi - s)))
        plan.append((a, pieces))
    return plan


def _read_columns(ds_uri: str, shard: dict, columns: list[str], *, verify: bool):
    """One datastore Parquet file as a pyarrow Table of `columns`; with `verify`, the whole file
    is read and its sha256 checked against the manifest first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri = storage.join(ds_uri, shard["path"])
    try:
        if verify:
            raw = storage.read_bytes(uri)
            if sha256_bytes(raw) != shard["sha256"]:
                raise DatastoreError(f"{uri}: sha256 mismatch with the datastore manifest (corrupt or truncated)")
            table = pq.read_table(pa.BufferReader(raw), columns=columns)
        else:
            fs, path = storage.open_fs(uri)
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=columns)
    except FileNotFoundError:
        raise DatastoreError(f"{uri}: listed in the datastore manifest but missing") from None
    except (DatastoreError, storage.StorageError):
        raise
    except Exception as exc:                                   # pyarrow raises several types
        raise DatastoreError(f"{uri}: unreadable Parquet ({type(exc).__name__}: {exc})") from None
    if table.num_rows != shard["rows"]:
        raise DatastoreError(f"{uri}: {table.num_rows} rows, the datastore manifest says {shard['rows']}")
    return table


def _fixed(table, column: str, width: int, dtype) -> np.ndarray:
    arr = table.column(column).combine_chunks()
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    if len(flat) != len(arr) * width:
        raise DatastoreError(f"column {column!r} is not a fixed-size list of {width}")
    return flat.reshape(-1, width).astype(dtype, copy=False)


def check_keys(keys: np.ndarray, where: str) -> None:
    if not np.isfinite(keys).all():
        raise DatastoreError(f"{where}: keys contain NaN or infinity")
    norms = np.linalg.norm(keys, axis=1)
    if len(norms) and np.abs(norms - 1).max() > 1e-3:
        raise DatastoreError(f"{where}: keys are not unit-norm (norms {norms.min():.3f}..{norms.max():.3f}); "
                             f"the index uses inner product on normalised keys")


# ---------------------------------------------------------------------------------------------
# Ray tasks (plain functions here; wrapped with ray.remote in build_artifact)


def sample_task(ds_uri: str, shards: list[dict], pieces: list[Piece], id_start: int, dim: int, rate: float,
                seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Bernoulli(rate) sample of one index shard's keys:
    (keys [s, d] float32, global ids [s] int64, doc ids [s] int64)."""
    rng = np.random.default_rng(seed)
    keys, ids, docs, offset = [], [], [], id_start
    for p in pieces:
        table = _read_columns(ds_uri, shards[p.file], ["key", "doc_id"], verify=False).slice(p.lo, p.hi - p.lo)
        pick = np.flatnonzero(rng.random(table.num_rows) < rate)
        keys.append(_fixed(table, "key", dim, np.float32)[pick])
        ids.append(pick + offset)
        docs.append(table.column("doc_id").to_numpy()[pick])
        offset += p.hi - p.lo
    return np.concatenate(keys), np.concatenate(ids).astype(np.int64), np.concatenate(docs).astype(np.int64)


def add_task(ds_uri: str, shards: list[dict], pieces: list[Piece], id_start: int, dim: int, value_len: int,
             trained: np.ndarray, queries: np.ndarray | None, query_docs: np.ndarray | None, k: int) -> dict:
    """Add one shard's keys (global ids id_start..) to a copy of the trained index.

    Returns {"index": serialized index (uint8), "values": [r, N] int32, "first_token": [r] int32,
    "doc_id": [r] int64, "truth": (sims [q, k], ids [q, k]) exact over this shard's entries of
    OTHER documents than each query's (-1 padded), or None}."""
    t0 = time.time()
    cache: dict[int, object] = {}
    keys, values, first, docs = [], [], [], []
    for p in pieces:
        if p.file not in cache:
            cache[p.file] = _read_columns(ds_uri, shards[p.file], ["key", "value", "first_token", "doc_id"],
                                          verify=True)
        table = cache[p.file].slice(p.lo, p.hi - p.lo)
        keys.append(_fixed(table, "key", dim, np.float32))
        values.append(_fixed(table, "value", value_len, np.int32))
        first.append(table.column("first_token").to_numpy().astype(np.int32))
        docs.append(table.column("doc_id").to_numpy().astype(np.int64))
    keys = np.ascontiguousarray(np.concatenate(keys))
    check_keys(keys, f"{ds_uri} (ids {id_start}..)")
    ids = np.arange(id_start, id_start + len(keys), dtype=np.int64)
    index = faiss_ops.deserialize(trained)
    index.add_with_ids(keys, ids)
    docs = np.concatenate(docs)
    truth = None
    if queries is not None and len(queries):
        sims, found = faiss_ops.exact_topk(keys, ids, queries, k + CALIBRATION_EXCLUDE)
        own = np.where(found >= 0, docs[np.maximum(found - id_start, 0)], -1) == np.asarray(query_docs)[:, None]
        truth = other_documents(sims, found, own, k)
    return {"index": faiss_ops.serialize(index), "values": np.concatenate(values), "first_token": np.concatenate(first),
            "doc_id": docs, "truth": truth, "seconds": time.time() - t0}


def sparse_task(ds_uri: str, shards: list[dict], token_shards: list[dict], part: int, parts: int,
                max_suffix: int) -> dict:
    """REST suffix index over the documents with doc_id % parts == part: from the datastore's
    token streams (tokens/*.parquet, the stored part tokens[store_from:]) when it has them, else
    rebuilt from the rows (token at t+1 = first_token of row t).
    Returns {"files": {name: bytes}, "n_tokens", "n_docs"}."""
    from index.sparse import SparseIndex
    from index.sparse_shards import token_streams

    if token_shards:
        docs: list[tuple[int, np.ndarray]] = []
        for shard in token_shards:
            table = _read_columns(ds_uri, shard, ["doc_id", "tokens", "store_from"], verify=True)
            ids = table.column("doc_id").to_numpy()
            starts = table.column("store_from").to_numpy()
            tokens = table.column("tokens").to_pylist()
            docs += [(int(i), np.asarray(t[max(int(s), 0):], np.int64))
                     for i, s, t in zip(ids, starts, tokens) if i % parts == part]
        streams = [t for _, t in sorted(docs, key=lambda it: it[0])]
    else:
        doc, pos, tok = [], [], []
        for shard in shards:
            table = _read_columns(ds_uri, shard, ["doc_id", "position", "first_token"], verify=False)
            d = table.column("doc_id").to_numpy()
            keep = d % parts == part
            doc.append(d[keep])
            pos.append(table.column("position").to_numpy()[keep])
            tok.append(table.column("first_token").to_numpy()[keep])
        streams = token_streams(np.concatenate(doc), np.concatenate(pos), np.concatenate(tok))
    index = SparseIndex.build(streams, max_suffix=max_suffix)
    with tempfile.TemporaryDirectory() as tmp:
        index.save(Path(tmp) / "sparse")
        files = {p.name: p.read_bytes() for p in (Path(tmp) / "sparse").iterdir()}
    return {"files": files, "n_tokens": index.n_tokens, "n_docs": index.n_docs}

