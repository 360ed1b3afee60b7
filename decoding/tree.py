"""Token trees: the shape of a draft.

Node 0 is the root: the *pending* token, already chosen by the target but not yet in the KV
cache. Every other node is a draft token whose parent precedes it (topological order), so a
single forward pass over all nodes, with each node attending to the committed prefix and to its
own ancestors, verifies every root-to-leaf path at once.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple
from dataclasses import dataclass, field, replace

import numpy as np
import torch


class _Kept(NamedTuple):
    """A trie node kept by ``TokenTree.from_chains``."""
    weight: float       # the sum of the weights of the chains through it
    depth: int
    first: int          # the first chain through it (ties between equal weights go to the lower)
    token: int
    chains: list        # the chains through it, in chain order
    parent: int         # its parent's index among the kept nodes (-1: the root)


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
    # weights[i]: the drafter's weight of node i, the sum of the weights of the chains through it
    # (the root's: all chains'), so weights[i] / weights[parents[i]] is the share of its parent's
    # candidates that continue with node i. What the acceptance model (decoding.acceptance) reads.
    weights: tuple[float, ...] | None = field(default=None, compare=False, repr=False)
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
        if self.weights is not None and len(self.weights) != len(self.tokens):
            raise ValueError("weights must give one entry per node")
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

        A node's weight is the sum of the weights of the chains through it (added in chain
        order), so a child never outweighs its parent: keeping the heaviest nodes (ties broken
        by depth, then by the first chain through the node) always yields a connected subtree
        rooted at `root`. Children are ordered by weight.

        The trie is never built whole: a node is kept, best first, from a heap of the kept
        nodes' children (a child's key is strictly worse than its parent's, so popping in key
        order keeps exactly the `budget` best nodes of the whole trie), and only the chains
        through a kept node are split by their next token. A step drafts ~100 chains for a
        budget of ~10, so this touches a few hundred tokens instead of every chain's every token.

        `labels` (optional, one per chain) names the proposer of each chain; each node's
        ``sources`` are then the labels of the chains through it. Labels never change the tree.
        `keys` (optional, one per chain: None or a [len(chain), d] array) gives each drafted token's
        anchor key; a node takes the one of the heaviest keyed chain through it (``anchor_keys``).
        """
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        chains = list(chains)
        if keys is not None and len(keys) != len(chains):
            raise ValueError(f"{len(keys)} key arrays for {len(chains)} chains")
        if labels is not None and len(labels) != len(chains):
            raise ValueError(f"{len(labels)} labels for {len(chains)} chains")
        seqs = [c for c, _ in chains]
        weights = [float(w) for _, w in chains]

        def split(members: list[int], depth: int) -> list[tuple[float, int, int, list[int]]]:
            """The children at `depth` of a node through which chains `members` run:
            (weight, first chain, token, chains through it), weights summed in chain order."""
            kids: dict[int, list] = {}
            for c in members:
                seq = seqs[c]
                if len(seq) > depth:
                    tok = int(seq[depth])
                    kid = kids.get(tok)
                    if kid is None:
                        kids[tok] = [weights[c], c, tok, [c]]
                    else:
                        kid[0] += weights[c]
                        kid[3].append(c)
            return [tuple(k) for k in kids.values()]

        # Heap entries: (-weight, depth, first chain, token, chains through it, parent's kept index).
        heap = [(-w, 1, first, tok, members, 0) for w, first, tok, members in split(range(len(chains)), 0)]
        heapq.heapify(heap)
        kept_nodes = [_Kept(sum(weights), 0, -1, root, [], -1)]
        while heap and len(kept_nodes) <= budget:
            neg_w, depth, first, tok, members, parent = heapq.heappop(heap)
            index = len(kept_nodes)
            kept_nodes.append(_Kept(-neg_w, depth, first, tok, members, parent))
            if len(kept_nodes) > budget:
                break
            for w, kid_first, kid_tok, kid_members in split(members, depth):
                heapq.heappush(heap, (-w, depth + 1, kid_first, kid_tok, kid_members, index))
        # Re-emit the kept nodes in BFS order from the root (parents precede children), each
        # node's children by weight, then by their first chain; rank = the order they were kept.
        children: list[list[int]] = [[] for _ in kept_nodes]
        for i in range(1, len(kept_nodes)):
            children[kept_nodes[i].parent].append(i)
        order = [0]
        for i in order:             # a breadth-first walk: `order` grows as it is read
            order += sorted(children[i], key=lambda k: (-kept_nodes[k].weight, kept_nodes[k].first))
        new_index = {old: new for new, old in enumerate(order)}
        tokens = tuple(kept_nodes[i].token for i in order)
        parents = tuple(new_index[kept_nodes[i].parent] if i else -1 for i in order)
        ranks = tuple(i - 1 for i in order)
        sources = None
        if labels is not None:
            sources = ((),) + tuple(tuple(sorted({labels[c] for c in kept_nodes[i].chains})) for i in order[1:])
        anchor = None
        if keys is not None:
            keyed = [c for c in range(len(chains)) if keys[c] is not None and len(keys[c]) and len(seqs[c])]
            if keyed:
                anchor = np.full((len(tokens), len(keys[keyed[0]][0])), np.nan, dtype=np.float32)
                for new, i in enumerate(order[1:], 1):
                    j = kept_nodes[i].depth - 1
                    best = None
                    for c in kept_nodes[i].chains:     # the first of the heaviest keyed chains through it
                        if keys[c] is not None and j < len(keys[c]) and (best is None or weights[best] < weights[c]):
                            best = c
                    if best is not None:
                        anchor[new] = keys[best][j]
        return cls(tokens, parents, ranks, sources, anchor, tuple(kept_nodes[i].weight for i in order))

    def cut(self, budget: int) -> "TokenTree":
        """The tree a budget of `budget` nodes keeps: the draft nodes ranked below it (a node's
        ancestors rank before it, so they stay). ``from_chains`` with that budget builds the same
        tree; this keeps one drafted tree's smaller budgets without drafting again."""
        if budget >= self.n_draft:
            return self
        return self._keep([i for i in range(len(self.tokens)) if self.ranks[i] < budget])

    def main_chain(self) -> "TokenTree":
        """The root and, from each kept node on, its heaviest child (children are ordered by
        weight): the tree's best path, for a target that verifies chains only."""
        keep, node = [0], 0
        while self._children[node]:
            node = next(iter(self._children[node].values()))
            keep.append(node)
        if len(keep) == len(self.tokens):
            return self
        # ranked along the path, so that the nodes ranked below b are still a budget of b's tree
        return replace(self._keep(keep), ranks=tuple(range(-1, len(keep) - 1)))

    def _keep(self, keep: list[int]) -> "TokenTree":
        """The tree of the nodes `keep` (ascending, each with its parent)."""
        new = {old: i for i, old in enumerate(keep)}

        def pick(xs):
            return None if xs is None else tuple(xs[i] for i in keep)

        return TokenTree(pick(self.tokens), tuple(new[self.parents[i]] if i else -1 for i in keep), pick(self.ranks),
                         pick(self.sources), None if self.anchor_keys is None else self.anchor_keys[keep],
                         pick(self.weights))

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
