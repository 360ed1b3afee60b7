"""The drafting gate (decoding/gate.py): per load, blocks that allocate as usual against blocks
that draft nothing, compared pair by pair."""

from __future__ import annotations

import math

from decoding.gate import DraftingGate


def drive(gate: DraftingGate, requests: int, steps: int, rate, speed=lambda t: 1.0) -> list[bool]:
    """Run `steps` steps of a batch of `requests`; a step commits `requests` tokens at
    `rate(drafting)` tokens per second of a machine running at `speed(step)`. Returns whether each
    step drafted."""
    modes = []
    for t in range(steps):
        drafting = gate.allows(requests)
        modes.append(drafting)
        tokens = requests
        gate.observe(requests, tokens, tokens / (rate(drafting) * speed(t)))
    return modes


def test_a_load_where_drafting_loses_drafts_only_in_probes():
    gate = DraftingGate()
    modes = drive(gate, 8, 2000, lambda drafting: 97.0 if drafting else 100.0)
    assert gate.verdict(8) is False
    tail = modes[200:]
    share = sum(tail) / len(tail)
    assert 0.05 < share < 0.15          # one block in probe_every + 1 drafts, to follow changes
    # (drafting 3% worse: a probe block costs ~3% of a block, one in 9 ~0.3%, below probe_cost)


def test_a_load_where_drafting_pays_rarely_stops():
    gate = DraftingGate()
    modes = drive(gate, 2, 4000, lambda drafting: 150.0 if drafting else 100.0)
    assert gate.verdict(2) is True
    tail = modes[200:]
    assert sum(tail) / len(tail) > 0.98     # a clear verdict probes rarely (|mean| / probe_cost blocks)


def test_the_machines_drift_cancels_within_pairs():
    """A machine slowing by 40% over the run while drafting gains 3%: neighbouring blocks see the
    same machine, so the verdict holds (a comparison of the kinds' overall rates would not)."""
    for gain, want in ((1.03, True), (0.97, False)):
        gate = DraftingGate()
        n = 3000
        drive(gate, 6, n, lambda drafting: 100.0 * (gain if drafting else 1.0),
              speed=lambda t: 1.0 - 0.4 * t / n)
        assert gate.verdict(6) is want


def test_the_verdict_follows_a_change():
    gate = DraftingGate()
    drive(gate, 4, 1500, lambda drafting: 90.0 if drafting else 100.0)
    assert gate.verdict(4) is False
    drive(gate, 4, 1500, lambda drafting: 120.0 if drafting else 100.0)      # drafts got better
    assert gate.verdict(4) is True


def test_loads_are_judged_apart_and_the_first_pairs_alternate():
    gate = DraftingGate()
    first = drive(gate, 2, gate.block * (gate.pairs_min + 1), lambda drafting: 150.0 if drafting else 100.0)
    blocks = first[::gate.block]
    assert blocks == [i % 2 == 0 for i in range(len(blocks))]      # on, off, on, off, on: 4 pairs
    drive(gate, 16, 2000, lambda drafting: 90.0 if drafting else 100.0)
    assert gate.verdict(2) is True and gate.verdict(16) is False
    assert gate.verdict(3) is None
    assert gate.band(16) == gate.band(14) == gate.band(19) != gate.band(20)
    assert [gate.band(r) for r in (2, 3, 4)] == [2, 3, 4] and gate.band(5) == gate.band(6) != gate.band(4)


def test_a_noisy_load_settles_on_the_better_kind_most_of_the_time():
    """Step times with 10% noise, drafting 5% better: the running mean of the pairs leaves the
    batch drafting in most blocks."""
    import random

    rng = random.Random(0)
    gate = DraftingGate()
    modes = drive(gate, 8, 6000, lambda drafting: (105.0 if drafting else 100.0) * math.exp(rng.gauss(0, 0.1)))
    assert sum(modes[1000:]) / len(modes[1000:]) > 0.7


def test_the_summary_names_each_load_and_its_verdict():
    gate = DraftingGate()
    drive(gate, 2, 200, lambda drafting: 150.0 if drafting else 100.0)
    drive(gate, 16, 200, lambda drafting: 90.0 if drafting else 100.0)
    drive(gate, 5, 4, lambda drafting: 100.0)
    s = gate.summary()
    assert list(s) == ["2", "5-6", "14-19"]
    assert s["2"]["verdict"] == "drafts" and abs(s["2"]["gain"] - 0.5) < 1e-6
    assert s["14-19"]["verdict"] == "drafts nothing" and abs(s["14-19"]["gain"] + 0.1) < 1e-6
    assert s["5-6"] == {"verdict": "measuring", "pairs": 0, "steps": 4, "gain": 0.0}
    assert s["2"]["steps"] == 200 and s["14-19"]["steps"] == 200


def test_a_load_above_one_that_drafts_nothing_starts_from_its_verdict():
    """Drafting pays less the more requests share a forward: a new load above a measured "drafts
    nothing" starts there, without the first pairs' alternating blocks, and its probes still
    measure it (drafting that pays there after all takes the verdict back)."""
    gate = DraftingGate()
    drive(gate, 4, 400, lambda drafting: 90.0 if drafting else 100.0)
    assert gate.verdict(4) is False
    first = drive(gate, 8, gate.block * 6, lambda drafting: 150.0 if drafting else 100.0)
    assert gate.verdict(8) is False and not any(first)          # seeded: no learning blocks
    assert gate.summary()["7-9"]["seeded_from"] == "4"
    drive(gate, 8, 6000, lambda drafting: 150.0 if drafting else 100.0)
    assert gate.verdict(8) is True                              # the probes measured it


def test_a_load_below_one_that_drafts_starts_drafting_and_contradictions_seed_nothing():
    gate = DraftingGate()
    drive(gate, 16, 400, lambda drafting: 120.0 if drafting else 100.0)
    assert gate.verdict(16) is True
    first = drive(gate, 2, gate.block * 6, lambda drafting: 150.0 if drafting else 100.0)
    assert all(first) and gate.verdict(2) is True
    # A load above one that drafts, or below one that drafts nothing, learns its own verdict.
    gate = DraftingGate()
    drive(gate, 4, 400, lambda drafting: 120.0 if drafting else 100.0)
    first = drive(gate, 8, gate.block * 2, lambda drafting: 100.0)
    assert first[::gate.block] == [True, False] and gate.verdict(8) is None
    # Between a lower load that drafts nothing and a higher one that drafts: nothing carries over.
    gate = DraftingGate()
    drive(gate, 2, 400, lambda drafting: 90.0 if drafting else 100.0)
    drive(gate, 16, 400, lambda drafting: 120.0 if drafting else 100.0)
    drive(gate, 6, gate.block, lambda drafting: 100.0)
    assert gate.verdict(6) is None and "seeded_from" not in gate.summary()["5-6"]


def test_a_step_whose_forward_was_disturbed_is_left_out():
    """Served, a forward beside a request's HTTP work ran 2-4x its usual time. Disturbances that
    happen to strike the drafting blocks (here one step in three of theirs, 3x slower) would
    turn a 5% gain into a verdict of "drafts nothing"; told each forward's expected time, the gate
    leaves those steps out."""
    for told, want in ((True, True), (False, False)):
        gate = DraftingGate()
        for t in range(3000):
            drafting = gate.allows(8)
            slow = drafting and t % 3 == 0
            seconds = 8 / (105.0 if drafting else 100.0) * (3.0 if slow else 1.0)
            forward = (seconds, 8 / 105.0) if told else None
            gate.observe(8, 8, seconds, forward)
        assert gate.verdict(8) is want


def test_a_verdict_of_few_pairs_is_probed_soon():
    """First pairs that lie (disturbed drafting blocks, 3x slower, nothing told the gate) give a
    mean far below zero; the probes of a verdict of few pairs come every few blocks, so the
    true gain (+50%) takes the verdict back within a few hundred steps, not thousands."""
    gate = DraftingGate()
    first = gate.block * (2 * gate.pairs_min + 1)
    drive(gate, 2, first, lambda drafting: 50.0 if drafting else 100.0)
    assert gate.verdict(2) is False and gate.summary()["2"]["gain"] < -0.4
    modes = drive(gate, 2, 600, lambda drafting: 150.0 if drafting else 100.0)
    assert gate.verdict(2) is True and all(modes[-100:])
