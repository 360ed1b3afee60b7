"""What a forward of the target costs on this machine: measured once, remembered, corrected.

c(n) = time of one verification forward with n draft tokens (plus the pending root) divided by
the time of a plain decode step (root only). On a GPU c(n) stays near 1 up to dozens of tokens;
on a CPU it climbs quickly, so the number of draft tokens worth sending differs by hardware.
:func:`cost_curve` is one request's curve (what ``budget="adaptive"`` plans with),
:func:`batch_cost` the batched forward's :class:`BatchCost` (what the batch scheduler allocates
with). The measurements take any :class:`Forwards`: a :class:`~decoding.target.TargetModel`
(which itself measures through this module when it chooses its dtype, so it is named here only
as the protocol of what is used).
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any, Protocol

from decoding.measured import machine, remembered
from decoding.tree import TokenTree


class Forwards(Protocol):
    """What the cost measurements use of a target (:class:`~decoding.target.TargetModel`)."""

    vocab_size: int
    context_window: int
    device: Any
    dtype: Any
    model_key: dict
    kernels: str

    def prefill(self, input_ids: Sequence[int], *, reuse: bool = ...) -> tuple[Any, Any]: ...
    def verify(self, state: Any, tree: TokenTree) -> Any: ...
    def verify_batch(self, states: Sequence[Any], trees: Sequence[TokenTree]) -> list: ...
    def commit(self, state: Any, path: Sequence[int]) -> None: ...


DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def measure_verify_cost(target: Forwards, sizes: Sequence[int] = DEFAULT_SIZES, *, context_len: int = 256,
                        repeats: int = 7, warmup: int = 2) -> dict[int, float]:
    """Median seconds of one verify forward for each tree size n (n draft tokens), and n=0.

    Sizes are interleaved within each repeat so that drift in machine load hits all alike.
    """
    vocab = target.vocab_size
    prompt = [(17 * i + 5) % vocab for i in range(context_len)]
    state, _ = target.prefill(prompt, reuse=False)
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


def cost_curve(target: Forwards, sizes: Sequence[int] = DEFAULT_SIZES) -> dict[int, float]:
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


# One request at every row count to 33 (the kernels' time is not smooth in the rows: a pass's row
# blocks change at 4, 9, 10 and 17 rows, and a 9- or 17-row forward ran faster than 8 or 16 on the
# Zen 5 EPYC, so a model interpolating between 9, 17 and 33 priced 10-32 rows too cheap and
# drafted at 16 in flight where nothing paid); then 48 and 64, and several requests at three sizes.
BATCH_POINTS = (*((1, e) for e in (*range(33), 47, 63)), *((r, e) for r in (2, 4, 8) for e in (0, 8, 32)))


def measure_batch_cost(target: Forwards, points: Sequence[tuple[int, int]] = BATCH_POINTS, *,
                       context_len: int = 256, repeats: int = 5, warmup: int = 2) -> list[list[float]]:
    """Median seconds of one batched verification forward (``verify_batch``) of R requests, each
    with its own `context_len`-token cache and a one-row tree but the first, whose tree has
    `extra` draft rows more, for each (R, extra) of `points`: [[R, T, seconds], ...] with
    T = R + extra rows. Points interleaved within each repeat, as :func:`measure_verify_cost` does.
    The `warmup` passes run only the largest point of each request count, which makes the
    allocations of the largest shapes; a full warm-up pass was a quarter of the measurement (47 s
    on one thread of the Zen 1 EPYC in float32), and a point whose first timing is still slow
    (a kernel tuned on first use) has it outvoted by the median."""
    vocab = target.vocab_size
    states = [target.prefill([(17 * i + 5 + 3 * r) % vocab for i in range(context_len)], reuse=False)[0]
              for r in range(max(r for r, _ in points))]
    times: dict[tuple[int, int], list[float]] = {p: [] for p in points}
    largest = [max((p for p in points if p[0] == r), key=lambda p: p[1]) for r in sorted({r for r, _ in points})]
    for rep in range(warmup + repeats):
        for r, e in (largest if rep < warmup else points):
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
    scheduler reports every forward of two requests or more it runs (:meth:`observe`): the measured
    over the modelled time of a forward of T rows is kept per T (a running mean, then an EMA), and
    :meth:`seconds` scales the model by the ratio around T: the ratios of the row counts seen,
    weighted by how many forwards each had (at most 1 / (1 - decay)) and by a kernel in log rows
    (width `smoothing`: 3 and 5 rows weigh 0.15 and 0.23 of 4's own), the nearest one's beyond
    them. The forwards the
    batch actually runs price it, the model gives the shape. A row count's own ratio alone was
    a trap on a busy VM: one forward of T rows slowed by another process priced T, and whatever
    needs T rows, too dear, so the allocation stopped asking for T and never corrected it (two
    requests in flight, in process: a forward of 8 rows priced above one of 12, and 4 rows at
    1.29x its neighbours' ratio). And the slow
    forwards are outliers (a core taken for a while), not a scale: a row count's ratio takes each
    forward's clipped to within `clip` of it (once it has 3), so it follows the typical forward
    and a drift (2.5% a forward at most), where the plain mean priced 10-12 rows 10-15% above the
    forwards the served batch ran."""

    decay = 0.9                  # EMA weight of the past, once a row count has 1 / (1 - decay) forwards
    smoothing = 0.15             # the ratio kernel's width, in log rows
    reach = math.exp(4 * smoothing)     # row counts further apart (a factor past it) weigh below e^-4: left out
    clip = 1.25                  # after a row count's first 3 forwards, each moves its ratio as at most this far

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
        self._smoothed: dict[int, float] = {}   # rows -> ratio(rows), until a forward near it is observed
        self._kernel: dict[tuple[int, int], float] = {}     # (rows, observed rows) -> the kernel's weight

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
        """Measured over modelled time of the forwards around `rows` rows run so far (see the
        class); 1.0 before any."""
        r = self._smoothed.get(rows)
        if r is not None:
            return r
        seen = self._observed
        if not seen:
            return 1.0
        t = max(rows, 1)
        lo, hi = bisect.bisect_left(seen, t / self.reach), bisect.bisect_right(seen, t * self.reach)
        if lo == hi:                                    # none near: the nearest one's (not kept)
            return self._ratio[min(seen, key=lambda s: (abs(math.log(s / t)), s))]
        r = self._smoothed[rows] = self._kernel_ratio(t, seen[lo:hi])
        return r

    def _kernel_ratio(self, rows: int, near: list[int]) -> float:
        cap, kernel, seen, ratio = 1.0 / (1.0 - self.decay), self._kernel, self._seen, self._ratio
        num = den = 0.0
        for t in near:
            k = kernel.get((rows, t))
            if k is None:       # a function of the two counts: computed once (a step asks again)
                k = kernel[rows, t] = math.exp(-abs(math.log(rows) - math.log(t)) / self.smoothing)
            w = k * min(seen[t], cap)
            num += w * ratio[t]
            den += w
        return num / den

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
            cur = self._ratio[rows]
            if n > 3:
                r = min(max(r, cur / self.clip), cur * self.clip)
            self._ratio[rows] = cur + max(1.0 - self.decay, 1.0 / n) * (r - cur)
        for t in [t for t in self._smoothed if rows / self.reach <= t <= rows * self.reach]:
            del self._smoothed[t]                       # the kept ratios whose kernel reaches `rows`


def batch_cost(target: Forwards) -> BatchCost:
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
