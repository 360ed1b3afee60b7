"""Token trees: the shape of a draft.

Node 0 is the root: the *pending* token, already chosen by the target but not yet in the KV
cache. Every other node is a draft token whose parent precedes it (topological order), so a
single forward pass over all nodes, with each node attending to the committed prefix and to its
own ancestors, verifies every root-to-leaf path at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class TokenTree:
    """A tree of T tokens in topological order.

    tokens:  [T] token ids; tokens[0] is the root (pending token).
    parents: [T] parent index of each node; parents[0] == -1, parents[i] < i.
    """

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    # ranks[i]: the drafter's preference order of draft node i (0 = most wanted; parents rank
    # before children, root -1), so the nodes with rank < b form the tree a budget of b keeps.
    ranks: tuple[int, ...] | None = field(default=None, compare=False)
    # sources[i]: which proposers drafted node i (sorted labels such as "pld", "rest", "dense",
    # "dynamic"; the root has none). Bookkeeping for analysis only: it never changes the tree.
    sources: tuple[tuple[str, ...], ...] | None = field(default=None, compare=False)
    # anchor_keys[i]: [T, d] unit keys, row i = the datastore's key of the position where node i's
    # token stood in the drafted source (the source's hidden state having read that token), NaN
    # where unknown. Soft verification compares it with the target's own state at node i.
    anchor_keys: Any = field(default=None, compare=False, repr=False)
    _children: tuple[dict[int, int], ...] = field(init=False, repr=False, compare=False)
    _depths: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents) or not self.tokens:
            raise ValueError("a token tree needs as many parents as tokens, and at least a root")
        if self.parents[0] != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        children: list[dict[int, int]] = [{} for _ in self.tokens]
        depths = [0] * len(self.tokens)
        for i in range(1, len(self.tokens)):
            p = self.parents[i]
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must precede their children")
            if self.tokens[i] in children[p]:
                raise ValueError(f"node {p} has two children with token {self.tokens[i]}")
            children[p][self.tokens[i]] = i
            depths[i] = depths[p] + 1
        if self.ranks is None:
            object.__setattr__(self, "ranks", tuple(range(-1, len(self.tokens) - 1)))
        elif len(self.ranks) != len(self.tokens) or any(
                self.ranks[i] <= self.ranks[self.parents[i]] for i in range(1, len(self.tokens))):
            raise ValueError("ranks must give every node a rank after its parent's")
        if self.sources is not None and len(self.sources) != len(self.tokens):
            raise ValueError("sources must give one entry per node")
        if self.anchor_keys is not None and (self.anchor_keys.ndim != 2 or len(self.anchor_keys) != len(self.tokens)):
            raise ValueError("anchor_keys must be [nodes, d]")
        object.__setattr__(self, "_children", tuple(children))
        object.__setattr__(self, "_depths", tuple(depths))

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def root_only(cls, root: int) -> "TokenTree":
        return cls((root,), (-1,))

    @classmethod
    def chain(cls, root: int, draft: Sequence[int]) -> "TokenTree":
        """A single chain root -> draft[0] -> draft[1] -> ..."""
        n = len(draft)
        return cls((root, *map(int, draft)), tuple(range(-1, n)))

    @classmethod
    def from_chains(cls, root: int, chains: Iterable[tuple[Sequence[int], float]], budget: int,
                    labels: Sequence[str] | None = None, keys: Sequence[Any] | None = None) -> "TokenTree":
        """Merge weighted chains into a trie and keep the `budget` heaviest draft nodes.

        A node's weight is the sum of the weights of the chains through it, so a child never
        outweighs its parent: keeping the heaviest nodes (ties broken by depth, then insertion
        order) always yields a connected subtree rooted at `root`. Children are ordered by weight.

        `labels` (optional, one per chain) names the proposer of each chain; each node's
        ``sources`` are then the labels of the chains through it. Labels never change the tree.
        `keys` (optional, one per chain: None or a [len(chain), d] array) gives each drafted token's
        anchor key; a node takes the one of the heaviest keyed chain through it (``anchor_keys``).
        """
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        chain_bits: list[int] | None = None          # per chain, when several proposers are named
        chains = list(chains)
        if keys is not None and len(keys) != len(chains):
            raise ValueError(f"{len(keys)} key arrays for {len(chains)} chains")
        keyed = keys is not None and any(k is not None for k in keys)
        best_key: dict[int, tuple[float, Any]] = {}     # trie node -> (chain weight, key row)
        if labels is not None:
            if len(labels) != len(chains):
                raise ValueError(f"{len(labels)} labels for {len(chains)} chains")
            names = sorted(set(labels))
            bit = {name: 1 << j for j, name in enumerate(names)}
            chain_bits = [bit[name] for name in labels] if len(names) > 1 else None
        node_bits: list[int] = [0]
        trie: list[dict[int, int]] = [{}]
        weight: list[float] = [0.0]
        depth: list[int] = [0]
        node_token: list[int] = [root]
        node_parent: list[int] = [-1]
        for c, (chain, w) in enumerate(chains):
            node = 0
            for tok in chain:
                tok = int(tok)
                nxt = trie[node].get(tok)
                if nxt is None:
                    nxt = len(trie)
                    trie[node][tok] = nxt
                    trie.append({})
                    weight.append(0.0)
                    depth.append(depth[node] + 1)
                    node_token.append(tok)
                    node_parent.append(node)
                    node_bits.append(0)
                weight[nxt] += float(w)
                if chain_bits is not None:
                    node_bits[nxt] |= chain_bits[c]
                if keyed and keys[c] is not None:
                    j = depth[nxt] - 1
                    if j < len(keys[c]) and (nxt not in best_key or best_key[nxt][0] < w):
                        best_key[nxt] = (float(w), keys[c][j])
                node = nxt
        order = sorted(range(1, len(trie)), key=lambda i: (-weight[i], depth[i], i))[:budget]
        keep = set(order)
        rank_of = {old: r for r, old in enumerate(order)}
        # Re-emit kept nodes in BFS order from the root so parents precede children.
        tokens, parents, ranks, new_index, kept = [root], [-1], [-1], {0: 0}, [0]
        frontier = [0]
        while frontier:
            nxt_frontier = []
            for old in frontier:
                kids = sorted((c for c in trie[old].values() if c in keep), key=lambda c: (-weight[c], c))
                for c in kids:
                    new_index[c] = len(tokens)
                    tokens.append(node_token[c])
                    parents.append(new_index[old])
                    ranks.append(rank_of[c])
                    kept.append(c)
                    nxt_frontier.append(c)
            frontier = nxt_frontier
        sources = None
        if labels is not None:
            if chain_bits is None:          # one proposer: every draft node is its
                sources = ((),) + (tuple(names),) * (len(tokens) - 1)
            else:
                sources = ((),) + tuple(tuple(n for n in names if node_bits[c] & bit[n]) for c in kept[1:])
        anchor = None
        if keyed and best_key:
            d = len(next(iter(best_key.values()))[1])
            anchor = np.full((len(tokens), d), np.nan, dtype=np.float32)
            for new, old in enumerate(kept):
                if old in best_key:
                    anchor[new] = best_key[old][1]
        return cls(tuple(tokens), tuple(parents), tuple(ranks), sources, anchor)

    # -- queries ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_draft(self) -> int:
        """Number of draft tokens (all nodes but the root)."""
        return len(self.tokens) - 1

    @property
    def depths(self) -> tuple[int, ...]:
        return self._depths

    def child(self, node: int, token: int) -> int | None:
        """Index of the child of `node` carrying `token`, or None."""
        return self._children[node].get(token)

    def children(self, node: int) -> dict[int, int]:
        return self._children[node]

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def ancestor_mask(self) -> np.ndarray:
        """[T, T] bool: mask[i, j] is True when j is i or an ancestor of i."""
        t = len(self.tokens)
        mask = np.zeros((t, t), dtype=bool)
        for i in range(t):
            p = self.parents[i]
            if p >= 0:
                mask[i] = mask[p]
            mask[i, i] = True
        return mask

    def attention_bias(self, n_past: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """[1, 1, T, n_past + T] additive mask: 0 where a node may attend, -inf-like elsewhere.

        Every node sees the whole committed prefix (n_past positions) and its own ancestors.
        """
        allowed = np.concatenate([np.ones((len(self), n_past), dtype=bool), self.ancestor_mask()], axis=1)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
        bias.masked_fill_(torch.from_numpy(~allowed).to(device), torch.finfo(dtype).min)
        return bias[None, None]

    def accepted_within(self, path: Sequence[int], budget: int) -> int:
        """Draft tokens of an accepted `path` that a tree cut to `budget` nodes would also accept.

        Under strict verification the walk over the smaller tree is the same walk, stopped at the
        first node the smaller tree lacks: so one verified tree tells the outcome of every smaller
        budget (how the adaptive budget learns without trying each size).
        """
        n = 0
        for node in path[1:]:
            if self.ranks[node] >= budget:
                break
            n += 1
        return n

    def path_tokens(self, path: Sequence[int]) -> list[int]:
        return [self.tokens[i] for i in path]
