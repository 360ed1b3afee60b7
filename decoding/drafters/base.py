"""The drafter interface and the null drafter (plain autoregressive decoding)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from decoding.tree import TokenTree


class Drafter(Protocol):
    """Proposes draft tokens after the pending token.

    propose(tokens, budget, max_depth): `tokens` [N] int64 holds the whole sequence so far
    (prompt, output, and the pending token last). Returns a TokenTree rooted at tokens[-1] with
    at most `budget` draft nodes, none deeper than `max_depth`.
    """

    name: str

    def propose(self, tokens: np.ndarray, budget: int, max_depth: int) -> TokenTree: ...


class NoDrafter:
    """Drafts nothing: every step verifies the pending token alone (autoregressive decoding)."""

    name = "ar"

    def propose(self, tokens: np.ndarray, budget: int, max_depth: int) -> TokenTree:
        return TokenTree.root_only(int(tokens[-1]))
