"""The decoder's view of a sharded dense index: a fan-out over the shard deployments.

:class:`ShardClient` (one per decoder replica) sends a search to every shard deployment through
its DeploymentHandle and merges their top-k. It is synchronous on purpose: the decode loop runs
in a generation thread (never on the replica's event loop), which blocks on
``response.result(timeout_s=...)``. A shard that fails or times out is skipped for
``cooldown_s`` (the others still answer: a partial top-k only makes drafts worse, never the
output wrong); with every shard down the search raises :class:`IndexUnavailable`.

:class:`RemoteDenseStore` (one per request) is the dense drafter's store protocol on top of it:
``transform``, ``manifest.eos_token_id``, ``len()``, ``search`` and ``first_token`` /
``values`` indexable by the ids the last search returned (their payload came with the hits).
It pins one index version for the whole request, so a hot swap never mixes versions.
"""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import numpy as np

from serving.index_data import Hits, IndexMeta, merge_hits

log = logging.getLogger(__name__)


class IndexUnavailable(RuntimeError):
    """No shard of the dense index answered."""


class ShardClient:
    def __init__(self, handles: list, *, timeout_s: float = 0.5, cooldown_s: float = 5.0) -> None:
        self.handles = list(handles)
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self._down_until = [0.0] * len(self.handles)
        self._last_error: list[str | None] = [None] * len(self.handles)
        self._lock = threading.Lock()
        self.searches = 0
        self.failures = 0

    # -- health ---------------------------------------------------------------------------------

    def _live(self) -> list[int]:
        now = time.monotonic()
        with self._lock:
            return [j for j, t in enumerate(self._down_until) if now >= t]

    def _fail(self, j: int, why: str) -> None:
        with self._lock:
            self._down_until[j] = time.monotonic() + self.cooldown_s
            self._last_error[j] = why
            self.failures += 1
        log.warning("index shard %d failed (%s); skipping it for %.1f s", j, why, self.cooldown_s)

    def available(self) -> bool:
        return bool(self._live())

    def status(self) -> dict:
        live = set(self._live())
        with self._lock:
            return {"shards": len(self.handles), "down": [j for j in range(len(self.handles)) if j not in live],
                    "last_errors": {j: e for j, e in enumerate(self._last_error) if e and j not in live},
                    "searches": self.searches, "failures": self.failures}

    # -- calls ----------------------------------------------------------------------------------

    def _gather(self, calls: list, timeout_s: float) -> list:
        """Results of (shard j, response) pairs in order; None for a shard that failed."""
        deadline = time.monotonic() + timeout_s
        out = []
        for j, resp in calls:
            try:
                out.append(resp.result(timeout_s=max(0.001, deadline - time.monotonic())))
            except Exception as exc:            # timeout, dead replica, unavailable deployment
                try:
                    resp.cancel()
                except Exception:
                    pass
                self._fail(j, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
                out.append(None)
        return out

    def search(self, key: str, queries: np.ndarray, k: int, value_len: int) -> tuple[Hits, int]:
        """(merged top-k hits, number of shards that did not answer). Raises IndexUnavailable."""
        live = self._live()
        if not live:
            raise IndexUnavailable("every index shard is down (recent failures)")
        request = {"key": key, "queries": np.ascontiguousarray(queries, dtype=np.float32), "k": int(k)}
        calls = [(j, self.handles[j].search.remote(request)) for j in live]
        answers = self._gather(calls, self.timeout_s)
        parts = [a for a in answers if a is not None and a.get("hits") is not None]
        missing = [j for (j, _), a in zip(calls, answers) if a is not None and a.get("hits") is None]
        for j in missing:                       # the shard does not hold this version (any more)
            self._fail(j, f"index version {key} not loaded")
        self.searches += 1
        skipped = len(self.handles) - len(parts)
        if not parts:
            raise IndexUnavailable(f"no index shard answered ({skipped} of {len(self.handles)} failed)")
        return merge_hits([p["hits"] for p in parts], k), skipped

    def describe(self, key: str, timeout_s: float) -> IndexMeta | None:
        """Meta of version `key` once every shard that answers holds it (None: not yet), so
        that a new version is used only when no live shard lacks it. Shards that do not answer
        are left out: Serve restarts them with the current version."""
        calls = [(j, h.describe.remote(key)) for j, h in enumerate(self.handles)]
        deadline = time.monotonic() + timeout_s
        metas = []
        for j, resp in calls:
            try:
                metas.append(resp.result(timeout_s=max(0.001, deadline - time.monotonic())))
            except Exception as exc:
                log.info("index shard %d did not describe %s: %s", j, key, type(exc).__name__)
        if not metas or any(m is None for m in metas):
            return None
        return metas[0]


class RemoteDenseStore:
    """A dense store whose search runs on the shard deployments (one object per request)."""

    def __init__(self, client: ShardClient, meta: IndexMeta) -> None:
        self.client = client
        self.meta = meta
        self.transform = meta.transform
        self.manifest = SimpleNamespace(eos_token_id=meta.eos_token_id, key_dim=meta.dim,
                                        value_len=meta.value_len)
        self.first_token = _Payload(self, "first")
        self.values = _Payload(self, "values")
        self._hits: Hits | None = None
        self._pos: dict[int, int] = {}
        self.failure: str | None = None       # set when no shard answered: the request falls back
        self.partial = 0                      # searches some shard did not answer
        self.searches = 0

    def __len__(self) -> int:
        return self.meta.size

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.atleast_2d(queries)
        if self.failure is None:
            try:
                hits, skipped = self.client.search(self.meta.key, queries, k, self.meta.value_len)
                self.searches += 1
                self.partial += skipped > 0
            except IndexUnavailable as exc:
                self.failure = str(exc)
        if self.failure is not None:
            hits = Hits.empty(len(queries), k, self.meta.value_len)
        flat = hits.ids.reshape(-1)
        self._hits = hits
        self._pos = {int(g): i for i, g in enumerate(flat) if g >= 0}
        return hits.sims, hits.ids

    def _lookup(self, what: str, gid: int):
        i = self._pos[int(gid)]
        n, k = self._hits.ids.shape
        row, col = divmod(i, k)
        return (self._hits.first if what == "first" else self._hits.values)[row, col]


class _Payload:
    """`first_token[ids]` / `values[id, slice]` (or `values[ids, slice]`) over the last search's hits."""

    def __init__(self, store: RemoteDenseStore, what: str) -> None:
        self.store, self.what = store, what

    def __getitem__(self, key):
        if self.what == "first":
            ids = np.asarray(key)
            return np.array([self.store._lookup("first", g) for g in ids.reshape(-1)], np.int32).reshape(ids.shape)
        gid, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if np.ndim(gid):            # several hits at once: their rows stacked, then `rest` of each
            rows = np.stack([self.store._lookup("values", g) for g in np.asarray(gid).reshape(-1)])
            return rows[(slice(None), *rest)] if rest else rows
        row = self.store._lookup("values", gid)
        return row[rest] if rest else row
