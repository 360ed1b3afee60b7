"""Soft-gated verification: each gate on hand-built logits, where it must and must not accept."""

from __future__ import annotations

import math

import pytest
import torch

from decoding.config import SamplingParams
from decoding.errors import InvalidRequestError
from decoding.soft import SoftGateConfig, SoftGatedVerifier, topk_entropy
from decoding.tree import TokenTree

V = 10


def logits_from(probs_by_node: list[dict[int, float]]) -> torch.Tensor:
    """[T, V] logits whose softmax puts the given mass on tokens (the rest shared evenly)."""
    rows = []
    for spec in probs_by_node:
        rest = (1.0 - sum(spec.values())) / (V - len(spec))
        p = torch.full((V,), rest)
        for t, v in spec.items():
            p[t] = v
        rows.append(torch.log(p))
    return torch.stack(rows)


UNCERTAIN = {1: 0.40, 2: 0.35, 3: 0.20}     # top-3 entropy ~1.03 nats
CONFIDENT = {1: 0.97}                        # top-3 entropy ~0.01


def chain_tree(first: int, rest: list[int]) -> TokenTree:
    """root -> first -> rest..., a single draft chain."""
    return TokenTree.chain(0, [first, *rest])


def greedy(**cfg) -> SoftGatedVerifier:
    return SoftGatedVerifier(SamplingParams(), SoftGateConfig(**cfg))


def test_entropy_of_topk():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert topk_entropy(p, 2) == pytest.approx(math.log(2))
    assert topk_entropy(torch.tensor([1.0, 0.0, 0.0]), 3) == pytest.approx(0.0, abs=1e-6)


def test_accepts_plausible_token_when_uncertain_and_window_agrees():
    # Root: target prefers 1, draft says 2 (in top-3, entropy high). After 2 the target agrees
    # natively with the next two draft tokens 5, 6 (window 3).
    tree = chain_tree(2, [5, 6])
    logits = logits_from([UNCERTAIN, {5: 0.9}, {6: 0.9}, {7: 0.9}])
    v = greedy(window=3)
    verdict = v.verify(tree, logits)
    assert verdict.path == [0, 1, 2, 3] and verdict.next_token == 7
    assert v.stats.window_pass == 1 and v.stats.soft_tokens == 3


def test_rejects_when_target_is_confident():
    tree = chain_tree(2, [5, 6])
    logits = logits_from([CONFIDENT, {5: 0.9}, {6: 0.9}, {7: 0.9}])
    v = greedy(window=3)
    verdict = v.verify(tree, logits)
    assert verdict.path == [0] and verdict.next_token == 1
    assert v.stats.mismatches == 1 and v.stats.entropy_pass == 0


def test_rejects_implausible_token():
    # Uncertain among 1, 2, 3, but the draft token 8 is outside the top-3 with a low ratio.
    tree = chain_tree(8, [5, 6])
    logits = logits_from([UNCERTAIN, {5: 0.9}, {6: 0.9}, {7: 0.9}])
    v = greedy(window=3)
    assert v.verify(tree, logits).path == [0]
    assert v.stats.entropy_pass == 1 and v.stats.plausible_pass == 0


def test_ratio_gate_admits_token_outside_topk():
    spec = {1: 0.30, 2: 0.26, 3: 0.25, 8: 0.17}   # 8 is 4th, ratio 0.57 >= lam 0.5
    tree = chain_tree(8, [5])
    logits = logits_from([spec, {5: 0.9}, {6: 0.9}])
    assert greedy(window=2, lam=0.5).verify(tree, logits).path == [0, 1, 2]
    assert greedy(window=2, lam=0.9).verify(tree, logits).path == [0]


def test_rejects_when_window_disagrees():
    tree = chain_tree(2, [5, 6])
    logits = logits_from([UNCERTAIN, {5: 0.9}, {9: 0.9}, {7: 0.9}])  # target wants 9, draft has 6
    v = greedy(window=3)
    verdict = v.verify(tree, logits)
    assert verdict.path == [0] and verdict.next_token == 1
    assert v.stats.plausible_pass == 1 and v.stats.window_pass == 0


def test_rejects_when_path_is_shorter_than_window():
    tree = chain_tree(2, [5])
    logits = logits_from([UNCERTAIN, {5: 0.9}, {6: 0.9}])
    assert greedy(window=6).verify(tree, logits).path == [0]


def test_strict_agreement_is_kept_and_soft_continues_deeper():
    # Target agrees with the first draft token natively, then a soft step at depth 1.
    tree = chain_tree(1, [3, 4])
    logits = logits_from([{1: 0.9}, UNCERTAIN, {4: 0.9}, {5: 0.9}])   # at node 1 target wants 1, draft 3
    v = greedy(window=2)
    assert v.verify(tree, logits).path == [0, 1, 2, 3]


def test_picks_most_probable_plausible_child():
    tree = TokenTree((0, 3, 2, 5, 6), (-1, 0, 0, 1, 2))
    logits = logits_from([UNCERTAIN, {5: 0.9}, {6: 0.9}, {7: 0.9}, {7: 0.9}])
    verdict = greedy(window=2).verify(tree, logits)
    assert verdict.path == [0, 2, 4]   # token 2 (p=.35) beats token 3 (p=.20)


def test_sampling_mode_is_seeded_and_valid():
    tree = chain_tree(2, [5, 6])
    logits = logits_from([UNCERTAIN, {5: 0.9}, {6: 0.9}, {7: 0.9}])
    params = SamplingParams(temperature=1.0, seed=3)
    a = [SoftGatedVerifier(params, SoftGateConfig(window=3)).verify(tree, logits) for _ in range(3)]
    assert all(x == a[0] for x in a)
    assert all(0 <= x.next_token < V for x in a)


@pytest.mark.parametrize("kwargs", [{"theta": -1}, {"theta": math.nan}, {"top_k": 1}, {"lam": 0},
                                    {"lam": 1.5}, {"window": 0}])
def test_bad_options(kwargs):
    with pytest.raises(InvalidRequestError):
        SoftGateConfig(**kwargs)
