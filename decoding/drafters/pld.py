"""Prompt lookup decoding (PLD): copy what followed an earlier occurrence of the last n tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from decoding.drafters.base import Drafter


@dataclass
class PromptLookupDrafter(Drafter):
    """Match the last n tokens (n from max_ngram down to min_ngram) earlier in the sequence.

    Each earlier occurrence proposes the (up to) `num_pred_tokens` tokens that followed it.
    Longer n-grams and more recent occurrences rank first; `max_candidates` > 1 merges several
    occurrences into a tree (a single chain when 1).
    """

    max_ngram: int = 3
    min_ngram: int = 1
    num_pred_tokens: int = 10
    max_candidates: int = 1
    name: str = "pld"
    source: ClassVar[str] = "pld"

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        if self.num_pred_tokens < 1 or self.max_candidates < 1:
            raise ValueError("num_pred_tokens and max_candidates must be >= 1")

    def chains(self, tokens: np.ndarray, max_depth: int, hidden=None) -> list[tuple[list[int], float]]:
        """Continuations (most wanted first) with weights: n-gram length, then recency."""
        size = len(tokens)
        max_len = min(self.num_pred_tokens, max_depth)
        found: list[tuple[list[int], float]] = []
        seen: set[bytes] = set()
        for n in range(min(self.max_ngram, size - 1), self.min_ngram - 1, -1):
            pattern = tokens[size - n:]
            # Occurrence starts i < size - n (never the suffix itself); check the first token, then the rest.
            starts = np.flatnonzero(tokens[: size - n] == pattern[0])
            for k in range(1, n):
                starts = starts[tokens[starts + k] == pattern[k]]
            for rank, i in enumerate(starts[::-1]):  # most recent first
                cont = tokens[i + n: i + n + max_len]
                key = cont.tobytes()
                if len(cont) == 0 or key in seen:
                    continue
                seen.add(key)
                found.append((cont.tolist(), n - rank / (len(starts) + 1)))
                if len(found) >= self.max_candidates:
                    return found
        return found
