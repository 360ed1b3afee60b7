"""The draft budget a step sends, from the verify cost curve (:mod:`decoding.cost`) and what
past steps of the same drafter accepted: :class:`AdaptiveBudget` per request,
:class:`SharedEstimates` per drafter."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Hashable, Sequence

from decoding.acceptance import NodeAcceptance
from decoding.cost import interpolate_cost
from decoding.per_owner import PerOwner
from decoding.tree import TokenTree


def pick_budget(cost: dict[int, float], tolerance: float = 1.25) -> int:
    """Largest measured n whose verify costs at most `tolerance` decode steps (at least 1)."""
    fits = [n for n, c in cost.items() if n > 0 and c <= tolerance]
    return max(fits) if fits else 1


def draft_sizes(cost: dict[int, float], soft=None) -> list[int]:
    """The tree sizes a request's adaptive budget chooses among: every size the cost curve
    measured; with soft verification (`soft`, a ``decoding.config.SoftGateConfig``) only those of at
    least its window W (all of them where none is that large).

    A soft acceptance is judged on the W - 1 draft tokens after the mismatch; a tree smaller than
    W ends that window early and leaves the verdict to the cosine stand-in alone. Measured on the
    AVX2 Zen 3 kind, whose steep curve makes the adaptive budget pick 1-3-node trees (GSM8K test
    questions 200-229, ID store, 128 tokens, side by side): soft over every size ran 1.29x over
    `ar` against 1.26x with sizes >= W, but the target's mean log-probability of its outputs fell
    0.032 nats a token below `ar`'s against 0.007 with sizes >= W (strict: 1.34x).
    """
    sizes = sorted(n for n in cost if n > 0)
    if soft is None:
        return sizes
    return [n for n in sizes if n >= soft.window] or sizes


class AdaptiveBudget:
    """Picks each step's draft budget b to maximise expected committed tokens per second:

        value(b) = (1 + A(b)) / (C(b) + D(b))        value(0) = 1 / (C(0) + D(0))

    in units of one plain decode step as the cost curve measured it. A(b): running mean of draft
    tokens accepted with budget b; C(b): running mean of the forward's measured time with budget b
    when the request verifies alone (``update``'s `forward_s`); for a budget not yet run that way,
    c(tree size) of the trees it yields (drafters often find fewer candidates than b) from the
    curve, times the ratio of measured to curve time at the nearest budget that was run (C(0) = 1
    times it). The curve is measured once, at a 256-token context, and on a shared VM it reads
    10-25% off from one measurement to the next; a request's own forwards price its tree sizes at
    its own context and at the machine's speed now. D(b): running mean of the step's own time
    outside the forward (drafting, the acceptance decision, KV compaction) for budget b. One
    verified tree of budget B tells A(b) for every b <= B (``TokenTree.accepted_within``), and
    the first estimate of every larger b when it has fewer nodes than B (all its drafter found). Estimates start optimistic
    (A(b) = b / 2, D = 0, replaced by the first observations; no size above ``draft_size`` is
    chosen on that prior), and every `explore_every` steps the budget one size above the current
    best is tried, so the choice can climb when drafts get better. When no budget beats a plain step, b = 0: the engine then skips drafting and runs at
    ``ar`` speed (but for the exploration steps). On a GPU c(n) is flat and large budgets win;
    on a CPU it climbs and small ones do, with the same code.

    A step verified alone refines the choice with the tree at hand: it drafts ``draft_size``
    nodes and verifies the prefix :meth:`cut` picks from each node's estimated chance of landing
    (``self.nodes``, a :class:`~decoding.acceptance.NodeAcceptance` shared like the estimates).
    """

    def __init__(self, cost: dict[int, float], *, sizes: Sequence[int] | None = None, decay: float = 0.95,
                 explore_every: int = 8, shared: SharedEstimates | None = None) -> None:
        """`cost`: seconds of a verification forward by draft size, 0 = a plain decode step (as
        :func:`cost_curve` measures it): the step's own drafting and commit time, in seconds, is
        weighed against it. A relative curve (c(0) = 1) would count those seconds as steps.
        `shared`: the estimates of earlier requests of the same drafter; this one starts from
        them and adds its own steps to them."""
        if 0 not in cost or cost[0] <= 0:
            raise ValueError("the cost curve needs c(0), the cost of a plain decode step")
        self.step_seconds = float(cost[0])
        self.cost = {n: c / cost[0] for n, c in cost.items()}
        self.sizes = sorted(set(sizes or [n for n in cost if n > 0]))
        self.decay = decay
        self.explore_every = explore_every
        self.accepted = {b: b / 2 for b in self.sizes}
        self.tree_cost = {b: interpolate_cost(self.cost, b) for b in self.sizes}
        self.seen = {b: 0 for b in self.sizes}
        self.overhead = {b: 0.0 for b in [0, *self.sizes]}
        self.overhead_seen = {b: 0 for b in self.overhead}
        self.forward = {b: 0.0 for b in self.overhead}          # measured C(b), in curve steps
        self.forward_seen = {b: 0 for b in self.overhead}
        self._run: list[int] = []               # the budgets with a measured C(b), ascending
        self._curve: dict[int, float] = {}      # c(n) of the curve by tree size (interpolate_cost)
        self._draft_size: int | None = None     # draft_size, once computed (the curve is fixed)
        self.steps = 0
        self._plain = 0                         # plain steps of a batch seen (see update)
        self._first = None                      # first_terms, until the estimates change
        self._overheads = None                  # overhead_of's table, until the estimates change
        # What a step drafted wide for a batch's cut realized (learn_wide): draft tokens
        # accepted, nodes the cut kept, the step's own seconds; a running mean, then an EMA.
        self.wide = (0.0, 0.0, 0.0)
        self.wide_seen = 0
        self.shared = shared
        self.nodes = shared.nodes if shared is not None else NodeAcceptance()
        self.start()

    def start(self) -> None:
        """Take up the shared estimates as they are now, if no step was counted yet: a request
        created with others (a burst) starts from what was learned until its own start."""
        if self.shared is not None and self.steps == 0:
            self._first = self._overheads = None
            self.shared.seed(self)
            self._run = sorted(b for b in self.forward if self.forward_seen[b])

    def curve(self, n: int) -> float:
        """c(n): the cost curve at a tree of n draft nodes, in decode steps (remembered: a step
        asks for a few dozen)."""
        c = self._curve.get(n)
        if c is None:
            c = self._curve[n] = interpolate_cost(self.cost, n)
        return c

    def expected_accepted(self, b: int) -> float:
        """A(b): draft tokens expected accepted with budget b (0 without a draft). A larger
        budget never accepts less (its tree contains the smaller one's)."""
        if b <= 0:
            return 0.0
        return max([self.accepted[s] for s in self.sizes if s <= b] or [0.0])

    def overhead_of(self, b: int) -> float:
        """D(b): the step's time outside the forward with budget b, in decode steps. A size not
        yet tried takes the nearest smaller tried size's (drafting more costs no less), so an
        untried budget does not look free and get tried for that alone; and no drafting size
        costs more than a larger tried one (the drafting is mostly per step, whatever its
        size: a size whose few steps ran slow, beside a server's other threads, kept reading
        4 ms where its neighbours read 1 and stopped the batch's ascent below it)."""
        table = self._overheads
        if table is None:
            table = self._overheads = self._overhead_table()
        if b in table:
            return table[b]
        tried = [s for s in table if s <= b]
        return table[max(tried)] if tried else 0.0

    def _overhead_table(self) -> dict[int, float]:
        table, last = {}, 0.0
        for b in [0, *self.sizes]:              # untried: the nearest smaller tried size's
            if self.overhead_seen[b]:
                last = self.overhead[b]
            table[b] = last
        low = float("inf")
        for b in reversed(self.sizes):          # no more than a larger tried size's
            if self.overhead_seen[b]:
                low = min(low, self.overhead[b])
            table[b] = min(table[b], low)
        return table

    def term(self, b: int) -> tuple[float, float]:
        """(1 + A(b), D(b) in seconds): what the batch allocation weighs for budget b."""
        return 1.0 + self.expected_accepted(b), self.overhead_of(b) * self.step_seconds

    @property
    def wide_ready(self) -> bool:
        """Whether a batch prices this request's drafting by what its wide steps realized
        (:meth:`learn_wide`) rather than by its sizes: the node model picks what the batch's cut
        keeps, and some wide step was seen."""
        return self.wide_seen > 0 and self.nodes.ready

    def first_terms(self) -> tuple[tuple[float, float], list[tuple[int, tuple[float, float], int]]]:
        """(term(0), [(size, term(size), rows)]): what a batch's allocation asks of a request
        that drafts nothing, every step; kept until an update or a seed changes the estimates.
        Once :attr:`wide_ready`, a single move: drafting (wide, the batch's cut deciding the
        rows), at what its wide steps realized, (1 + accepted, own seconds) and the nodes kept.
        Before, the smallest size and, if larger, the size :meth:`best` picks among the measured
        ones, each at its own rows."""
        t = self._first
        if t is None:
            if self.wide_ready:
                accepted, kept, own_s = self.wide
                moves = [(self.larger(0), (1.0 + accepted, own_s), round(kept))]
            else:
                moves = [(b, self.term(b), b) for b in sorted({self.larger(0), self.best(seen=True)} - {0})]
            t = self._first = (self.term(0), moves)
        return t

    def next_moves(self, b: int) -> list[tuple[int, tuple[float, float], int]]:
        """The moves of the batch's ascent from budget `b` > 0 (as :meth:`first_terms`): none for
        a request that drafts wide, else the size above `b`."""
        if self.wide_ready:
            return []
        nxt = self.larger(b)
        return [(nxt, self.term(nxt), nxt)] if nxt != b else []

    def learn_wide(self, accepted: int, kept: int, own_s: float) -> None:
        """Learn from a step that drafted wide and let the batch's cut (``decoding.scheduler.
        cut_budgets``) keep `kept` nodes, of which `accepted` landed, in `own_s` seconds of its
        own (drafting, acceptance, commit). The allocation prices drafting by these realized
        outcomes: the sizes' A(b) are learned from the trees the cut kept, and the cut keeps b
        nodes or more only of trees it trusts, so A(b) of the larger sizes overrates what
        allocating b yields (the cut decides the rows whatever b was), and the steps whose
        drafting the cut threw away priced no size at all. Interleaved in
        process (GSM8K, 8 in flight, the node model ready): SENSE/`ar` 0.965 (0.956-0.974 over
        four repeats) against 0.958 (0.902-0.964) priced by the sizes; 4 in flight 1.07 both."""
        self.wide_seen += 1
        rate = max(1.0 - self.decay, 1.0 / self.wide_seen)
        self.wide = _toward(self.wide, (accepted, kept, own_s), rate)
        self._first = None
        if self.shared is not None:
            self.shared.learn_wide((accepted, kept, own_s))

    def forward_of(self, b: int, nodes: int | None = None) -> float:
        """C(b): the forward's time with budget b, in decode steps of the curve (see the class);
        with `nodes`, of a tree of that many nodes drafted with budget b (not yet run: the curve
        at its size, scaled as an untried budget's is)."""
        if nodes is None and self.forward_seen.get(b):
            return self.forward[b]
        curve = (self.tree_cost[b] if nodes is None else self.curve(nodes)) if b else 1.0
        run = self._run
        if not run:
            return curve
        i = bisect.bisect_left(run, b)          # the nearest budget run, the smaller one of a tie
        near = run[i] if i == 0 or (i < len(run) and run[i] - b < b - run[i - 1]) else run[i - 1]
        return curve * self.forward[near] / (self.tree_cost[near] if near else 1.0)

    def value(self, b: int) -> float:
        if not b:
            return 1.0 / (self.forward_of(0) + self.overhead_of(0))
        return (1.0 + self.expected_accepted(b)) / (self.forward_of(b) + self.overhead_of(b))

    def best(self, seen: bool = False) -> int:
        """The budget of the largest ``value`` (the smallest of a tie), in one pass over the
        sizes; with `seen`, among the sizes whose acceptance some step measured (not a prior).
        A size above ``draft_size`` is never chosen on its prior alone: on a CPU's steep curve
        the optimistic prior made a new drafter's first tree the largest size (64 nodes, about
        4.5 decode steps) whatever its drafts; :meth:`explore` climbs to such sizes from
        ``draft_size`` once that size is best."""
        best_b, best_v = 0, self.value(0)
        accepted = float("-inf")
        cap = self.draft_size
        for b in self.sizes:                    # ascending: A(b) as expected_accepted gives it
            accepted = max(accepted, self.accepted[b])
            if not self.seen[b] and (seen or b > cap):
                continue
            v = (1.0 + accepted) / (self.forward_of(b) + self.overhead_of(b))
            if v > best_v:
                best_b, best_v = b, v
        return best_b

    def choose(self) -> int:
        return self.explore(self.best())

    def explore(self, best: int) -> int:
        """Count a step; every `explore_every`-th one returns the size above `best` instead."""
        self.steps += 1
        return self.larger(best) if self.steps % self.explore_every == 0 else best

    def larger(self, best: int) -> int:
        """The size one above `best` (`best` itself if it is the largest)."""
        return next((b for b in self.sizes if b > best), best)

    @property
    def draft_size(self) -> int:
        """The widest tree a step drafts for :meth:`cut` to choose from: the largest size whose
        verification costs at most 1.5 decode steps by the curve (at least the smallest size).
        Larger ones pay only when most of their tokens land, which the cut seldom foresees."""
        if self._draft_size is None:
            fits = [b for b in self.sizes if self.curve(b) <= 1.5]
            self._draft_size = max(fits) if fits else self.sizes[0]
        return self._draft_size

    def widen(self, budget: int) -> int:
        """The tree drafted when the step's budget is `budget` (> 0), for :meth:`cut` to cut:
        ``draft_size``, or `budget` when larger (an exploration step above it); `budget` itself
        while the node model is not ready (the cut would keep `budget`). Drafting only a size or
        two above `budget` measured no faster: the drafting time is mostly per step."""
        return max(budget, self.draft_size) if self.nodes.ready else budget

    def tree_terms(self, tree: TokenTree) -> dict[int, tuple[float, int]]:
        """{k: (1 + A_t(k), nodes kept)} for k = 0 and each size up to the first that keeps all of
        `tree`: A_t(k) = sum of P(on path) over the k best-ranked nodes, P from
        :class:`~decoding.acceptance.NodeAcceptance`'s estimate for each node of this very tree.
        What the tree at hand promises for each budget it could be cut to (:meth:`cut`, and the
        batch's ``decoding.scheduler.cut_budgets``)."""
        n = tree.n_draft
        out = {0: (1.0, 0)}
        if n == 0:
            return out
        p = self.nodes.on_path(tree)
        by_rank = [0.0] * n
        for i in range(1, len(tree)):
            by_rank[tree.ranks[i]] = p[i]
        accepted, taken = 0.0, 0
        for k in self.sizes:
            while taken < min(k, n):
                accepted += by_rank[taken]
                taken += 1
            out[k] = (1.0 + accepted, taken)
            if k >= n:
                break
        return out

    def cut(self, tree: TokenTree, budget: int) -> int:
        """This step's budget, knowing the tree drafted with `budget`: the size k (0, or one of
        the sizes) maximising

            (1 + A_t(k)) / (C(k) + D(budget))

        with A_t(k) as :meth:`tree_terms` estimates it. ``value`` weighs a budget's average
        acceptance over past steps; this weighs the candidates at hand, so a step whose
        retrievals agree drafts deep and one whose candidates are stray verifies the pending token
        alone. The drafting is already paid: D(budget) counts for every k, 0 included. Until the
        model has learned from ``NodeAcceptance.warm`` nodes (a drafter's first request or two)
        its guesses are its prior's, and the step keeps `budget`, the history's choice."""
        if tree.n_draft == 0:
            return 0
        if not self.nodes.ready:
            return budget
        d = self.overhead_of(budget)
        best_k, best = 0, 1.0 / (self.forward_of(0) + d)
        for k, (gain, taken) in self.tree_terms(tree).items():
            if k and gain / (self.forward_of(k, taken) + d) > best:
                best_k, best = k, gain / (self.forward_of(k, taken) + d)
        return best_k

    def update(self, tree: TokenTree, path: Sequence[int], budget: int, overhead_s: float | None = None,
               forward_s: float | None = None) -> None:
        """Learn from one verified tree drafted with `budget`; `overhead_s`: the step's seconds
        outside the verification forward (drafting and committing); `forward_s`: the seconds of
        the forward itself, when it verified this request's tree alone.

        A plain step of a batch (budget 0, nothing drafted, the forward shared) teaches D(0)
        only: one such step in `explore_every` is counted (a loaded batch runs them for every
        request, every step, and the bookkeeping is what speculation must not add at load)."""
        if budget == 0 and forward_s is None and not tree.n_draft:
            self._plain += 1
            if self._plain % self.explore_every:
                return
        self._first = self._overheads = None
        shared = self.shared
        self.nodes.learn(tree, path)
        if overhead_s is not None and budget in self.overhead:
            self.overhead_seen[budget] += 1
            rate = max(1.0 - self.decay, 1.0 / self.overhead_seen[budget])
            self.overhead[budget] += rate * (overhead_s / self.step_seconds - self.overhead[budget])
            if shared is not None:
                shared.learn_overhead(budget, overhead_s / self.step_seconds)
        if forward_s is not None and budget in self.forward:
            measured = forward_s / self.step_seconds
            self.forward_seen[budget] += 1
            if self.forward_seen[budget] == 1:
                bisect.insort(self._run, budget)
            rate = max(1.0 - self.decay, 1.0 / self.forward_seen[budget])
            self.forward[budget] += rate * (measured - self.forward[budget])
            if shared is not None:
                shared.learn_forward(budget, measured)
        # A tree of fewer nodes than its budget is all the drafter found (no chain reached the
        # budget's depth, nothing was cut): every larger budget would have drafted the same tree.
        # Its outcome gives the larger sizes no step has measured their first estimate (a drafter
        # whose candidates are few, as PLD's mostly are, learns every size from its first steps
        # instead of climbing to each); a measured size learns from its own steps only, since the
        # steps that exhaust their budget are the cheap ones, and only those would reach it.
        exhausted = 0 < tree.n_draft < budget
        for b in self.sizes:
            if b > budget:
                if not exhausted:
                    break
                if self.seen[b]:
                    continue
            rate = max(1.0 - self.decay, 1.0 / (self.seen[b] + 1))   # plain mean first, then EMA
            self.seen[b] += 1
            accepted = tree.accepted_within(path, b)
            c = self.curve(min(b, tree.n_draft))
            self.accepted[b] += rate * (accepted - self.accepted[b])
            self.tree_cost[b] += rate * (c - self.tree_cost[b])
            if shared is not None:
                shared.learn(b, accepted, c)


def _toward(mean: tuple, x: tuple, rate: float) -> tuple:
    """A running mean (or EMA) of tuples moved toward observation `x` by `rate`."""
    return tuple(m + rate * (v - m) for m, v in zip(mean, x))


class SharedEstimates:
    """What the steps of every request of one drafter taught about its budgets: A(b), C(b) and
    D(b) as :class:`AdaptiveBudget` keeps them, averaged over requests (an EMA over their steps).

    A new request's :class:`AdaptiveBudget` starts from these instead of its optimistic prior
    (A(b) = b / 2), which would make every request verify a ``draft_size`` tree first and then
    climb the sizes to learn what the requests before it already knew (before that cap, a CPU's
    first 64-node tree alone cost about 7 decode steps). The request's own steps then take over: the shared
    figures count as `carry` observations. Thread-safe (a decoder's requests run on threads).
    """

    def __init__(self, decay: float = 0.98, carry: int = 4) -> None:
        self.decay, self.carry = decay, carry
        self._lock = threading.Lock()
        self.accepted: dict[int, float] = {}
        self.tree_cost: dict[int, float] = {}
        self.seen: dict[int, int] = {}
        self.overhead: dict[int, float] = {}
        self.overhead_seen: dict[int, int] = {}
        self.forward: dict[int, float] = {}
        self.forward_seen: dict[int, int] = {}
        self.wide = (0.0, 0.0, 0.0)
        self.wide_seen = 0
        self.nodes = NodeAcceptance()           # the drafter's node acceptance model, one for all

    _LEARNED = ("accepted", "tree_cost", "seen", "overhead", "overhead_seen", "forward", "forward_seen")

    def snapshot(self) -> dict:
        """What these estimates have learned so far (for :meth:`restore`): a benchmark whose
        timed run the machine disturbed measures it again from the estimates before it, so the
        disturbed run's times teach nothing."""
        with self._lock:
            snap = {k: dict(getattr(self, k)) for k in self._LEARNED}
            snap.update(wide=self.wide, wide_seen=self.wide_seen, nodes=self.nodes.snapshot())
            return snap

    def restore(self, snap: dict) -> None:
        """Back to a :meth:`snapshot`."""
        with self._lock:
            for k in self._LEARNED:
                setattr(self, k, dict(snap[k]))
            self.wide, self.wide_seen = snap["wide"], snap["wide_seen"]
            self.nodes.restore(snap["nodes"])

    def seed(self, budget: AdaptiveBudget) -> None:
        with self._lock:
            for b in budget.sizes:
                if self.seen.get(b):
                    budget.accepted[b], budget.tree_cost[b] = self.accepted[b], self.tree_cost[b]
                    budget.seen[b] = min(self.seen[b], self.carry)
            for b in budget.overhead:
                if self.overhead_seen.get(b):
                    budget.overhead[b] = self.overhead[b]
                    budget.overhead_seen[b] = min(self.overhead_seen[b], self.carry)
                if self.forward_seen.get(b):
                    budget.forward[b] = self.forward[b]
                    budget.forward_seen[b] = min(self.forward_seen[b], self.carry)
            if self.wide_seen:
                budget.wide, budget.wide_seen = self.wide, min(self.wide_seen, self.carry)

    def _rate(self, seen: int) -> float:
        return max(1.0 - self.decay, 1.0 / seen)

    def learn(self, b: int, accepted: float, cost: float) -> None:
        with self._lock:
            n = self.seen[b] = self.seen.get(b, 0) + 1
            rate = self._rate(n)
            self.accepted[b] = self.accepted.get(b, 0.0) + rate * (accepted - self.accepted.get(b, 0.0))
            self.tree_cost[b] = self.tree_cost.get(b, 0.0) + rate * (cost - self.tree_cost.get(b, 0.0))

    def learn_overhead(self, b: int, steps: float) -> None:
        with self._lock:
            n = self.overhead_seen[b] = self.overhead_seen.get(b, 0) + 1
            self.overhead[b] = self.overhead.get(b, 0.0) + self._rate(n) * (steps - self.overhead.get(b, 0.0))

    wide_rate = 0.05        # the wide outcomes' EMA weight: new requests start from them (learn_wide)

    def learn_wide(self, outcome: tuple[float, float, float]) -> None:
        with self._lock:
            self.wide_seen += 1
            rate = max(self.wide_rate, 1.0 / self.wide_seen)
            self.wide = _toward(self.wide, outcome, rate)

    def learn_forward(self, b: int, steps: float) -> None:
        with self._lock:
            n = self.forward_seen[b] = self.forward_seen.get(b, 0) + 1
            self.forward[b] = self.forward.get(b, 0.0) + self._rate(n) * (steps - self.forward.get(b, 0.0))


_SHARED: PerOwner[SharedEstimates] = PerOwner(SharedEstimates)


def shared_estimates(owner: object, key: Hashable) -> SharedEstimates:
    """The :class:`SharedEstimates` of drafter `key` (e.g. its method and verifier) among the
    requests of `owner` (a target model, or a decoder): one per pair, kept while `owner` lives."""
    return _SHARED.get(owner, key)
