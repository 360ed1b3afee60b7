"""The adaptive draft budget: counterfactual learning from ranks, and choices that follow c(n)."""

from __future__ import annotations

import pytest

from decoding.budget import AdaptiveBudget, interpolate_cost, pick_budget
from decoding.tree import TokenTree


def test_accepted_within_follows_ranks():
    # Heavy chain 2-3-4 (ranks 0, 1, 2) and a light sibling 9 (rank 3).
    t = TokenTree.from_chains(1, [([2, 3, 4], 5.0), ([9], 1.0)], budget=8)
    path = [0, t.child(0, 2), t.child(t.child(0, 2), 3)]
    assert [t.accepted_within(path, b) for b in (0, 1, 2, 3, 8)] == [0, 1, 2, 2, 2]
    light = [0, t.child(0, 9)]
    assert t.accepted_within(light, 3) == 0 and t.accepted_within(light, 4) == 1


def test_ranks_must_follow_parents():
    with pytest.raises(ValueError):
        TokenTree((1, 2, 3), (-1, 0, 1), ranks=(-1, 1, 0))


def test_interpolation():
    cost = {0: 1.0, 4: 2.0, 8: 4.0}
    assert interpolate_cost(cost, 2) == pytest.approx(1.5)
    assert interpolate_cost(cost, 12) == pytest.approx(6.0)
    assert pick_budget({0: 1.0, 1: 1.05, 2: 1.2, 3: 1.1, 4: 1.6}) == 3


def simulate(cost: dict[int, float], accept_per_node: float, steps: int = 200) -> AdaptiveBudget:
    """Chains where each draft token is accepted while a fixed-probability coin keeps landing."""
    import random

    rng = random.Random(0)
    ab = AdaptiveBudget(cost)
    for _ in range(steps):
        b = ab.choose()
        tree = TokenTree.chain(0, list(range(1, b + 1)))
        path = [0]
        while len(path) <= b and rng.random() < accept_per_node:
            path.append(len(path))
        ab.update(tree, path, b)
    return ab


def test_flat_cost_curve_drafts_large_trees():
    gpu = {0: 1.0, 1: 1.0, 2: 1.0, 4: 1.01, 8: 1.02, 16: 1.04, 32: 1.08, 64: 1.2}
    assert simulate(gpu, 0.8).best() >= 8


def test_steep_cost_curve_drafts_small_trees():
    cpu = {0: 1.0, 1: 1.05, 2: 1.18, 3: 1.13, 4: 1.6, 8: 2.0, 16: 2.6, 32: 3.3, 64: 4.6}
    assert 1 <= simulate(cpu, 0.8).best() <= 3


def test_useless_drafts_fall_back_to_no_draft():
    cpu = {0: 1.0, 1: 1.3, 2: 1.5, 4: 1.9}
    assert simulate(cpu, 0.0).best() == 0
