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
    Longer n-grams and more recent occurrences rank first; the first `max_candidates` distinct
    continuations merge into one weighted trie, so occurrences that agree add up and ones that
    differ become branches (1: HF-style prompt lookup, a single chain). Four, the default:
    replaying 4,100 recorded SENSE steps (GSM8K and Spec-Bench answers), four candidates instead
    of one raised the draft tokens accepted within budgets of 1-32 by 2-5% inside SENSE's fused
    tree and by 1-20% for PLD alone (the larger budgets gain most: a single chain stops growing at
    its one continuation); eight added nothing over four.

    Matches of up to 8 tokens, not 3 (replayed on development questions the benchmark does not
    ask, 30 GSM8K and 48 Spec-Bench answers: draft tokens accepted within budgets of 1-16 +1-3%
    for PLD alone), and in a fused tree the longest match sets PLD's share (``fusion_scale``): with
    both, SENSE's accepted draft tokens at budgets 4-8 rose in every Spec-Bench category and on
    GSM8K (+1-7%, summarization and RAG most), and in the engine, side by side on the benchmark's
    own questions (40 GSM8K, 36 Spec-Bench), MAT 1.006x on GSM8K and 0.97-1.08x per Spec-Bench
    category (translation 1.08x, math 1.06x), outputs identical.
    """

    max_ngram: int = 8
    min_ngram: int = 1
    num_pred_tokens: int = 10
    max_candidates: int = 4
    scale_by_match: bool = True      # fusion_scale: the longest match / 2 (False: 1)
    name: str = "pld"
    source: ClassVar[str] = "pld"

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        if self.num_pred_tokens < 1 or self.max_candidates < 1:
            raise ValueError("num_pred_tokens and max_candidates must be >= 1")

    def fusion_scale(self, found) -> float:
        """The longest n-gram matched / 2 (a candidate's weight is its n-gram's length, less a
        fraction for recency): in SENSE's fused tree a 1-token match weighs half its share, a
        2-token match its share, an 8-token match four times it, against the dense retrieval's
        fixed share. A long match is strong evidence that the text repeats; a 1-token one is not."""
        return max(w for _, w in found) / 2 if self.scale_by_match and found else 1.0

    def chains(self, tokens: np.ndarray, max_depth: int, hidden=None) -> list[tuple[list[int], float]]:
        """Continuations (most wanted first) with weights: n-gram length, then recency.

        One pass finds every earlier occurrence e of the last token (e < size - 1: never the
        suffix itself) and how far back each one's match reaches (up to max_ngram), in a few
        vector steps over the occurrences, not one scan of the sequence per n-gram length."""
        size = len(tokens)
        top = min(self.max_ngram, size - 1)
        if top < self.min_ngram:
            return []
        max_len = min(self.num_pred_tokens, max_depth)
        ends = np.flatnonzero(tokens[: size - 1] == tokens[-1])
        length = np.ones(len(ends), dtype=np.int64)      # the match ending at each occurrence
        alive = np.arange(len(ends))
        for k in range(1, top):
            alive = alive[ends[alive] >= k]
            alive = alive[tokens[ends[alive] - k] == tokens[size - 1 - k]]
            if not len(alive):
                break
            length[alive] += 1
        found: list[tuple[list[int], float]] = []
        seen: set[bytes] = set()
        for n in range(top, self.min_ngram - 1, -1):
            at = ends[length >= n]                         # the n-gram's occurrences, oldest first
            for rank, e in enumerate(at[::-1]):            # most recent first
                cont = tokens[e + 1: e + 1 + max_len]
                key = cont.tobytes()
                if len(cont) == 0 or key in seen:
                    continue
                seen.add(key)
                found.append((cont.tolist(), n - rank / (len(at) + 1)))
                if len(found) >= self.max_candidates:
                    return found
        return found
