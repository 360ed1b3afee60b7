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
        # The answer's distinct tokens in order of first appearance and their counts; slot[t]:
        # token t's place (arrays with room to grow: a step's adjustment reads them as they are,
        # no sorting or Python loop over the answer's tokens).
        self.slot: dict[int, int] = {}
        self.ids = np.empty(64, dtype=np.int64)
        self.c = np.empty(64)

    def add(self, tokens) -> None:
        """Count tokens that joined the answer."""
        for t in tokens:
            i = self.slot.get(t)
            if i is None:
                i = self.slot[t] = len(self.slot)
                if i == len(self.ids):
                    self.ids = np.concatenate([self.ids, np.empty_like(self.ids)])
                    self.c = np.concatenate([self.c, np.empty_like(self.c)])
                self.ids[i], self.c[i] = t, 0.0
            self.c[i] += 1

    @torch.inference_mode()         # (a forward's logits are inference tensors: updated in place only there)
    def apply(self, logits: torch.Tensor, tree: TokenTree | None = None, *, in_place: bool = False) -> torch.Tensor:
        """`logits` [N, V] adjusted, in float32: the rows of `tree`'s nodes in its order (None: one
        row, at the position after the answer so far). A copy, unless `in_place` and the logits are
        float32 (a verification's own rows); a prefill's may be kept elsewhere (the prefix cache
        keeps a prompt's)."""
        out = logits.float()                # (the same tensor if it is float32 already)
        if out is logits and not in_place:
            out = out.clone()
        n = out.shape[0]
        if tree is not None and len(tree) != n:
            raise ValueError(f"{n} rows of logits for a tree of {len(tree)} nodes")
        if self.presence or self.frequency:
            k, slot = len(self.slot), self.slot
            extra: dict[int, int] = {}      # the tree's tokens the answer lacks, after the answer's
            if n > 1:
                for t in tree.tokens[1:]:
                    if t not in slot and t not in extra:
                        extra[t] = k + len(extra)
            if k or extra:
                ids, c = self.ids[:k], np.empty((n, k + len(extra)))
                c[0, :k] = self.c[:k]
                if extra:
                    ids = np.concatenate([ids, np.fromiter(extra, dtype=np.int64, count=len(extra))])
                    c[0, k:] = 0.0
                for i in range(1, n):           # parents precede children
                    t = tree.tokens[i]
                    c[i] = c[tree.parents[i]]
                    c[i, slot[t] if t in slot else extra[t]] += 1
                delta = torch.from_numpy(self.frequency * c + self.presence * (c > 0)).to(torch.float32)
                out[:, torch.from_numpy(ids)] -= delta
        if len(self.bias_ids):
            out[:, self.bias_ids] += self.bias_values
        return out
