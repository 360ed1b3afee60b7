"""Dense retrieval drafting (DReSD / SENSE): neighbours of the target's own hidden state.

The query is transform(h), h the target's hidden state at the last committed position, taken
from the verification pass already done (no extra forward). Neighbours come from a static
datastore (FAISS, inner product on unit keys) and from a per-request dynamic cache of the
request's own prompt and output. A neighbour at corpus position t predicted token t+1; it is
kept only when that token equals the pending token (DReSD's filter), and then drafts the tokens
after it. Continuations merge into a trie weighted by similarity (so frequency adds up), pruned
to the node budget; mode="chains" keeps the few best neighbours' whole chains instead (DReSD).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from decoding.drafters.base import Drafter
from decoding.helper_threads import single_threaded_blas


@dataclass
class DenseDrafter(Drafter):
    """store: an ``index.dense_store.DenseStore`` (or None for dynamic-cache only)."""

    store: Any = None
    transform: Any = None            # KeyTransform; defaults to the store's
    k: int = 50
    mode: str = "trie"               # "trie" (SENSE) or "chains" (DReSD's independent chains)
    n_chains: int = 4
    dynamic: bool = True
    dynamic_k: int = 20
    name: str = "dense"
    needs_hidden: bool = True
    source: ClassVar[str] = "dense"  # proposals from the static datastore; the dynamic cache's: "dynamic"
    # The dynamic cache: keys [capacity, d] and their positions, rows [:_n] in use (grown by
    # doubling: a step adds a row or a few, and copying the whole cache each step would cost O(n)).
    _keys: Any = field(default=None, repr=False)
    _pos: Any = field(default=None, repr=False)
    _n: int = field(default=0, repr=False)
    # The observed states not yet keys: rows [:_pn] of a float32 buffer and their positions,
    # grown by doubling (see observe).
    _ph: Any = field(default=None, repr=False)
    _pp: Any = field(default=None, repr=False)
    _pn: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("trie", "chains"):
            raise ValueError(f"mode must be 'trie' or 'chains', got {self.mode!r}")
        if self.transform is None and self.store is not None:
            self.transform = self.store.transform
        if self.transform is None:
            raise ValueError("a dense drafter needs a datastore or a key transform")
        self.eos = int(self.store.manifest.eos_token_id) if self.store is not None else -1
        single_threaded_blas()

    # -- dynamic cache ------------------------------------------------------------------------

    def begin(self, prompt_ids: list[int], hidden: torch.Tensor | None) -> None:
        self._keys, self._pos, self._n, self._pn = None, None, 0, 0
        if self.dynamic and hidden is not None:
            self.observe(np.arange(len(prompt_ids)), hidden)

    def observe(self, positions: np.ndarray, hidden: torch.Tensor) -> None:
        """Keep the committed positions' hidden states; they become keys when the cache is next
        searched (all the steps since at once), so steps that draft nothing (a budget of 0, as a
        loaded batch often allocates) pay nothing for the cache. They are copied into one
        buffer (float32, as the transform takes them), not kept as tensors: a view would keep
        the whole forward's buffer alive, and a small tensor a step per request fragmented the
        heap around the forwards' buffers, so that every batched forward faulted in fresh pages
        (16 requests in flight drafting nothing: 585 page faults a step against 240 for `ar`,
        the forward 5-10% slower)."""
        if not self.dynamic:
            return
        m, n = len(positions), self._pn
        self._ph, self._pp = _room(self._ph, self._pp, n, m, hidden.shape[-1], 64)
        torch.from_numpy(self._ph[n:n + m]).copy_(hidden)
        self._pp[n:n + m] = positions
        self._pn = n + m

    @property
    def cached(self) -> int:
        """Keys in the dynamic cache (observed states join it when it is next searched)."""
        return self._n

    def _catch_up(self) -> None:
        """Turn the pending hidden states into keys, in one transform."""
        if not self._pn:
            return
        keys = self.transform(self._ph[:self._pn])
        pos = self._pp[:self._pn]
        self._pn = 0
        n, m = self._n, len(keys)
        self._keys, self._pos = _room(self._keys, self._pos, n, m, keys.shape[1], 256)
        self._keys[n:n + m], self._pos[n:n + m] = keys, pos
        self._n = n + m

    def _dynamic_chains(self, q: np.ndarray, tokens: np.ndarray, depth: int
                        ) -> list[tuple[np.ndarray, float, np.ndarray | None]]:
        self._catch_up()
        if not self._n:
            return []
        keys, pos = self._keys[:self._n], self._pos[:self._n]
        n = len(tokens)
        # Position t predicted tokens[t+1]; it must equal the pending token tokens[n-1], and at
        # least one token must follow it (t + 2 < n): the query position itself is excluded.
        ok = pos + 2 < n
        ok[ok] = tokens[pos[ok] + 1] == tokens[-1]
        if not ok.any():
            return []
        sims = keys[ok] @ q
        cand = pos[ok]
        top = np.argsort(-sims)[: self.dynamic_k]
        # Anchor keys: chain token j stood at position cand + 2 + j, whose key the cache holds
        # once that position was observed (positions arrive in order from 0, so row = position).
        by_pos = self.anchors and len(pos) and pos[-1] == len(pos) - 1
        out = []
        for i in top:
            chain = tokens[cand[i] + 2: cand[i] + 2 + depth]
            anchors = None
            if by_pos:
                anchors = np.full((len(chain), keys.shape[1]), np.nan, dtype=np.float32)
                m = max(0, min(len(chain), len(keys) - (cand[i] + 2)))
                anchors[:m] = keys[cand[i] + 2: cand[i] + 2 + m]
            out.append((chain, float(max(sims[i], 0.0)), anchors))
        return out

    @property
    def keeps_hidden(self) -> bool:
        """With the dynamic cache, the last observed state is its newest key: propose takes it
        when passed `hidden=None` (the engine then keeps no copy of its own)."""
        return self.dynamic

    def _query(self, hidden: torch.Tensor | None) -> np.ndarray | None:
        """The query key transform(hidden); for `hidden=None` (``keeps_hidden``) the last
        observed state's, which the dynamic cache's catch-up transforms anyway (one transform a
        step, not two); None if nothing was observed."""
        if hidden is None:
            if not self.dynamic:
                return None
            self._catch_up()
            return self._keys[self._n - 1].copy() if self._n else None
        if self.dynamic and self._pn:
            last = torch.from_numpy(self._ph[self._pn - 1])
            if last.shape == hidden.shape and torch.equal(last, hidden.float().cpu()):
                self._catch_up()
                return self._keys[self._n - 1].copy()
        return self.transform(hidden.float().cpu().numpy())

    # -- static datastore ---------------------------------------------------------------------

    def _static_chains(self, q: np.ndarray, pending: int, depth: int
                       ) -> list[tuple[np.ndarray, float, np.ndarray | None]]:
        if self.store is None or len(self.store) == 0:
            return []
        sims, ids = self.store.search(q[None], self.k)
        sims, ids = sims[0], ids[0]
        keep = ids >= 0
        sims, ids = sims[keep], ids[keep]
        keep = self.store.first_token[ids] == pending          # DReSD's first-token filter
        sims, ids = sims[keep], ids[keep]
        if not len(ids):
            return []
        # Every kept neighbour's chain at once: its next tokens, cut after the first EOS.
        chains = self.store.values[ids, 1: 1 + depth]
        eos = chains == self.eos
        lengths = np.where(eos.any(1), eos.argmax(1) + 1, chains.shape[1])
        anchors = self.anchor_keys(ids, lengths) if self.anchors else None
        return [(chains[j, :n], float(max(s, 0.0)), None if anchors is None else anchors[j, :n])
                for j, (s, n) in enumerate(zip(sims.tolist(), lengths.tolist()))]

    def anchor_keys(self, rows: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
        """Anchor keys of the chains drafted from store rows `rows` (`lengths` tokens each):
        [len(rows), max(lengths), d]. The entry of row r stood at position t; its chain's token j
        stood at t + 2 + j, whose key is row r + 2 + j when the rows after r continue its document
        that far (the store's ``successors``); NaN beyond that or the chain's length. None when
        the store cannot tell."""
        succ = getattr(self.store, "successors", None)
        if succ is None:
            return None
        keys = self.store.keys
        width = int(lengths.max())
        offsets = np.arange(width)
        known = offsets[None, :] < np.minimum(lengths, succ[rows].astype(np.int64) - 1)[:, None]
        at = np.minimum(rows[:, None] + 2 + offsets[None, :], len(keys) - 1)
        anchors = keys[at]
        anchors[~known] = np.nan
        return anchors

    def anchored_chains(self, tokens: np.ndarray, max_depth: int, hidden: torch.Tensor | None = None):
        """The chains, their labels ("dense": static datastore, "dynamic": dynamic cache) and, per
        chain, the anchor keys of its tokens (see ``TokenTree.anchor_keys``)."""
        q = self._query(hidden)
        if q is None:
            return [], [], []
        found = [(c, w, a, self.source) for c, w, a in self._static_chains(q, int(tokens[-1]), max_depth)]
        if self.dynamic:
            found += [(c, w, a, "dynamic") for c, w, a in self._dynamic_chains(q, tokens, max_depth)]
        found = [(c.tolist(), w, a, label) for c, w, a, label in found if len(c) and w > 0]
        if self.mode == "chains":
            found = sorted(found, key=lambda f: -f[1])[: self.n_chains]
        return [(c, w) for c, w, _, _ in found], [f[3] for f in found], [f[2] for f in found]

    def labelled_chains(self, tokens: np.ndarray, max_depth: int, hidden: torch.Tensor | None = None):
        return self.anchored_chains(tokens, max_depth, hidden)[:2]

    def chains(self, tokens: np.ndarray, max_depth: int, hidden: torch.Tensor | None = None):
        return self.anchored_chains(tokens, max_depth, hidden)[0]


def _room(rows: np.ndarray | None, pos: np.ndarray | None, n: int, m: int, width: int, least: int):
    """float32 rows [cap, width] and int64 positions [cap] whose first n are in use, with room for
    m more: the same arrays, or new ones twice the size needed (at least `least`) holding the n."""
    if rows is not None and n + m <= len(rows):
        return rows, pos
    cap = max(least, 2 * (n + m))
    grown_rows, grown_pos = np.empty((cap, width), dtype=np.float32), np.empty(cap, dtype=np.int64)
    if n:
        grown_rows[:n], grown_pos[:n] = rows[:n], pos[:n]
    return grown_rows, grown_pos
