"""The verify cost curve c(n) and the draft budget it implies.

c(n) = time of one verification forward with n draft tokens (plus the pending root) divided by
the time of a plain decode step (root only). On a GPU c(n) stays near 1 up to dozens of tokens;
on a CPU it climbs quickly, so the number of draft tokens worth sending differs by hardware.
"""

from __future__ import annotations

import bisect
import statistics
import threading
import time
import weakref
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from decoding.acceptance import NodeAcceptance
from decoding.measured import machine, remembered
from decoding.tree import TokenTree

if TYPE_CHECKING:       # decoding.target loads models through decoding.dtype_choice, which imports this
    from decoding.target import TargetModel

DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def measure_verify_cost(target: TargetModel, sizes: Sequence[int] = DEFAULT_SIZES, *, context_len: int = 256,
                        repeats: int = 7, warmup: int = 2) -> dict[int, float]:
    """Median seconds of one verify forward for each tree size n (n draft tokens), and n=0.

    Sizes are interleaved within each repeat so that drift in machine load hits all alike.
    """
    vocab = target.vocab_size
    prompt = [(17 * i + 5) % vocab for i in range(context_len)]
    state, _ = target.prefill(prompt)
    trees = {n: TokenTree.chain(7 % vocab, [(101 + 13 * i) % vocab for i in range(n)]) for n in (0, *sizes)}
    times: dict[int, list[float]] = {n: [] for n in trees}
    for rep in range(warmup + repeats):
        for n, tree in trees.items():
            t0 = time.perf_counter()
            target.verify(state, tree)
            dt = time.perf_counter() - t0
            target.commit(state, [0])
            state.cache.crop(-1)            # drop the committed root again: same context every time
            state.n_committed -= 1
            if rep >= warmup:
                times[n].append(dt)
    return {n: statistics.median(ts) for n, ts in times.items()}


def cost_curve(target: "TargetModel", sizes: Sequence[int] = DEFAULT_SIZES) -> dict[int, float]:
    """The verify cost curve of `target` on this machine (seconds per forward by tree size):
    measured once per machine, model, dtype and thread count, then remembered on disk and on the
    target. This is what ``budget="adaptive"`` plans with."""
    memo = getattr(target, "_cost_curve", None)
    if memo is not None and memo[0] == tuple(sizes):
        return memo[1]
    # A small context window (test models) takes the sizes that fit beside a shorter context.
    fit = [n for n in sizes if 2 * n + 2 <= target.context_window] or [1]
    context = min(256, target.context_window - max(fit) - 2)
    key = {"machine": machine(target.device), "model": target.model_key, "dtype": str(target.dtype),
           "kernels": target.kernels, "sizes": fit, "context": context}
    stored, _ = remembered("cost", key, quiet=True, compute=lambda: {
        str(n): s for n, s in measure_verify_cost(target, fit, context_len=context, repeats=5, warmup=1).items()})
    curve = {int(n): s for n, s in stored.items()}
    target._cost_curve = (tuple(sizes), curve)
    return curve


def relative_cost(seconds: dict[int, float]) -> dict[int, float]:
    """c(n) = seconds[n] / seconds[0]."""
    base = seconds[0]
    return {n: s / base for n, s in sorted(seconds.items())}


def pick_budget(cost: dict[int, float], tolerance: float = 1.25) -> int:
    """Largest measured n whose verify costs at most `tolerance` decode steps (at least 1)."""
    fits = [n for n, c in cost.items() if n > 0 and c <= tolerance]
    return max(fits) if fits else 1


def interpolate_cost(cost: dict[int, float], n: int) -> float:
    """c(n) for any n from a measured curve: linear between points, linear beyond the last two."""
    pts = sorted(cost.items())
    if n <= pts[0][0]:
        return pts[0][1]
    for (n0, c0), (n1, c1) in zip(pts, pts[1:]):
        if n <= n1:
            return c0 + (c1 - c0) * (n - n0) / (n1 - n0)
    (n0, c0), (n1, c1) = pts[-2], pts[-1]
    return c1 + (c1 - c0) * (n - n1) / (n1 - n0)


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
    verified tree of budget B tells A(b) for every b <= B (``TokenTree.accepted_within``). Estimates start optimistic
    (A(b) = b / 2, D = 0, replaced by the first observations), and every `explore_every` steps
    the budget one size above the current best is tried, so the choice can climb when drafts get
    better. When no budget beats a plain step, b = 0: the engine then skips drafting and runs at
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
        self.steps = 0
        self.shared = shared
        self.nodes = shared.nodes if shared is not None else NodeAcceptance()
        self.start()

    def start(self) -> None:
        """Take up the shared estimates as they are now, if no step was counted yet: a request
        created with others (a burst) starts from what was learned until its own start."""
        if self.shared is not None and self.steps == 0:
            self.shared.seed(self)

    def expected_accepted(self, b: int) -> float:
        """A(b): draft tokens expected accepted with budget b (0 without a draft). A larger
        budget never accepts less (its tree contains the smaller one's)."""
        if b <= 0:
            return 0.0
        return max([self.accepted[s] for s in self.sizes if s <= b] or [0.0])

    def overhead_of(self, b: int) -> float:
        """D(b): the step's time outside the forward with budget b, in decode steps. A size not
        yet tried takes the nearest smaller tried size's (drafting more costs no less), so an
        untried budget does not look free and get tried for that alone."""
        if self.overhead_seen.get(b):
            return self.overhead[b]
        tried = [s for s in self.overhead if self.overhead_seen[s] and s <= b]
        return self.overhead[max(tried)] if tried else 0.0

    def terms(self) -> dict[int, tuple[float, float]]:
        """{x: (1 + A(x), D(x) in seconds)} for x = 0 and every size: what the batch allocation
        weighs, in one pass over the sizes (A's running maximum, D's nearest tried size below)."""
        step = self.step_seconds
        last_d = self.overhead[0] if self.overhead_seen[0] else 0.0
        out = {0: (1.0, last_d * step)}
        best_a = 0.0
        for b in self.sizes:
            best_a = max(best_a, self.accepted[b])
            if self.overhead_seen[b]:
                last_d = self.overhead[b]
            out[b] = (1.0 + best_a, last_d * step)
        return out

    def term(self, b: int) -> tuple[float, float]:
        """(1 + A(b), D(b) in seconds): one entry of :meth:`terms`."""
        return 1.0 + self.expected_accepted(b), self.overhead_of(b) * self.step_seconds

    def forward_of(self, b: int, nodes: int | None = None) -> float:
        """C(b): the forward's time with budget b, in decode steps of the curve (see the class);
        with `nodes`, of a tree of that many nodes drafted with budget b (not yet run: the curve
        at its size, scaled as an untried budget's is)."""
        if nodes is None and self.forward_seen.get(b):
            return self.forward[b]
        curve = (self.tree_cost[b] if nodes is None else interpolate_cost(self.cost, nodes)) if b else 1.0
        run = [s for s in self.forward if self.forward_seen[s]]
        if not run:
            return curve
        near = min(run, key=lambda s: (abs(s - b), s))
        return curve * self.forward[near] / (self.tree_cost[near] if near else 1.0)

    def value(self, b: int) -> float:
        if not b:
            return 1.0 / (self.forward_of(0) + self.overhead_of(0))
        return (1.0 + self.expected_accepted(b)) / (self.forward_of(b) + self.overhead_of(b))

    def best(self) -> int:
        return max([0, *self.sizes], key=self.value)

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
        fits = [b for b in self.sizes if interpolate_cost(self.cost, b) <= 1.5]
        return max(fits) if fits else self.sizes[0]

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
        the forward itself, when it verified this request's tree alone."""
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
            rate = max(1.0 - self.decay, 1.0 / self.forward_seen[budget])
            self.forward[budget] += rate * (measured - self.forward[budget])
            if shared is not None:
                shared.learn_forward(budget, measured)
        for b in self.sizes:
            if b > budget:
                break
            rate = max(1.0 - self.decay, 1.0 / (self.seen[b] + 1))   # plain mean first, then EMA
            self.seen[b] += 1
            accepted = tree.accepted_within(path, b)
            c = interpolate_cost(self.cost, min(b, tree.n_draft))
            self.accepted[b] += rate * (accepted - self.accepted[b])
            self.tree_cost[b] += rate * (c - self.tree_cost[b])
            if shared is not None:
                shared.learn(b, accepted, c)


BATCH_POINTS = (*((1, e) for e in (0, 2, 4, 8, 16, 32, 64)), *((r, e) for r in (2, 4, 8) for e in (0, 8, 32)))


def measure_batch_cost(target: TargetModel, points: Sequence[tuple[int, int]] = BATCH_POINTS, *,
                       context_len: int = 256, repeats: int = 5, warmup: int = 2) -> list[list[float]]:
    """Median seconds of one batched verification forward (``verify_batch``) of R requests, each
    with its own `context_len`-token cache and a one-row tree but the first, whose tree has
    `extra` draft rows more, for each (R, extra) of `points`: [[R, T, seconds], ...] with
    T = R + extra rows. Points interleaved within each repeat, as :func:`measure_verify_cost` does."""
    vocab = target.vocab_size
    states = [target.prefill([(17 * i + 5 + 3 * r) % vocab for i in range(context_len)])[0]
              for r in range(max(r for r, _ in points))]
    times: dict[tuple[int, int], list[float]] = {p: [] for p in points}
    for rep in range(warmup + repeats):
        for r, e in points:
            trees = [TokenTree.chain(7 % vocab, [(101 + 13 * i) % vocab for i in range(e if j == 0 else 0)])
                     for j in range(r)]
            t0 = time.perf_counter()
            target.verify_batch(states[:r], trees)
            dt = time.perf_counter() - t0
            for state in states[:r]:
                target.commit(state, [0])
                state.cache.crop(-1)
                state.n_committed -= 1
            if rep >= warmup:
                times[(r, e)].append(dt)
    return [[r, r + e, statistics.median(times[(r, e)])] for r, e in points]


class BatchCost:
    """Seconds of one batched verification forward of R requests and T rows in all:

        C(R, T) = f(T) + b (R - 1)

    f: one request's forward of T rows, interpolated piecewise linearly between the measured
    one-request points (made non-decreasing; beyond the last point, its last segment's slope);
    b: what each further request adds (its own attention over its own cache, its own lengths),
    fitted by least squares to the other points' excess over f, never below 0. On a CPU the rows
    price the forward: f is flat to about 8 rows, then about 1 ms a row (2-core AVX512-BF16 VM,
    bfloat16), and a request adds well under a millisecond; a straight line in T (as this model
    was before) priced 2 requests of 9 rows at 30 ms against 22 measured, so the allocation
    drafted too little. Never falls with more requests or rows.

    The measurement is taken once per machine and remembered; a shared VM can read it 10-100% off
    (another process on a core during it), and then every later process would plan with it. So the
    scheduler reports every forward it runs (:meth:`observe`): the measured over the modelled time
    of a forward of T rows is kept per T (a running mean, then an EMA), and :meth:`seconds` scales
    the model by that ratio at T (interpolated between the row counts seen, the nearest one's
    beyond them): the forwards the batch actually runs price it, the model gives the shape."""

    decay = 0.9                  # EMA weight of the past, once a row count has 1 / (1 - decay) forwards

    def __init__(self, points: Sequence[Sequence[float]]) -> None:
        import numpy as np

        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ValueError("BatchCost needs [requests, rows, seconds] points")
        one = pts[pts[:, 0] == 1]
        rows = np.unique(one[:, 1])
        many = pts[pts[:, 0] > 1]
        if len(rows) < 2 or not len(many):
            raise ValueError("BatchCost needs one-request points at 2 row counts or more and a point of "
                             "several requests")
        secs = np.maximum.accumulate([np.median(one[one[:, 1] == t, 2]) for t in rows])
        self._rows, self._secs = [float(x) for x in rows], [float(y) for y in secs]
        self.slope = max(0.0, (self._secs[-1] - self._secs[-2]) / (self._rows[-1] - self._rows[-2]))
        extra = many[:, 0] - 1
        excess = many[:, 2] - np.array([self.one(t) for t in many[:, 1]])
        self.per_request = max(0.0, float(extra @ excess / (extra @ extra)))
        self._ratio: dict[int, float] = {}      # rows -> measured / modelled seconds (see observe)
        self._seen: dict[int, int] = {}
        self._observed: list[int] = []          # the row counts seen, sorted

    def one(self, rows: float) -> float:
        """f(T): one request's forward of `rows` rows (plain Python: the allocation asks for
        a few dozen of these a step)."""
        xs, ys = self._rows, self._secs
        if rows >= xs[-1]:
            return ys[-1] + self.slope * (rows - xs[-1])
        if rows <= xs[0]:
            return ys[0]
        i = bisect.bisect_right(xs, rows)
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (rows - xs[i - 1]) / (xs[i] - xs[i - 1])

    def modelled(self, requests: int, rows: int) -> float:
        """C(R, T) as measured once, without what :meth:`observe` taught."""
        return max(1e-6, self.one(rows) + self.per_request * (requests - 1))

    def seconds(self, requests: int, rows: int) -> float:
        return self.modelled(requests, rows) * self.ratio(rows)

    def ratio(self, rows: int) -> float:
        """Measured over modelled time of the forwards of `rows` rows run so far; between row
        counts run, interpolated; beyond them, the nearest one's (1.0 before any)."""
        seen = self._observed
        if not seen:
            return 1.0
        r = self._ratio.get(rows)
        if r is not None:
            return r
        i = bisect.bisect_left(seen, rows)
        if i == 0 or i == len(seen):
            return self._ratio[seen[min(i, len(seen) - 1)]]
        lo, hi = seen[i - 1], seen[i]
        return self._ratio[lo] + (self._ratio[hi] - self._ratio[lo]) * (rows - lo) / (hi - lo)

    def observe(self, requests: int, rows: int, seconds: float) -> None:
        """One forward the batch ran: `requests` requests, `rows` rows in all, `seconds` long."""
        if requests < 1 or rows < requests or not seconds > 0:
            return
        r = seconds / self.modelled(requests, rows)
        n = self._seen.get(rows, 0) + 1
        self._seen[rows] = n
        if n == 1:
            self._ratio[rows] = r
            bisect.insort(self._observed, rows)
        else:
            self._ratio[rows] += max(1.0 - self.decay, 1.0 / n) * (r - self._ratio[rows])


def batch_cost(target: "TargetModel") -> BatchCost:
    """The batched forward cost model of `target` on this machine: measured once per machine,
    model, dtype and thread count, then remembered on disk and on the target (as
    :func:`cost_curve`). What the batch scheduler allocates draft budgets with."""
    memo = getattr(target, "_batch_cost", None)
    if memo is not None:
        return memo
    limit = target.context_window // 2
    points = [(r, e) for r, e in BATCH_POINTS if e + r + 1 <= limit]
    if len({e for r, e in points if r == 1}) < 2:
        points = [(1, 0), (1, 1), (2, 0)]
    context = min(256, target.context_window - max(r + e for r, e in points) - 2)
    key = {"machine": machine(target.device), "model": target.model_key, "dtype": str(target.dtype),
           "kernels": target.kernels, "points": points, "context": context}
    stored, _ = remembered("batch_cost", key, quiet=True, compute=lambda: {
        "points": measure_batch_cost(target, points, context_len=context, repeats=3, warmup=1)})
    model = BatchCost(stored["points"])
    target._batch_cost = model
    return model


class SharedEstimates:
    """What the steps of every request of one drafter taught about its budgets: A(b), C(b) and
    D(b) as :class:`AdaptiveBudget` keeps them, averaged over requests (an EMA over their steps).

    A new request's :class:`AdaptiveBudget` starts from these instead of its optimistic prior
    (A(b) = b / 2), which would make every request verify the largest tree once and then climb
    the sizes to learn what the requests before it already knew: on a CPU the first 64-node
    tree alone costs about 7 decode steps. The request's own steps then take over: the shared
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
        self.nodes = NodeAcceptance()           # the drafter's node acceptance model, one for all

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

    def learn_forward(self, b: int, steps: float) -> None:
        with self._lock:
            n = self.forward_seen[b] = self.forward_seen.get(b, 0) + 1
            self.forward[b] = self.forward.get(b, 0.0) + self._rate(n) * (steps - self.forward.get(b, 0.0))


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def shared_estimates(owner: object, key: Hashable) -> SharedEstimates:
    """The :class:`SharedEstimates` of drafter `key` (e.g. its method and verifier) among the
    requests of `owner` (a target model, or a decoder): one per pair, kept while `owner` lives."""
    with _SHARED_LOCK:
        table = _SHARED.setdefault(owner, {})
        if key not in table:
            table[key] = SharedEstimates()
        return table[key]
