"""Drafts from a predicted output (OpenAI's Predicted Outputs): the text the caller expects most of
the answer to be (the file being edited, the previous version of a document), aligned with what
has been generated so far.

The prediction is a per-request datastore the caller hands over. Verification is unchanged, so a
strict answer is the same with or without one, token for token; a prediction only changes how
many tokens a step commits.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np
import torch

from decoding.drafters.base import Drafter, WrappedDrafter


class PredictionDrafter(WrappedDrafter):
    """The continuation of the predicted output after the place the answer has reached in it,
    ahead of `primary`'s candidates (the request's method: its chains fill what budget is left).

    Alignment: the pending token's occurrences in the prediction, each with how far back the
    answer matches the prediction before it (up to ``max_match`` tokens; a match that reaches
    back to the answer's first token and the prediction's first is the strongest: the answer
    starts as predicted). Longer matches rank first, then the occurrence nearest to where the
    last step's alignment says the answer should be (the answer follows the prediction in order,
    with edits: text inserted, dropped or changed, after which a later match takes over). The
    best ``max_candidates`` distinct continuations are drafted, as deep as the step allows, a
    match of n tokens weighing n / 2 times the primary's best candidate: where the answer
    follows the prediction, the tree's budget goes to it first; where a token or two match, the
    primary's candidates compete (``NodeAcceptance`` learns from the label
    ``prediction`` how often such nodes land).

    Its name is the primary's with ``+prediction``: requests with a prediction learn their
    adaptive budget from one another (``decoding.budget.shared_estimates``), not from the
    method's requests without one, whose drafts land at another rate."""

    source = "prediction"
    max_match = 32
    max_candidates = 2

    def __init__(self, primary: Drafter, prediction: Sequence[int]) -> None:
        super().__init__(primary)
        self.prediction = np.asarray(list(prediction), dtype=np.int64)
        self.name = f"{primary.name}+prediction"
        self._answer_from = 0                   # the answer's first position in `tokens`
        self._last: tuple[int, int] | None = None   # (occurrence aligned, answer length) of the last step

    def begin(self, prompt_ids: list[int], hidden: torch.Tensor | None) -> None:
        self._answer_from = len(prompt_ids)
        self._last = None
        self.primary.begin(prompt_ids, hidden)

    def predicted(self, tokens: np.ndarray, max_depth: int) -> list[tuple[list[int], float]]:
        """The prediction's continuations after the answer so far (`tokens`: the prompt, the
        answer, the pending token last), best first, with weights (the match's length, the
        answer's start counting one more, less a fraction for distance from the expected place)."""
        pred = self.prediction
        answer = tokens[self._answer_from:]
        if not len(pred) or not len(answer) or max_depth <= 0:
            return []
        ends = np.flatnonzero(pred[:-1] == answer[-1])     # an occurrence with something after it
        if not len(ends):
            return []
        length = np.ones(len(ends), dtype=np.int64)
        alive = np.arange(len(ends))
        for k in range(1, min(self.max_match, len(answer))):
            alive = alive[ends[alive] >= k]
            alive = alive[pred[ends[alive] - k] == answer[-1 - k]]
            if not len(alive):
                break
            length[alive] += 1
        # Both at their starts: the answer so far is the prediction's beginning.
        score = length + ((length == len(answer)) & (ends == len(answer) - 1))
        expected = None if self._last is None else self._last[0] + len(answer) - self._last[1]
        distance = np.zeros(len(ends)) if expected is None else np.abs(ends - expected)
        order = np.lexsort((distance, -score))
        found: list[tuple[list[int], float]] = []
        seen: set[bytes] = set()
        for i in order:
            e = int(ends[i])
            cont = pred[e + 1: e + 1 + max_depth]
            key = cont.tobytes()
            if key in seen:
                continue
            if not found:
                self._last = (e, len(answer))
            seen.add(key)
            found.append((cont.tolist(), float(score[i]) - float(distance[i]) / (1.0 + float(distance[i]))))
            if len(found) >= self.max_candidates:
                break
        return found

    def anchored_chains(self, tokens: np.ndarray, max_depth: int, hidden: torch.Tensor | None = None):
        found, labels, keys = self.primary.anchored_chains(tokens, max_depth, hidden)
        ours = self.predicted(tokens, max_depth)
        if not ours:
            return found, labels, keys
        # A match of n tokens weighs n / 2 times the primary's best candidate: a 1-token match
        # (the pending token occurs in the prediction) weighs half of it, a match of the answer's
        # last 8 tokens four times it (a node's weight sums the chains through it, so where the
        # primary's candidates agree they can still outweigh a short match).
        top = max((w for _, w in found), default=1.0)
        ours = [(c, top * w / 2) for c, w in ours]
        return ours + list(found), [self.source] * len(ours) + list(labels), [None] * len(ours) + list(keys)


def prediction_usage(prediction: Sequence[int], output: Sequence[int]) -> dict[str, int]:
    """OpenAI's ``completion_tokens_details`` for a predicted output: the prediction's tokens
    that appear in the answer (in order: the matching blocks of the two sequences) and those that
    do not."""
    blocks = difflib.SequenceMatcher(None, list(prediction), list(output), autojunk=False).get_matching_blocks()
    accepted = sum(b.size for b in blocks)
    return {"accepted_prediction_tokens": accepted, "rejected_prediction_tokens": len(prediction) - accepted}
