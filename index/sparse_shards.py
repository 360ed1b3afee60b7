"""REST (sparse) indexes from a dense datastore's rows, and lookups across sparse shards.

A dense datastore row at (doc_id, position t) carries value[0] = the token at t+1, so sorting a
document's rows by position recovers its stored token stream (the tokens after the context
part). Gaps in the positions split a document into separate streams: a suffix match never
spans a gap. Documents are partitioned into shards by ``doc_id % n_shards``.

`ShardedSparseIndex.lookup` equals `SparseIndex.lookup` on one index over all the documents
whenever the matched suffix has at most `max_occurrences` occurrences in every shard (each
shard caps its own occurrences, as the single index caps the whole corpus).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from index.sparse import MAX_OCCURRENCES, Continuations, SparseIndex, SparseIndexError


def token_streams(doc_id: np.ndarray, position: np.ndarray, next_token: np.ndarray) -> list[np.ndarray]:
    """Token streams from rows: doc_id [R] int64, position [R] int, next_token [R] (value[0]).

    Returns one int32 array per run of consecutive positions of a document, ordered by
    (doc_id, position); stream j is next_token of its rows in position order."""
    doc_id, position, next_token = (np.asarray(a) for a in (doc_id, position, next_token))
    if not (doc_id.shape == position.shape == next_token.shape) or doc_id.ndim != 1:
        raise ValueError(f"doc_id, position and next_token must be 1-D of one length, got "
                         f"{doc_id.shape}, {position.shape}, {next_token.shape}")
    if len(doc_id) == 0:
        return []
    order = np.lexsort((position, doc_id))
    d, p, t = doc_id[order], position[order].astype(np.int64), next_token[order].astype(np.int32)
    breaks = np.flatnonzero((d[1:] != d[:-1]) | (p[1:] != p[:-1] + 1)) + 1
    return np.split(t, breaks)


class ShardedSparseIndex:
    """Several `SparseIndex` shards (disjoint document sets) behind SparseIndex's `lookup`."""

    def __init__(self, shards: Sequence[SparseIndex]) -> None:
        if not shards:
            raise SparseIndexError("a sharded sparse index needs at least one shard")
        self.shards = list(shards)

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def n_docs(self) -> int:
        return sum(s.n_docs for s in self.shards)

    @property
    def max_suffix(self) -> int:
        return min(s.max_suffix for s in self.shards)

    @property
    def sort_depth(self) -> int:
        return min(s.sort_depth for s in self.shards)

    def __repr__(self) -> str:
        return f"ShardedSparseIndex(shards={len(self.shards)}, n_tokens={self.n_tokens}, n_docs={self.n_docs})"

    def lookup(self, context: Sequence[int], *, max_suffix: int = 16, min_suffix: int = 2,
               continuation_len: int = 10, max_occurrences: int = MAX_OCCURRENCES) -> Continuations:
        """The longest suffix found in ANY shard; continuation counts summed over the shards that
        hold it (a shard whose own longest match is shorter does not contain it)."""
        max_suffix = min(max_suffix, self.sort_depth)
        found = [s.lookup(context, max_suffix=max_suffix, min_suffix=min_suffix, continuation_len=continuation_len,
                          max_occurrences=max_occurrences) for s in self.shards]
        best = max(f.match_len for f in found)
        if best == 0:
            return Continuations(0, [], 0)
        counts: Counter = Counter()
        occurrences = 0
        for f in found:
            if f.match_len == best:
                occurrences += f.n_occurrences
                for chain, c in f.chains:
                    counts[chain] += c
        chains = sorted(counts.items(), key=lambda tc: (-tc[1], tc[0]))
        return Continuations(best, chains, occurrences)
