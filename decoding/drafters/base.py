"""The drafter interface and the null drafter (plain autoregressive decoding)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from decoding.tree import TokenTree


class Drafter:
    """Proposes draft tokens after the pending token.

    propose(tokens, budget, max_depth, hidden): `tokens` [N] int64 holds the whole sequence so
    far (prompt, output, and the pending token last). Returns a TokenTree rooted at tokens[-1]
    with at most `budget` draft nodes, none deeper than `max_depth`. Drafters that set
    `needs_hidden` also get `hidden` [H], the target's hidden state at the last committed
    position (the one that chose the pending token), taken from the verification just done,
    and the per-request hooks begin/observe with the hidden states of committed positions
    (a drafter that sets `keeps_hidden` gets `hidden=None` and takes the last observed one).
    A drafter object serves one request at a time; make one per concurrent request.
    """

    name: str = "drafter"
    needs_hidden: bool = False
    source: str | None = None        # label of this drafter's proposals in TokenTree.sources (default: name)
    # Whether proposals carry anchor keys (``anchored_chains``): only soft verification's cosine
    # gate reads them, so the engine turns this off for a verifier that does not (strict).
    anchors: bool = True
    # Whether the drafter keeps the last observed hidden state itself: then the engine passes
    # `hidden=None` to propose (and keeps no copy of its own a step).
    keeps_hidden: bool = False

    def fusion_scale(self, found: Sequence[tuple[Sequence[int], float]]) -> float:
        """How much of its fusion share this drafter's candidates `found` deserve in a hybrid tree
        (``decoding.drafters.hybrid``): 1 unless the drafter can tell strong evidence from weak."""
        return 1.0

    def begin(self, prompt_ids: list[int], hidden: torch.Tensor | None) -> None:
        """A new request: its prompt and, if needs_hidden, the prompt's hidden states [P, H]."""

    def observe(self, positions: np.ndarray, hidden: torch.Tensor) -> None:
        """Newly committed positions and their hidden states [len(positions), H]."""

    def chains(self, tokens: np.ndarray, max_depth: int,
               hidden: torch.Tensor | None = None) -> list[tuple[Sequence[int], float]]:
        """Candidate continuations after the pending token, each with a weight (higher = likelier)."""
        return []

    def labelled_chains(self, tokens: np.ndarray, max_depth: int, hidden: torch.Tensor | None = None
                        ) -> tuple[list[tuple[Sequence[int], float]], list[str]]:
        """``chains`` and, for each, the label of its proposer (drafters with several sources
        override this; the chains are the same either way)."""
        found = self.chains(tokens, max_depth, hidden)
        return found, [self.source or self.name] * len(found)

    def anchored_chains(self, tokens: np.ndarray, max_depth: int, hidden: torch.Tensor | None = None
                        ) -> tuple[list[tuple[Sequence[int], float]], list[str], list[np.ndarray | None]]:
        """``labelled_chains`` and, per chain, the anchor keys of its tokens (a [len, d] array,
        NaN rows unknown) or None; only dense retrieval knows them."""
        found, labels = self.labelled_chains(tokens, max_depth, hidden)
        return found, labels, [None] * len(found)

    def propose(self, tokens: np.ndarray, budget: int, max_depth: int,
                hidden: torch.Tensor | None = None) -> TokenTree:
        """The candidates merged into a weighted trie, pruned to `budget` nodes; each node's
        ``sources`` tell which proposers drafted it."""
        root = int(tokens[-1])
        if budget <= 0 or max_depth <= 0:
            return TokenTree.root_only(root)
        # No kept node is deeper than the budget (a kept node's ancestors are all kept, and all
        # outweigh it), so chains are drafted only that deep: the same tree, less work.
        found, labels, keys = self.anchored_chains(tokens, min(max_depth, budget), hidden)
        if not found:
            return TokenTree.root_only(root)
        return TokenTree.from_chains(root, found, budget, labels, keys)


class WrappedDrafter(Drafter):
    """A drafter around another one, `primary`, whose candidates it adds to or stands in for:
    the primary's needs (hidden states, whether it keeps the last one), its anchor keys, its key
    transform (soft verification's cosine stand-in reads it) and its per-request hooks are the
    wrapper's. Subclasses override the chains."""

    def __init__(self, primary: Drafter) -> None:
        self.primary = primary
        self.name = primary.name
        self.needs_hidden = primary.needs_hidden
        self.keeps_hidden = primary.keeps_hidden

    @property
    def anchors(self) -> bool:
        return self.primary.anchors

    @anchors.setter
    def anchors(self, on: bool) -> None:
        self.primary.anchors = on

    @property
    def transform(self):
        return getattr(self.primary, "transform", None)

    def begin(self, prompt_ids: list[int], hidden: torch.Tensor | None) -> None:
        self.primary.begin(prompt_ids, hidden)

    def observe(self, positions: np.ndarray, hidden: torch.Tensor) -> None:
        self.primary.observe(positions, hidden)

    def anchored_chains(self, tokens: np.ndarray, max_depth: int, hidden: torch.Tensor | None = None):
        return self.primary.anchored_chains(tokens, max_depth, hidden)

    def labelled_chains(self, tokens: np.ndarray, max_depth: int, hidden: torch.Tensor | None = None):
        return self.anchored_chains(tokens, max_depth, hidden)[:2]

    def chains(self, tokens: np.ndarray, max_depth: int, hidden: torch.Tensor | None = None):
        return self.anchored_chains(tokens, max_depth, hidden)[0]


class NoDrafter(Drafter):
    """Drafts nothing: every step verifies the pending token alone (autoregressive decoding)."""

    name = "ar"
