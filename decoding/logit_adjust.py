"""OpenAI's logit adjustments: presence and frequency penalties, and a logit bias.

At every position, before the temperature, top-k and top-p (and before the greedy argmax):

    logit[j] = logit[j] - frequency_penalty * c[j] - presence_penalty * (c[j] > 0) + bias[j]

where c[j] counts token j among the tokens generated before the position (the answer so far, not
the prompt: OpenAI's definition, and vLLM's). In a verified tree, the row of node i predicts the
token after node i, so its counts are the committed answer's (the pending root included) plus the
draft tokens on the path to node i, node i's own included. Those are the tokens autoregressive
decoding would have generated before that position, so every row is adjusted by exactly the
values a one-row step adjusts it by, in the same float32 operations: strict verification stays
identical to autoregressive decoding with the same adjustments, and so do the log-probabilities
(which are of the adjusted logits: the distribution the tokens were drawn from).
"""

from __future__ import annotations

import numpy as np
import torch

from decoding.config import SamplingParams
from decoding.errors import InvalidRequestError
from decoding.tree import TokenTree


class LogitAdjust:
    """One request's adjustments and the counts of its answer's tokens so far."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        too_large = [t for t, _ in params.logit_bias if t >= vocab_size]
        if too_large:
            raise InvalidRequestError(f"logit_bias names token {too_large[0]}, outside the model's vocabulary "
                                      f"(0..{vocab_size - 1})", "logit_bias")
        self.presence = float(params.presence_penalty)
        self.frequency = float(params.frequency_penalty)
        self.bias_ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long)
        self.bias_values = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32)
        self.counts: dict[int, int] = {}

    def add(self, tokens) -> None:
        """Count tokens that joined the answer."""
        for t in tokens:
            self.counts[t] = self.counts.get(t, 0) + 1

    def apply(self, logits: torch.Tensor, tree: TokenTree | None = None) -> torch.Tensor:
        """The adjusted float32 copy of `logits` [N, V]: the rows of `tree`'s nodes in its order
        (None: one row, at the position after the answer so far). Never in place: a forward's
        logits may be kept elsewhere (the prefix cache keeps a prompt's)."""
        out = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
        n = out.shape[0]
        if tree is not None and len(tree) != n:
            raise ValueError(f"{n} rows of logits for a tree of {len(tree)} nodes")
        if self.presence or self.frequency:
            extra = tree.tokens[1:] if tree is not None else ()
            ids = sorted(set(self.counts).union(extra))
            if ids:
                col = {t: i for i, t in enumerate(ids)}
                c = np.empty((n, len(ids)))
                c[0] = [self.counts.get(t, 0) for t in ids]
                for i in range(1, n):           # parents precede children
                    c[i] = c[tree.parents[i]]
                    c[i, col[tree.tokens[i]]] += 1
                delta = torch.from_numpy(self.frequency * c + self.presence * (c > 0)).to(torch.float32)
                index = torch.tensor(ids, dtype=torch.long)
                out[:, index] -= delta
        if len(self.bias_ids):
            out[:, self.bias_ids] += self.bias_values
        return out
