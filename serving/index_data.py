"""The datastores of one index version, loaded in this process.

Two uses: the decoder holds small indexes whole (:func:`load_version_stores`: the one datastore
loader of the CLI, serving and the benchmarks, ``decoding.stores.load_datastores``), and an
index-shard replica holds its part of the dense index (:func:`load_shard_data`). Sources
(``IndexConfig``): a published index artifact (``index.artifact``), a datastore directory, or
the GSM8K defaults built into the local cache (``decoding.demo_stores``).

A shard answers a search with :class:`Hits`: the top-k neighbours' similarities and GLOBAL ids
together with their payload (first token and value tokens), so the decoder needs none of the
index's arrays; :func:`merge_hits` merges the shards' answers into the global top-k.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from serving.config import IndexConfig

# The store loaders (FAISS, the model's fingerprint, torch) are imported inside the functions that
# load: the shard client (serving.remote_index) imports this module for its small types, and
# the modules that import it are imported wherever the application is built.
log = logging.getLogger(__name__)


@dataclass
class IndexMeta:
    """What the decoder needs to query a sharded dense index of one version."""

    key: str                   # IndexConfig.key(): the version's id across deployments
    label: str                 # IndexConfig.version
    source: str                # where it was loaded from (artifact version URI, directory, "default")
    dim: int
    value_len: int
    eos_token_id: int
    size: int                  # entries in the whole index (all shards)
    transform: object          # index.dense_format.KeyTransform
    fingerprint: object = None # index.dense_format.ModelFingerprint


@dataclass
class Hits:
    """Top-k of n queries: sims [n, k] float32 (-inf = none), ids [n, k] int64 global (-1 = none),
    first [n, k] int32 and values [n, k, N] int32 (the neighbours' payload; junk where id = -1)."""

    sims: np.ndarray
    ids: np.ndarray
    first: np.ndarray
    values: np.ndarray

    @classmethod
    def empty(cls, n: int, k: int, value_len: int) -> "Hits":
        return cls(np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64),
                   np.zeros((n, k), np.int32), np.zeros((n, k, value_len), np.int32))

    def row(self, i: int) -> "Hits":
        return Hits(self.sims[i:i + 1], self.ids[i:i + 1], self.first[i:i + 1], self.values[i:i + 1])


def merge_hits(parts: list[Hits], k: int) -> Hits:
    """Global top-k of per-shard hits (ids disjoint): best first, ties to the smaller id."""
    if len(parts) == 1 and parts[0].sims.shape[1] == k:
        return parts[0]
    sims = np.concatenate([p.sims for p in parts], axis=1).astype(np.float32)
    ids = np.concatenate([p.ids for p in parts], axis=1)
    first = np.concatenate([p.first for p in parts], axis=1)
    values = np.concatenate([p.values for p in parts], axis=1)
    sims = np.where(ids < 0, -np.inf, sims).astype(np.float32)
    tie = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((tie, -sims), axis=-1)[:, :k]
    out = Hits(np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1),
               np.take_along_axis(first, order, 1), np.take_along_axis(values, order[..., None], 1))
    if out.sims.shape[1] < k:
        pad = Hits.empty(out.sims.shape[0], k - out.sims.shape[1], values.shape[-1])
        out = Hits(*(np.concatenate([a, b], axis=1) for a, b in
                     ((out.sims, pad.sims), (out.ids, pad.ids), (out.first, pad.first), (out.values, pad.values))))
    return out


def load_version_stores(index: IndexConfig, target, *, dense: bool = True):
    """The datastores of this version a decoder holds (``decoding.methods.Datastores``): the REST
    index and, unless the dense index is held by the shards (`dense=False`), the whole dense
    store (checked against `target`'s fingerprint); each None where the config has none. An
    artifact's CURRENT is resolved once, so both come from the same version."""
    from decoding.stores import load_datastores

    return load_datastores(target, index=index.uri, version=index.artifact_version, sparse=index.source("sparse"),
                           dense=index.source("dense") if dense else None,
                           dense_default_docs=index.dense_default_docs, nprobe=index.nprobe)


class _RowRange:
    """Rows [lo, hi) of a dense datastore with their own FAISS index; search returns global ids."""

    def __init__(self, keys: np.ndarray, lo: int, nprobe: int | None, manifest=None) -> None:
        """`manifest`: the datastore's, whose checksums name the part's trained index in the
        local cache (``index.dense_store.cached_faiss_index``); None: built here."""
        from index.dense_store import build_faiss_index, cached_faiss_index

        self.lo = lo
        self.rows = len(keys)
        kw = {"nprobe": nprobe} if nprobe else {}
        self.index = (build_faiss_index(keys, **kw) if manifest is None
                      else cached_faiss_index(manifest, keys, rows=(lo, lo + len(keys)), **kw))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.rows == 0:
            n = len(queries)
            return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        sims, ids = self.index.search(queries, k)
        return sims, np.where(ids >= 0, ids + self.lo, -1).astype(np.int64)


@dataclass
class ShardData:
    """The part of one index version a shard replica serves."""

    meta: IndexMeta
    searchers: list = field(default_factory=list)    # .search(q, k) -> (sims, GLOBAL ids)
    values: np.ndarray | None = None                 # [E, N], indexable by global id (memory map)
    first_token: np.ndarray | None = None            # [E]

    def search(self, queries: np.ndarray, k: int) -> Hits:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        n = len(queries)
        parts = []
        for s in self.searchers:
            sims, ids = s.search(queries, k)
            ids = np.asarray(ids, np.int64)
            safe = np.where(ids >= 0, ids, 0)
            parts.append(Hits(np.asarray(sims, np.float32), ids, np.asarray(self.first_token[safe], np.int32),
                              np.asarray(self.values[safe], np.int32)))
        if not parts:
            return Hits.empty(n, k, self.meta.value_len)
        return merge_hits(parts, k)


def _meta(index: IndexConfig, source: str, manifest, transform, size: int) -> IndexMeta:
    return IndexMeta(key=index.key(), label=index.version, source=source, dim=int(manifest.key_dim),
                     value_len=int(manifest.value_len), eos_token_id=int(manifest.eos_token_id), size=int(size),
                     transform=transform, fingerprint=getattr(manifest, "fingerprint", None))


def load_shard_data(index: IndexConfig, shard_id: int, num_shards: int, load_target=None) -> ShardData | None:
    """Shard `shard_id` of `num_shards`: for an artifact, its dense shards i with
    i % num_shards == shard_id (each loaded alone) and the memory-mapped payload arrays; for a
    datastore directory or the default store, an even split of its rows. None: no dense index.

    `load_target()` gives a TargetModel, needed only to build the default store on first use."""
    from decoding.stores import is_artifact, load_dense_store, resolve_index

    src = index.source("dense")
    if src is None:
        return None
    if src == "artifact" or (src != "default" and is_artifact(src)):
        from index.artifact import load_artifact, load_shard

        uri = resolve_index(index.uri, index.artifact_version) if src == "artifact" else resolve_index(src)
        art = load_artifact(uri, load_index=False)
        n = len(art.manifest.dense_shards)
        searchers = [load_shard(uri, i) for i in range(n) if i % num_shards == shard_id]
        if index.nprobe is not None:
            for s in searchers:
                s.nprobe = index.nprobe
        return ShardData(_meta(index, uri, art.manifest, art.transform, len(art)), searchers,
                         art.values, art.first_token)
    if src == "default":
        store = load_dense_store("default", load_target(), n_docs=index.dense_default_docs)
    else:
        from index.dense_store import DenseStore

        store = DenseStore.load(src)
    e = len(store)
    lo, hi = e * shard_id // num_shards, e * (shard_id + 1) // num_shards
    part = _RowRange(store.keys[lo:hi], lo, index.nprobe, store.manifest)
    return ShardData(_meta(index, src, store.manifest, store.transform, e), [part], store.values, store.first_token)


def prepare_defaults(index: IndexConfig, target) -> list[str]:
    """Build the default GSM8K stores `index` uses into the local cache now (a first start of
    the embedded default would otherwise build them inside the replicas). Returns their kinds."""
    from decoding.stores import load_dense_store, load_sparse_store

    built = []
    if index.source("sparse") == "default":
        load_sparse_store("default", target)
        built.append("sparse")
    if index.source("dense") == "default":
        load_dense_store("default", target, n_docs=index.dense_default_docs)
        built.append("dense")
    return built
