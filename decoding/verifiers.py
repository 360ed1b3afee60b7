"""Verifiers: which root-to-node path of a verified token tree to commit.

Every verifier returns the accepted path (node indices, starting at the root) and the next
pending token, chosen from the target's distribution at the last accepted node. Each verify
step therefore commits ``len(path)`` tokens and adds one new pending token.
"""

from __future__ import annotations

from typing import Protocol

import torch

from decoding.config import SamplingParams
from decoding.sampling import greedy_token, make_generator, sample_token
from decoding.soft import SoftGatedVerifier
from decoding.tree import TokenTree
from decoding.verdict import Verdict

__all__ = ["Verdict", "Verifier", "StrictGreedyVerifier", "StrictSamplingVerifier", "SoftGatedVerifier",
           "make_verifier"]


class Verifier(Protocol):
    def first_token(self, logits: torch.Tensor) -> int: ...

    def verify(self, tree: TokenTree, logits: torch.Tensor) -> Verdict: ...


class StrictGreedyVerifier:
    """Lossless greedy: the output is identical to autoregressive greedy decoding."""

    def first_token(self, logits: torch.Tensor) -> int:
        return greedy_token(logits)

    def verify(self, tree: TokenTree, logits: torch.Tensor) -> Verdict:
        # Acceptance rule: walk from the root; at each node the target's argmax decides the next
        # token; follow the child carrying it, stop where no child does. That argmax is the bonus token.
        # On a CPU only the nodes on the walk take an argmax (the others' never matter); on a
        # GPU all rows at once, one transfer.
        choices = None if logits.device.type == "cpu" else logits.argmax(-1).tolist()
        path, node = [0], 0
        while True:
            choice = greedy_token(logits[node]) if choices is None else choices[node]
            child = tree.child(node, choice)
            if child is None:
                return Verdict(path, choice)
            path.append(child)
            node = child


class StrictSamplingVerifier:
    """Lossless sampling for drafts that carry no draft distribution (retrieval drafts).

    Acceptance rule: at each node draw x ~ p_target(. | prefix to node), with temperature,
    top-k and top-p applied; follow the child carrying x, stop where none does and emit x as
    the next token. Every emitted token is an exact draw from the target's conditional, so the
    output distribution equals autoregressive sampling whatever the drafts are. (REST and
    DReSD sample once per path and keep the longest accepted path; that favours drafted
    tokens and biases the output, so it is not done here.)
    """

    def __init__(self, params: SamplingParams, generator: torch.Generator | None = None) -> None:
        if params.greedy:
            raise ValueError("StrictSamplingVerifier needs temperature > 0")
        self.params = params
        self.generator = generator if generator is not None else make_generator(params.seed)

    def first_token(self, logits: torch.Tensor) -> int:
        return sample_token(logits, self.params, self.generator)

    def verify(self, tree: TokenTree, logits: torch.Tensor) -> Verdict:
        path, node = [0], 0
        while True:
            x = sample_token(logits[node], self.params, self.generator)
            child = tree.child(node, x)
            if child is None:
                return Verdict(path, x)
            path.append(child)
            node = child


def make_verifier(params: SamplingParams, soft=None, transform=None) -> Verifier:
    """Strict (lossless) by default; a ``decoding.config.SoftGateConfig`` selects soft-gated
    verification (`transform`: the drafter's key transform, for its cosine stand-in)."""
    if soft is not None:
        return SoftGatedVerifier(params, soft, transform=transform)
    return StrictGreedyVerifier() if params.greedy else StrictSamplingVerifier(params)
