"""REST-style sparse retrieval: suffix-match the context in a token corpus, draft a trie."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from decoding.drafters.base import Drafter
from index.sparse import MAX_OCCURRENCES


@dataclass
class SparseDrafter(Drafter):
    """Drafts from a suffix index (see ``index.sparse.SparseIndex``).

    The longest suffix of the context (max_suffix down to min_suffix tokens) found in the corpus
    selects its occurrences; the `continuation_len` tokens after each are merged into a trie
    weighted by frequency and pruned to the node budget (REST's construction).
    """

    index: Any
    max_suffix: int = 16
    min_suffix: int = 2
    continuation_len: int = 10
    max_occurrences: int = MAX_OCCURRENCES
    name: str = "rest"
    source: ClassVar[str] = "rest"

    def chains(self, tokens: np.ndarray, max_depth: int, hidden=None):
        found = self.index.lookup(tokens[-self.max_suffix:], max_suffix=self.max_suffix,
                                  min_suffix=self.min_suffix, continuation_len=min(self.continuation_len, max_depth),
                                  max_occurrences=self.max_occurrences)
        return found.chains
