"""The adaptive draft budget: counterfactual learning from ranks, and choices that follow c(n)."""

from __future__ import annotations

import pytest

from decoding.budget import (
    AdaptiveBudget,
    SharedEstimates,
    draft_sizes,
    pick_budget,
    shared_estimates,
)
from decoding.cost import interpolate_cost
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


def test_soft_verification_drafts_at_least_its_window():
    from decoding.config import SoftGateConfig

    cost = {0: 1.0, 1: 1.1, 2: 1.4, 4: 1.9, 6: 2.3, 8: 2.1, 16: 4.4}
    assert draft_sizes(cost) == [1, 2, 4, 6, 8, 16]
    assert draft_sizes(cost, SoftGateConfig()) == [6, 8, 16]              # the window W = 6
    assert draft_sizes(cost, SoftGateConfig(window=2)) == [2, 4, 6, 8, 16]
    assert draft_sizes({0: 1.0, 1: 1.1, 4: 1.9}, SoftGateConfig()) == [1, 4]   # none that large: all


def simulate(cost: dict[int, float], accept_per_node: float, steps: int = 200, shared=None,
             choices: list[int] | None = None) -> AdaptiveBudget:
    """Chains where each draft token is accepted while a fixed-probability coin keeps landing."""
    import random

    rng = random.Random(0)
    ab = AdaptiveBudget(cost, shared=shared)
    for _ in range(steps):
        b = ab.choose()
        if choices is not None:
            choices.append(b)
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


def test_a_request_starts_from_what_earlier_requests_learned():
    """Alone, every request opens with the largest tree the optimistic prior may choose (no
    larger than ``draft_size``: c(2) = 1.5 here) and then climbs the sizes; with the estimates of
    the requests before it, a request whose drafts never pay drafts nothing from its first step,
    but for the periodic exploration of one size up."""
    cpu = {0: 1.0, 1: 1.3, 2: 1.5, 4: 1.9, 8: 2.6, 16: 3.6, 32: 5.0, 64: 7.2}
    alone: list[int] = []
    simulate(cpu, 0.0, steps=24, choices=alone)
    assert alone[0] == 2 == AdaptiveBudget(cpu).draft_size
    shared = SharedEstimates()
    simulate(cpu, 0.0, steps=24, shared=shared)              # an earlier request of the same drafter
    later: list[int] = []
    ab = simulate(cpu, 0.0, steps=24, shared=shared, choices=later)
    assert later[0] == 0 and max(later) == 1 and later.count(1) == 3       # steps 8, 16 and 24 explore
    assert ab.best() == 0
    # Requests whose drafts do pay teach the next one to draft from its first step.
    good = SharedEstimates()
    simulate(cpu, 0.9, steps=48, shared=good)
    first: list[int] = []
    simulate(cpu, 0.9, steps=1, shared=good, choices=first)
    assert 1 <= first[0] < 64
    assert shared_estimates(good, "pld") is shared_estimates(good, "pld")
    assert shared_estimates(good, "pld") is not shared_estimates(good, "sense")


def test_per_owner_values_live_as_long_as_their_owner():
    import gc

    from decoding.per_owner import PerOwner

    class Owner:
        pass

    made: list[int] = []
    table = PerOwner(lambda: made.append(1) or object())
    a, b = Owner(), Owner()
    va = table.get(a, "k")
    assert table.get(a, "k") is va and table.get(b, "k") is not va and table.get(a, "j") is not va
    assert len(made) == 3
    del a
    gc.collect()
    assert len(table._tables) == 1          # a's values went with it; b's stay


def test_shared_estimates_go_back_to_a_snapshot():
    """A benchmark measures a run the machine disturbed again (bench.common.StallGuard), from the
    shared estimates as they were before it: ``restore`` undoes everything a run taught, the
    node model included, and the next request starts as it would have."""
    cpu = {0: 1.0, 1: 1.3, 2: 1.5, 4: 1.9, 8: 2.6, 16: 3.6, 32: 5.0, 64: 7.2}
    good = SharedEstimates()
    simulate(cpu, 0.9, steps=48, shared=good)
    tree = _tree_of_shares(1.0, 1.0)
    for _ in range(20):
        good.nodes.learn(tree, [0, tree.child(0, 1)])
    snap = good.snapshot()
    before = (dict(good.accepted), dict(good.forward), dict(good.overhead), good.wide,
              dict(good.nodes.coef), good.nodes.updates)
    first: list[int] = []
    simulate(cpu, 0.9, steps=1, shared=good, choices=first)
    simulate(cpu, 0.0, steps=100, shared=good)              # a run whose drafts never landed
    for _ in range(20):
        good.nodes.learn(tree, [0])
    assert good.accepted != before[0] and good.nodes.coef != before[4]
    good.restore(snap)
    assert (dict(good.accepted), dict(good.forward), dict(good.overhead), good.wide,
            dict(good.nodes.coef), good.nodes.updates) == before
    again: list[int] = []
    simulate(cpu, 0.9, steps=1, shared=good, choices=again)
    assert again == first and first[0] >= 1


def test_a_new_drafter_opens_no_wider_than_the_draft_size_and_learns_every_size_it_could_not_fill():
    """On a steep curve the optimistic prior (A(b) = b / 2) picked the largest size, a 64-node
    tree of 4.6 decode steps, as a new drafter's first: now no size above ``draft_size`` is
    chosen on its prior. A tree of fewer nodes than its budget is all the drafter found, so its
    outcome gives every larger size not yet measured its first estimate; a tree that filled its
    budget teaches none above."""
    steep = {0: 1.0, 1: 1.05, 2: 1.1, 4: 1.2, 8: 1.3, 16: 1.45, 32: 2.2, 64: 4.6}
    flat = {0: 1.0, 1: 1.0, 4: 1.01, 16: 1.04, 64: 1.2}
    assert AdaptiveBudget(steep).best() == 16 == AdaptiveBudget(steep).draft_size
    assert AdaptiveBudget(flat).best() == 64                 # a GPU's curve: the largest, as before
    few = AdaptiveBudget(steep)
    few.update(TokenTree.chain(0, [1, 2, 3]), [0, 1], 16)    # 3 nodes found for a budget of 16
    assert all(few.seen[b] == 1 and few.accepted[b] == 1.0 for b in few.sizes)
    assert few.best() < 16                                   # and its cost is priced at 3 nodes
    few.update(TokenTree.chain(0, [1, 2, 3]), [0], 4)        # again, none landing, for a budget of 4:
    assert few.accepted[4] < 1.0 and few.accepted[8] == few.accepted[64] == 1.0    # measured sizes above
    assert few.seen[8] == 1                                  # learn from their own steps only
    full = AdaptiveBudget(steep)
    full.update(TokenTree.chain(0, list(range(1, 17))), [0, 1], 16)
    assert [b for b in full.sizes if full.seen[b]] == [1, 2, 4, 8, 16]
    assert full.accepted[32] == 16                           # the prior, until a step tries 32
    empty = AdaptiveBudget(steep)
    empty.update(TokenTree.root_only(0), [0], 16)            # nothing found (a step the engine counts
    assert [b for b in empty.sizes if empty.seen[b]] == [1, 2, 4, 8, 16]     # as budget 0): as before


def test_an_untried_size_costs_the_drafting_time_of_the_nearest_tried_one():
    """A budget not yet tried is not taken for free: its time outside the forward is the
    nearest smaller tried size's (drafting more costs no less)."""
    ab = AdaptiveBudget({0: 1.0, 1: 1.0, 2: 1.0, 4: 1.0})
    assert ab.overhead_of(4) == 0.0
    ab.update(TokenTree.chain(0, [1]), [0], 1, overhead_s=0.5)
    assert ab.overhead_of(1) == ab.overhead_of(2) == ab.overhead_of(4) == pytest.approx(0.5)
    assert ab.overhead_of(0) == 0.0
    ab.update(TokenTree.chain(0, [1, 2, 3, 4]), [0], 4, overhead_s=2.0)
    assert ab.overhead_of(2) == pytest.approx(0.5) and ab.overhead_of(4) == pytest.approx(2.0)


def test_the_requests_own_forwards_price_the_budgets():
    """The curve says large trees are cheap (a one-off measurement at a fast moment, or at a
    shorter context than this request's); the request's own forward times say they cost what a
    steep curve does: it drafts the small trees it drafts on the steep curve, where without its
    forward times it drafts large ones. A machine 2x slower on every size alike changes no
    choice (a size not yet run takes the measured ratio of the nearest size run)."""
    import random

    steep = {0: 1.0, 1: 1.05, 2: 1.18, 3: 1.13, 4: 1.6, 8: 2.0, 16: 2.6, 32: 3.3, 64: 4.6}
    flat = {n: 1.0 + 0.003 * n for n in steep}

    def run(curve: dict[int, float], truth: dict[int, float] | None, slower: float = 1.0) -> AdaptiveBudget:
        rng = random.Random(0)
        ab = AdaptiveBudget(curve)
        for _ in range(300):
            b = ab.choose()
            tree = TokenTree.chain(0, list(range(1, b + 1)))
            path = [0]
            while len(path) <= b and rng.random() < 0.8:
                path.append(len(path))
            ab.update(tree, path, b, overhead_s=0.0,
                      forward_s=None if truth is None else slower * interpolate_cost(truth, b))
        return ab

    on_steep = run(steep, steep).best()
    assert 1 <= on_steep <= 4
    assert run(flat, None).best() >= 8                      # the flat curve alone misleads
    told = run(flat, steep)
    assert told.best() == on_steep and told.forward_of(4) == pytest.approx(1.6)      # 4: explored
    assert run(steep, steep, slower=2.0).best() == on_steep
    assert run(flat, flat, slower=2.0).best() == run(flat, flat).best() >= 8


def test_draft_time_counts_against_drafting():
    """The same acceptance pays on a cheap drafter and not on one whose drafting costs a decode
    step: the objective counts the step's time outside the forward, not only verification."""
    cost = {0: 1.0, 1: 1.05, 2: 1.1, 4: 1.2, 8: 1.4}

    def run(overhead_steps: float) -> AdaptiveBudget:
        ab = AdaptiveBudget(cost)
        for _ in range(200):
            b = ab.choose()
            tree = TokenTree.chain(0, list(range(1, b + 1)))
            path = list(range(min(b, 1) + 1))          # one draft token accepted per step
            ab.update(tree, path, b, overhead_s=0.0 if b == 0 else overhead_steps)
        return ab

    assert run(0.0).best() > 0
    assert run(1.5).best() == 0


def test_zero_budget_skips_the_drafter(target):
    """Budget 0 is plain decoding: the drafter is never asked (its time is not spent) and the
    output is the autoregressive one."""
    from decoding.config import SamplingParams
    from decoding.drafters import NoDrafter, PromptLookupDrafter
    from decoding.engine import encode_prompt, generate

    class Counting(PromptLookupDrafter):
        calls = 0

        def propose(self, *args, **kwargs):
            Counting.calls += 1
            return super().propose(*args, **kwargs)

    ids = encode_prompt(target, "Repeat after me: one two three, one two three, one two three.")
    params = SamplingParams(max_new_tokens=12)
    ref = generate(target, ids, params=params, drafter=NoDrafter())
    r = generate(target, ids, params=params, drafter=Counting(), budget=0)
    assert r.token_ids == ref.token_ids and Counting.calls == 0 and r.stats.drafted == 0
    r = generate(target, ids, params=params, drafter=Counting(), budget=4)
    assert r.token_ids == ref.token_ids and Counting.calls > 0


def test_adaptive_is_the_default_and_rejects_bad_budgets(target, tmp_path, monkeypatch):
    from decoding.config import SamplingParams
    from decoding.cost import cost_curve
    from decoding.drafters import PromptLookupDrafter
    from decoding.engine import encode_prompt, generate
    from decoding.errors import InvalidRequestError

    monkeypatch.setenv("SENSE_CACHE_DIR", str(tmp_path))
    monkeypatch.delattr(target, "_cost_curve", raising=False)
    shared = shared_estimates(target, ("pld", "StrictGreedyVerifier"))
    steps_before = sum(shared.forward_seen.values())
    ids = encode_prompt(target, "Count: 1 2 3 4 5 6 7 8 9 10 11 12")
    r = generate(target, ids, params=SamplingParams(max_new_tokens=8), drafter=PromptLookupDrafter())
    assert r.stats.new_tokens == 8
    # The default measured this machine's cost curve once and remembered it, on disk and on the target.
    files = list((tmp_path / "measured").glob("cost-*.json"))
    assert len(files) == 1 and cost_curve(target) is target._cost_curve[1]
    custom = generate(target, ids, params=SamplingParams(max_new_tokens=8), drafter=PromptLookupDrafter(),
                      budget=AdaptiveBudget(cost_curve(target)))        # a caller's own adaptive budget
    assert custom.token_ids == r.token_ids
    # The default budget added every step (each verified alone) to the estimates this drafter's
    # requests on this target share (a caller's own AdaptiveBudget keeps to itself).
    assert sum(shared.forward_seen.values()) - steps_before == r.stats.steps
    for bad in (-1, 2.5, "big", True):
        with pytest.raises(InvalidRequestError, match="budget"):
            generate(target, ids, params=SamplingParams(max_new_tokens=2), drafter=PromptLookupDrafter(), budget=bad)


def _tree_of_shares(shares_a, shares_b):
    """Two proposers' chains: 'a' with a dominant continuation, 'b' with stray ones."""
    chains = [([1, 2, 3, 4], shares_a)] + [([10 + i, 20 + i], shares_b) for i in range(4)]
    labels = ["a"] + ["b"] * 4
    return TokenTree.from_chains(0, chains, 16, labels)


def test_node_acceptance_learns_which_nodes_land():
    """Nodes of proposer 'a' always land and 'b's never: after training on verified trees, P(on
    path) of a's chain rises towards 1 along it and b's falls towards 0; only nodes whose parent
    was accepted teach (a rejected node's children have no outcome)."""
    from decoding.acceptance import NodeAcceptance

    model = NodeAcceptance()
    tree = _tree_of_shares(1.0, 1.0)
    a_path = [0]
    while len(a_path) < 5:
        a_path.append(tree.child(a_path[-1], [1, 2, 3, 4][len(a_path) - 1]))
    before = model.on_path(tree)
    for _ in range(300):
        model.learn(tree, a_path)
    after = model.on_path(tree)
    b_nodes = [i for i in range(1, len(tree)) if tree.sources[i] == ("b",)]
    assert all(after[i] > before[i] and after[i] > 0.8 for i in a_path[1:])
    assert all(after[i] < before[i] and after[i] < 0.05 for i in b_nodes)
    # on_path is the product of p(node | parent) along the path, as features() describe the node
    coef = dict(model.coef)
    for i in range(1, len(tree)):
        assert after[i] == pytest.approx(after[tree.parents[i]] * model._p(model.features(tree, i), coef))
    assert model.on_path(TokenTree.chain(0, [1, 2])) == [1.0, 0.0, 0.0]       # no weights: nothing expected


def test_the_cut_keeps_what_is_likely_to_land_and_drops_strays():
    """The step's budget from the tree at hand: a tree whose nodes the model expects to land is
    kept deep on a gentle curve, cut short on a steep one; one whose nodes never land is not
    verified at all (budget 0)."""
    flat = {0: 1.0, 1: 1.05, 2: 1.1, 4: 1.2, 8: 1.4, 16: 1.5}
    steep = {0: 1.0, 1: 1.05, 2: 1.3, 4: 1.9, 8: 3.0, 16: 5.0}
    tree = _tree_of_shares(1.0, 1.0)
    a_path = [0]
    while len(a_path) < 5:
        a_path.append(tree.child(a_path[-1], [1, 2, 3, 4][len(a_path) - 1]))
    lands, misses = AdaptiveBudget(flat), AdaptiveBudget(flat)
    # untrained, the model's guesses are its prior's: the step keeps the history's budget
    assert not lands.nodes.ready and lands.cut(tree, 6) == 6 and lands.widen(6) == 6
    for _ in range(300):
        lands.nodes.learn(tree, a_path)
        misses.nodes.learn(tree, [0])
    assert lands.cut(tree, 16) >= 4                     # a's four nodes, at least
    assert misses.cut(tree, 16) == 0
    steep_budget = AdaptiveBudget(steep)
    steep_budget.nodes = lands.nodes
    assert 1 <= steep_budget.cut(tree, 16) < lands.cut(tree, 16)
    assert lands.nodes.ready and lands.widen(6) == 16
    assert steep_budget.draft_size == 2 and lands.draft_size == 16         # c(n) <= 1.5


def test_a_lone_step_drafts_wide_and_verifies_the_cut(target):
    """Verified alone, an adaptive step drafts the budget's draft size and verifies the cut the
    node model chose; the output stays the autoregressive one."""
    from decoding.config import SamplingParams
    from decoding.cost import cost_curve
    from decoding.drafters import PromptLookupDrafter
    from decoding.engine import Sequence, encode_prompt, generate

    ids = encode_prompt(target, "Repeat: red green blue red green blue red green blue red green blue")
    params = SamplingParams(max_new_tokens=24)
    ab = AdaptiveBudget(cost_curve(target))
    ab.nodes.warm = 0                   # cut from the first step (the model's prior)
    drafted, verified = [], []
    seq = Sequence(target, ids, params=params, drafter=PromptLookupDrafter(), budget=ab)
    propose = seq.drafter.propose

    def recording(tokens, budget, max_depth, hidden=None):
        drafted.append(budget)
        return propose(tokens, budget, max_depth, hidden)

    seq.drafter.propose = recording
    verify = target.verify
    seq.target = type("Spy", (), {"__getattr__": lambda self, k: getattr(target, k),
                                  "verify": lambda self, state, tree: (verified.append(tree.n_draft),
                                                                       verify(state, tree))[1]})()
    out = seq.run()
    assert out.token_ids == generate(target, ids, params=params, budget=0).token_ids
    assert max(drafted) >= ab.draft_size > 0
    assert len(verified) == out.stats.steps and ab.nodes.updates > 0


def test_a_batchs_plain_steps_teach_the_plain_step_cost_one_in_eight():
    """A plain step of a batch (budget 0, nothing drafted, the forward shared) counts into D(0)
    one time in `explore_every` (a loaded batch runs them for every request, every step); a
    lone step's forward and a drafted step always count, and the batch's terms follow them."""
    ab = AdaptiveBudget({0: 0.01, 1: 0.012, 2: 0.013})
    root = TokenTree.root_only(3)
    before = ab.first_terms()
    for _ in range(16):
        ab.update(root, [0], 0, overhead_s=0.002)
    assert ab.overhead_seen[0] == 2 and ab.overhead[0] == pytest.approx(0.2)
    assert ab.first_terms() != before and ab.first_terms()[0][1] == pytest.approx(0.002)
    ab.update(root, [0], 0, overhead_s=0.002, forward_s=0.01)
    assert ab.overhead_seen[0] == 3 and ab.forward_seen[0] == 1


def test_no_drafting_size_costs_more_than_a_larger_tried_one():
    """A size whose few steps ran slow (beside a server's other threads) does not read dearer
    than a larger size tried since: the drafting is mostly per step, whatever its size."""
    ab = AdaptiveBudget({0: 0.01, 1: 0.012, 2: 0.013, 4: 0.015, 8: 0.02})
    root = TokenTree.root_only(3)
    ab.update(root, [0], 4, overhead_s=0.04)          # 4 decode steps, once
    assert ab.overhead_of(4) == pytest.approx(4.0) and ab.overhead_of(8) == pytest.approx(4.0)
    for _ in range(3):
        ab.update(root, [0], 8, overhead_s=0.01)      # 1 decode step
    assert ab.overhead_of(8) == pytest.approx(1.0)
    assert ab.overhead_of(4) == pytest.approx(1.0) and ab.overhead_of(2) == 0.0
