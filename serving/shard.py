"""The index-shard deployment: one part of the dense index, searched in batches.

Shard deployment ``j`` of ``N`` serves the artifact's dense shards ``i`` with ``i % N == j``
(memory-mapped, each loaded alone) or, for a datastore directory / the default store, the j-th
slice of its rows. Searches from concurrent decodes (any decoder replica) are batched into one
FAISS call per index version with ``@serve.batch``. Answers carry global ids and the
neighbours' payload (first token, value tokens), see ``serving.index_data.Hits``.

Index versions arrive through ``user_config`` (``reconfigure``): the new version is loaded
beside the old ones, and the last ``shards.versions_kept`` stay searchable so that requests
pinned to an older version finish on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

import numpy as np
from ray import serve

from serving.config import IndexConfig, ServingConfig

log = logging.getLogger("ray.serve")


@serve.deployment
class IndexShard:
    def __init__(self, static: dict, shard_id: int, num_shards: int) -> None:
        from serving.metrics import ShardMetrics

        self.cfg = ServingConfig.model_validate(static)
        self.shard_id, self.num_shards = shard_id, num_shards
        self.versions: OrderedDict = OrderedDict()      # key -> ShardData (None: no dense index)
        self.metrics = ShardMetrics()
        self._lock = asyncio.Lock()
        sh = self.cfg.shards
        self._batched_search.set_max_batch_size(sh.max_batch_size)
        self._batched_search.set_batch_wait_timeout_s(sh.batch_wait_timeout_s)

    def _load_target(self):
        from decoding.target import TargetModel

        return TargetModel.load(self.cfg.model.path, dtype="float32", device="cpu")

    async def reconfigure(self, user_config: dict) -> None:
        from serving.index_data import load_shard_data

        index = IndexConfig.from_user_config(user_config)
        key = index.key()
        async with self._lock:
            if key in self.versions:
                self.versions.move_to_end(key)
                return
            data = await asyncio.to_thread(load_shard_data, index, self.shard_id, self.num_shards,
                                           self._load_target)
            self.versions[key] = data
            while len(self.versions) > self.cfg.shards.versions_kept:
                old, _ = self.versions.popitem(last=False)
                log.info("shard %d dropped index version %s", self.shard_id, old)
            log.info("shard %d serves index version %s (%s)", self.shard_id, key,
                     "no dense index" if data is None else f"{len(data.searchers)} part(s)")

    async def describe(self, key: str | None = None):
        """IndexMeta of version `key` (default: the newest), or None if not held."""
        if not self.versions:
            return None
        data = self.versions.get(key) if key is not None else next(reversed(self.versions.values()))
        return None if data is None else data.meta

    async def search(self, request: dict) -> dict:
        """request: {"key", "queries" [n, d], "k"} -> {"key", "hits": Hits or None (version not held)}."""
        return await self._batched_search(request)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
    async def _batched_search(self, requests: list[dict]) -> list[dict]:
        self.metrics.batch.observe(len(requests))
        out: list[dict | None] = [None] * len(requests)
        by_key: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_key.setdefault(r["key"], []).append(i)
        for key, idx in by_key.items():
            data = self.versions.get(key)
            if data is None:
                for i in idx:
                    out[i] = {"key": key, "hits": None}
                continue
            queries = np.concatenate([np.atleast_2d(requests[i]["queries"]) for i in idx]).astype(np.float32)
            k = max(requests[i]["k"] for i in idx)
            hits = data.search(queries, k)
            row = 0
            for i in idx:
                n, ki = len(np.atleast_2d(requests[i]["queries"])), requests[i]["k"]
                part = hits.row(row) if n == 1 else type(hits)(hits.sims[row:row + n], hits.ids[row:row + n],
                                                                hits.first[row:row + n], hits.values[row:row + n])
                if ki < k:
                    part = type(hits)(part.sims[:, :ki], part.ids[:, :ki], part.first[:, :ki], part.values[:, :ki])
                out[i] = {"key": key, "hits": part}
                row += n
        self.metrics.searches.inc(len(requests))
        return out

    def check_health(self) -> None:
        if not self.versions:
            raise RuntimeError("no index version loaded")
