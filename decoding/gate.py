"""Whether a loaded batch drafts at all, by what drafting realized against not drafting.

The batch allocation (``decoding.scheduler.allocate_budgets``) drafts where its model of a step
says drafting pays: the forward's measured cost curve, each request's accepted tokens and own
time. Near the load where drafting stops paying, the model's errors decide, and part of a
drafting step's cost no term prices (the allocation and the cut themselves, a forward run right
after a retrieval). This gate checks the model by measurement, per load (the number of requests
in the batch, in half-octave bands above 4): it runs blocks of ``block`` steps that allocate as
usual and blocks that draft nothing, and compares each pair of neighbouring blocks of the two
kinds by committed tokens per second of forward and own time (prefills not counted): the
machine's drift, 10-30% over minutes on a shared VM, cancels within a pair. A running mean of
the pairs' log ratios decides which kind the load runs. The other kind still runs a block now
and then, so the verdict follows when drafts get better or the load's cost changes: one in
``probe_every`` at least, fewer where the verdict is clear, so that the probes cost at most
``probe_cost`` of the load's rate (a block of the other kind costs about |mean| of a block: at 2 in
flight, where drafting gains 40-60%, one block in ~100), but no more than ``probe_every`` blocks a
``pairs_min`` pairs measured between them (a mean of a few pairs can be a few disturbed blocks'). A
load's first ``pairs_min`` pairs alternate, unless a neighbouring load has already measured a
verdict that carries over: drafting pays less the more requests share a forward (their tokens fill
the forward's rows that drafts would use), so a load above one measured "drafts nothing" starts
from that verdict, and a load below one measured "drafts" from that one, as if its first pairs had
measured the neighbour's mean; its probes then measure it like any other (served, the first run at
8 in flight drafted for most requests over its first 25 steps while the gate learned a verdict that
4 in flight would have foretold). Requests of a fixed budget are not the gate's to change, and a
batch of one request is priced by its own forwards (``AdaptiveBudget``): it is never gated.

Measured in process (GSM8K, interleaved runs), 8 in flight: blocks that allocate ran 8.06 ms a
step for 8.54 tokens, blocks that draft nothing 7.08 ms for 8.00; SENSE/`ar` 0.977 with the
gate, 0.973 without (16 in flight 0.975 and 0.970).

Objective, as the allocation's: committed tokens per second of the batch's steps; the gate only
adds the measured answer to "would drafting nothing have done better at this load".
"""

from __future__ import annotations

import math


class _Load:
    """One load's state: the block under way and the verdict so far."""

    __slots__ = ("drafting", "left", "tokens", "seconds", "last", "pairs", "mean", "since", "seeded", "steps")

    def __init__(self, block: int) -> None:
        self.drafting = True            # the block under way: allocate as usual (or draft nothing)
        self.left = block               # its steps to go
        self.tokens = 0
        self.seconds = 0.0
        self.last: tuple[bool, float] | None = None     # (drafting, tokens/s) of the last block
        self.pairs = 0                  # neighbouring blocks of the two kinds compared
        self.mean = 0.0                 # running mean of log(drafting's rate / not drafting's)
        self.since = 0                  # blocks of the verdict's kind since the other kind ran
        self.seeded: int | None = None  # the load whose verdict it started from (DraftingGate._seed)
        self.steps = 0                  # steps measured (disturbed ones left out)


class DraftingGate:
    """One batch scheduler's verdicts, load by load (see the module)."""

    block = 4               # steps of a block
    pairs_min = 4           # pairs before a verdict (the blocks alternate until then)
    weight = 0.125          # a pair's weight in the running mean after pairs_min
    probe_every = 8         # blocks of the verdict's kind between blocks of the other, at least
    probe_cost = 0.005      # at most: |mean| / probe_cost blocks between them
    probe_every_most = 128
    disturbed = 1.5         # a step whose forward took this many times the expected is left out

    def __init__(self) -> None:
        self._loads: dict[int, _Load] = {}

    @staticmethod
    def band(requests: int) -> int:
        """The load a batch of `requests` counts under: exact up to 4, then half-octaves (5-6,
        7-9, 10-13, 14-19, 20-26, 27-38, ...)."""
        return requests if requests <= 4 else round(2 * math.log2(requests)) + 100

    def _load(self, requests: int) -> _Load:
        key = self.band(requests)
        load = self._loads.get(key)
        if load is None:
            load = self._loads[key] = _Load(self.block)
            self._seed(key, load)
        return load

    def _seed(self, key: int, load: _Load) -> None:
        """Start a new load from the verdict of the nearest measured load below it if that one
        drafts nothing, or of the nearest above it if that one drafts (not both: measurements
        that contradict the rule teach nothing about a load between them)."""
        measured = sorted(k for k, m in self._loads.items() if m.pairs >= self.pairs_min)
        below = [k for k in measured if k < key]
        above = [k for k in measured if k > key]
        off = bool(below) and self._loads[below[-1]].mean < 0.0
        on = bool(above) and self._loads[above[0]].mean >= 0.0
        if off == on:
            return
        source = below[-1] if off else above[0]
        load.seeded, load.pairs, load.mean = source, self.pairs_min, self._loads[source].mean
        load.drafting = on

    def allows(self, requests: int) -> bool:
        """Whether a step of `requests` requests (2 or more) allocates as usual (else its adaptive
        requests draft nothing, the exploration included)."""
        return self._load(requests).drafting

    def verdict(self, requests: int) -> bool | None:
        """Whether drafting pays at this load as measured so far (None: not enough pairs yet)."""
        load = self._loads.get(self.band(requests))
        return None if load is None or load.pairs < self.pairs_min else load.mean >= 0.0

    @staticmethod
    def _label(key: int) -> str:
        """A band's requests, as /health names it: "2", "7-9"."""
        if key <= 4:
            return str(key)
        within = [r for r in range(5, 2 ** ((key - 100) // 2 + 2)) if DraftingGate.band(r) == key]
        return f"{within[0]}-{within[-1]}"

    def summary(self) -> dict:
        """Per load seen (requests in the batch, a band above 4): whether it drafts as measured
        ("measuring" until the first pairs are in), the pairs compared (a seeded load's count
        the neighbour's as its first ``pairs_min``), the steps measured (once a verdict stands, a
        pair completes only with a probe block, every ``probe_every`` blocks or more), drafting's
        measured gain in committed tokens a second, and the load it started from if seeded (for
        /health)."""
        out = {}
        for key, load in sorted(self._loads.items()):
            verdict = "measuring" if load.pairs < self.pairs_min else "drafts" if load.mean >= 0 else "drafts nothing"
            out[self._label(key)] = {"verdict": verdict, "pairs": load.pairs, "steps": load.steps, "gain": round(math.exp(load.mean) - 1.0, 3)}
            if load.seeded is not None:
                out[self._label(key)]["seeded_from"] = self._label(load.seeded)
        return out

    def observe(self, requests: int, tokens: int, seconds: float,
                forward: tuple[float, float] | None = None) -> None:
        """A step of `requests` requests ran as :meth:`allows` said and committed `tokens` in
        `seconds` of forward and own work; `forward`: (its forward's seconds, the seconds the
        batch's cost model expected of a forward of its rows). A step whose forward took more
        than ``disturbed`` times the expected is left out: the machine was busy elsewhere (served,
        a request's HTTP work beside the forward: 4 in flight, forwards of 4-8 rows ran 6.5-7.2 ms,
        and 14-25 ms while a request ended and the next arrived), and one such step in a block of
        four moved its pair's log ratio by 0.2-0.4, where drafting's real effect there was a few
        percent. Disturbances strike either kind of block, but a load's first pairs decide its
        verdict (served, 2 in flight, unfiltered: five pairs, a measured gain of -69%)."""
        if forward is not None and forward[0] > self.disturbed * forward[1]:
            return
        load = self._load(requests)
        load.steps += 1
        load.tokens += tokens
        load.seconds += seconds
        load.left -= 1
        if load.left > 0:
            return
        rate = load.tokens / load.seconds if load.seconds > 0 else 0.0
        if load.last is not None and load.last[0] != load.drafting and rate > 0 and load.last[1] > 0:
            on, off = (rate, load.last[1]) if load.drafting else (load.last[1], rate)
            d = math.log(on / off)
            load.pairs += 1
            load.mean += (d - load.mean) * max(self.weight, 1.0 / load.pairs)
        load.last = (load.drafting, rate)
        load.tokens, load.seconds, load.left = 0, 0.0, self.block
        if load.pairs < self.pairs_min:
            load.drafting = not load.drafting
            return
        pays = load.mean >= 0.0
        if load.drafting != pays:               # a probe block ended: back to the verdict
            load.drafting, load.since = pays, 0
            return
        load.since += 1
        # A verdict earns its long intervals with pairs: a mean of a few pairs can be a few
        # disturbed blocks' (2 in flight served: five pairs, -69%), and at |mean| / probe_cost
        # blocks between probes it would stand for thousands of steps.
        every = min(self.probe_every_most, self.probe_every * load.pairs / self.pairs_min,
                    max(self.probe_every, abs(load.mean) / self.probe_cost))
        if load.since >= every:
            load.drafting, load.since = not pays, 0
