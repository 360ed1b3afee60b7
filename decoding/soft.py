"""Soft-gated verification (lossy, opt-in): SENSE's relaxed acceptance, after FLy.

At a node where the target's own choice c has no child but a draft child d does, d is accepted
when all hold:
  1. the target is uncertain: the entropy of its renormalised top-k probabilities >= theta
     (over the tokens with p > 0 only);
  2. d is plausible: p(d) > 0 and d is in the target's top-k, or p(d) / p(argmax) >= lam. With
     sampling, p is the filtered distribution (temperature, top-k, top-p): a token the filter
     removes is never accepted, even where fewer than top_k tokens survive it;
  3. the draft goes on agreeing (deferred window): the target natively chooses each of the next
     window - 1 draft tokens after d. Where the draft path ends before the window does (every
     drafted token after d agreed, but there are too few), the cosine similarity between the
     target's state after d (its hidden state, through the datastore's key transform) and d's
     anchor key (the datastore's key where d stood in the retrieved source) >= tau stands in:
     the target read d in a context its source also had. Without an anchor key, d is rejected.
Otherwise the step ends as in strict verification. With sampling, "the target's choice" at
every node is a draw from its distribution, so strict agreement stays exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from decoding.config import SamplingParams, SoftGateConfig
from decoding.sampling import greedy_token, make_generator, sampling_probs
from decoding.tree import TokenTree
from decoding.verdict import Verdict


@dataclass
class SoftGateStats:
    mismatches: int = 0          # nodes where the target's choice had no child but drafts existed
    entropy_pass: int = 0
    plausible_pass: int = 0
    window_pass: int = 0         # = soft acceptances (cosine_pass included)
    cosine_pass: int = 0         # of which the tree ended the window and the cosine stood in
    soft_tokens: int = 0         # tokens committed through soft acceptances (d and its window)

    def to_dict(self) -> dict:
        return asdict(self)


def plausible_topk(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k most probable tokens that have p > 0, in float64.

    A sampling filter (top-k, top-p) can leave fewer than k tokens; `torch.topk` would fill the
    rest with zero-probability ties, tokens the target can never emit. They are dropped here.
    """
    top = torch.topk(probs, min(k, probs.shape[-1]))
    keep = top.values > 0
    return top.values[keep].double(), top.indices[keep]


def topk_entropy(probs: torch.Tensor, k: int) -> float:
    """Entropy (nats) of the renormalised top-k of `probs`, over the tokens with p > 0 only
    (computed in float64: a zero never turns into 0 * log 0 = NaN, in any input dtype)."""
    top, _ = plausible_topk(probs, k)
    top = top / top.sum()
    return float(-(top * torch.log(top)).sum())


class SoftGatedVerifier:
    uses_hidden = True               # verify() takes the tree's hidden states (the cosine stand-in)

    def __init__(self, params: SamplingParams, config: SoftGateConfig | None = None,
                 generator: torch.Generator | None = None, transform=None) -> None:
        self.params = params
        self.config = config or SoftGateConfig()
        self.transform = transform   # the datastore's KeyTransform (hidden state -> unit key)
        self.generator = generator if generator is not None else make_generator(params.seed)
        self.stats = SoftGateStats()

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(-1) if self.params.greedy else sampling_probs(logits, self.params)

    def _choose(self, logits: torch.Tensor, probs: torch.Tensor | None = None) -> int:
        if self.params.greedy:
            return greedy_token(logits)
        probs = self._probs(logits) if probs is None else probs
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def first_token(self, logits: torch.Tensor) -> int:
        return self._choose(logits)

    def _soft_candidate(self, tree: TokenTree, node: int, probs: torch.Tensor) -> int | None:
        """The most probable draft child passing gates 1 and 2, or None."""
        cfg = self.config
        if not topk_entropy(probs, cfg.top_k) >= cfg.theta:      # (a NaN entropy fails too)
            return None
        self.stats.entropy_pass += 1
        # Only tokens the target can emit (p > 0 under the sampling filter) are plausible.
        topk = set(plausible_topk(probs, cfg.top_k)[1].tolist())
        pmax = float(probs.max())
        best, best_p = None, 0.0
        for token, child in tree.children(node).items():
            p = float(probs[token])
            if p > 0 and (token in topk or p / pmax >= cfg.lam) and p > best_p:
                best, best_p = child, p
        if best is not None:
            self.stats.plausible_pass += 1
        return best

    def _cosine_stands_in(self, tree: TokenTree, node: int, hidden: torch.Tensor | None) -> bool:
        """The target's state after node's token is close to the datastore's at that token."""
        tau = self.config.tau
        if tau is None or hidden is None or self.transform is None or tree.anchor_keys is None:
            return False
        anchor = tree.anchor_keys[node]
        if np.isnan(anchor).any():
            return False
        q = self.transform(hidden[node].float().cpu().numpy()[None])[0]
        return float(q @ anchor) >= tau

    def verify(self, tree: TokenTree, logits: torch.Tensor, hidden: torch.Tensor | None = None) -> Verdict:
        """`hidden` [T, H]: the target's hidden states at the tree's nodes (for the cosine stand-in)."""
        path, node = [0], 0
        while True:
            probs = None if self.params.greedy else self._probs(logits[node])
            choice = self._choose(logits[node], probs)
            child = tree.child(node, choice)
            if child is not None:
                path.append(child)
                node = child
                continue
            if not tree.children(node):
                return Verdict(path, choice)
            self.stats.mismatches += 1
            cand = self._soft_candidate(tree, node, self._probs(logits[node]) if probs is None else probs)
            if cand is None:
                return Verdict(path, choice)
            # Deferred window: the target must natively pick the next window - 1 draft tokens.
            run, m = [cand], cand
            for _ in range(self.config.window - 1):
                nxt = tree.child(m, self._choose(logits[m]))
                if nxt is None:
                    # A draft the target disagrees with is evidence of an error; a draft that
                    # simply ends leaves the window to the cosine stand-in.
                    if tree.children(m) or not self._cosine_stands_in(tree, cand, hidden):
                        return Verdict(path, choice)
                    self.stats.cosine_pass += 1
                    break
                run.append(nxt)
                m = nxt
            self.stats.window_pass += 1
            self.stats.soft_tokens += len(run)
            path += run
            node = m
