"""Continuous batching: the speculative steps of many requests share one verification forward.

Each :meth:`BatchScheduler.step`:

1. requests cancelled since the last step end (``should_stop``);
2. waiting requests are prefilled, each in forwards of its own (so its prefill does not depend
   on what else runs). While requests are running, a step prefills at most
   max(``prefill_prompts``, ceil(waiting / L)) prompts, L the running mean of the steps the
   requests that ended took (their answers' lifetime; until one ends, ``prefill_prompts``),
   whose positions run total at most ``prefill_tokens`` (what a prompt takes from the prefix
   cache is not run); a prompt longer than the budget left runs in pieces of the budget, a step
   at a time (``Sequence.start(rows)``; with the prefix cache's invariant prefill the pieces
   give its prefill bitwise), before any other waiting request starts. So the running requests
   wait for about ``prefill_tokens`` positions of prefill a step, however long a prompt arrives.
   The starts of the waiting requests spread over about one answer's time (where answers are
   long, one a step), because requests prefilled in one step stay together: where their
   answers are of one length (and at a load that drafts nothing) they end in one step, their
   clients come back together, and the clusters only grow, each wave's last request waiting for
   all the wave's prefills. Started apart, they end apart (served, 16 clients, 64-token
   answers, `ar` and SENSE, clients staggered or starting at once, alternating runs: p99 time to
   first token of the requests after each client's first 225-459 ms one a step, against
   405-768 ms with up to 64 prompts a step, and 380-686 ms with ceil(waiting / running) a step,
   which keeps an opening burst's clusters; p50 148-214 against 164-431 ms). The price, on 2
   cores: requests apart turn over apart, each answer's HTTP work beside a forward, where waves
   turned over together; tokens/s of `ar` 0.94x, of SENSE 0.99x (means of 8 paired runs).
   Spread over an answer's time, not
   one a step whatever the answers: in process, 96 queued requests with answers of 2-10
   tokens, a batch of 16, one a step ran 5.8 rows a forward and 88 steps, up to 64 a step 13.1
   and 39, ceil(waiting / L) 12.1 and 42. With nothing running nobody is delayed, and every waiting
   request is prefilled whole (up to the batch limit). Each emits its first token as its
   prefill ends, so time to first token is the prefills ahead of it, not a verification step
   per request ahead of it;
3. every running request drafts within the budget the batch allocation gives it
   (:func:`allocate_budgets`, from what past steps taught: whether drafting pays for it at this
   load), unless the batch's :class:`~decoding.gate.DraftingGate` has measured that at this load
   drafting nothing commits more tokens a second (it then runs one block of steps in several
   that allocate, to follow changes); those that draft draft wide, and :func:`cut_budgets`
   keeps of their trees the nodes most likely to land for the rows the forward has to spare;
   all the trees are verified in one forward (``TargetModel.verify_batch``), and each request
   accepts, commits and emits its tokens.

A request's output is the same whatever shares its batch: the lean forward runs every row on the
batch-invariant kernels and each request attends to its own KV cache only, so its logits are
bitwise those of its forward alone; sampling draws from each request's own generator.
``decoding.engine.generate`` is the batch of one of the same :class:`~decoding.engine.Sequence`
steps.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Hashable, Sequence as Seq

from decoding.compute_thread import ComputeThread
from decoding.cost import BatchCost, batch_cost, interpolate_cost
from decoding.engine import GenerationResult, Sequence
from decoding.gate import DraftingGate
from decoding.per_owner import PerOwner
from decoding.tree import TokenTree


# What a request's first draft size must promise beyond drafting nothing (allocate_budgets):
# 2% of the batch's committed tokens a step, at most a quarter of a token.
START_SHARE, START_TOKENS = 0.02, 0.25


def allocate_budgets(seqs: Seq[Sequence], batch_cost: BatchCost | None = None, explore: bool = True,
                     start: tuple[float, float] | None = None) -> list[int]:
    """Each running request's draft budget for this step, chosen for the batch's goodput.

    Objective: expected committed tokens of the whole batch per second of its step,

        G(b) = sum_i (1 + A_i(b_i)) / (C(R, T) + sum_i D_i(b_i)),    T = sum_i (1 + b_i) rows,

    where A_i(b) is request i's running estimate of the draft tokens accepted with budget b (its
    ``AdaptiveBudget``), C(R, T) the cost of a forward of the R requests with T rows in all (the
    scheduler's :class:`~decoding.cost.BatchCost`, measured once per machine and corrected by the
    forwards the scheduler runs; without one,
    the single-request verify cost curve at T - 1 draft tokens) and D_i(b) request i's measured
    time outside the forward (drafting, acceptance, commit) with budget b. A request whose node
    model is ready drafts wide and the batch's cut (:func:`cut_budgets`) decides its rows
    whatever b was: its choice is to draft or not, priced by what its wide steps realized
    (``AdaptiveBudget.learn_wide``: tokens accepted, nodes kept, own time), with b_i standing
    for the nodes they kept.

    Greedy ascent: from all budgets 0, raise the budget of the request whose next size increases G
    most, until none does; a request that drafts nothing yet may also start at the size it would
    pick alone among those it has measured (``AdaptiveBudget.best``): drafting has a fixed cost
    (the retrieval), so the first size alone can fail to pay where a larger one pays by far
    (served, 2 in flight: D(1) ~1 ms beside the server's threads, A(1) ~0.45; runs whose ascent
    stopped there drafted 4 rows a forward and read 1.06x `ar`, others 1.37x). A request that
    drafts nothing yet starts only if its size pays with fewer tokens accepted than estimated:
    `start` = (share, tokens) takes min(tokens, share x the batch's committed tokens a step) off
    its estimate (default: 2%, at most a quarter token). The estimates are noisy and the ascent
    takes the request whose estimate promises most (over a batch, the one most likely overrated); a
    step that drafts pays for work no term prices (the cut, the retrieval's cache misses, the rows
    the cut keeps beyond the size allocated). Measured in process (GSM8K prompts, SENSE/`ar`,
    interleaved runs): 8 in flight 0.946 without it, 0.970 with 2%, 0.974 with 3%; 4 in flight
    1.24, 1.23 and 1.15. At most a quarter token: at 32 in flight 2% would be most of a token,
    which a request's draft seldom promises even where drafting pays (a GPU, a large model). A
    cheap forward (a GPU, a flat curve) lets every request draft; at high load C(T) climbs and the
    allocation drafts less or nothing, so speculation does not cost throughput. Requests with a
    fixed integer budget keep it. Exploration, so that estimates of larger budgets stay current:
    with `explore`, each adaptive request drafts one size above its allocation every
    ``explore_every``-th call of its own (``AdaptiveBudget.explore``); a batch scheduler passes
    False and lets one request at a time explore (:class:`Exploration`).

    With one request this is exactly its own adaptive choice (``AdaptiveBudget.choose``), the
    single-request engine's.
    """
    if len(seqs) == 1:
        return [seqs[0].choose_budget()]
    budgets = [0 if s.adaptive else s.budget for s in seqs]
    adaptive = [i for i, s in enumerate(seqs) if s.adaptive]
    if not adaptive:
        return budgets
    forward_s = _memo(_forward_seconds(len(seqs), seqs[adaptive[0]].adaptive, batch_cost))

    # Each adaptive request's terms (1 + A_i(x), D_i(x) in seconds) at its size now and at the
    # sizes it may move to, as the ascent weighs them. D_i is the request's own work in the step
    # (drafting, acceptance, KV compaction), run one request after another beside the shared
    # forward. A fixed budget's term never changes, so its guess of x / 2 accepted moves no
    # choice. At load the ascent stops at its first pass (no request's size pays): two or three
    # terms a request, kept until its estimates change (``AdaptiveBudget.first_terms``), in plain
    # lists (this runs every step, after a forward has flushed the CPU's caches).
    est = [seqs[i].adaptive for i in adaptive]
    first = [a.first_terms() for a in est]
    now_terms = [f[0] for f in first]
    moves = [f[1] for f in first]           # [(size, its term, its rows)] a request may move to
    now_rows = [0] * len(adaptive)
    gain = sum(1.0 + s.budget / 2 for s in seqs if not s.adaptive) + sum(g for g, _ in now_terms)
    own = sum(d for _, d in now_terms)
    rows = sum(1 + x for x in budgets)
    share, tokens = start or (START_SHARE, START_TOKENS)
    handicap = min(tokens, share * gain)
    best = gain / (forward_s(rows) + own)
    while True:
        choice = None
        for j, i in enumerate(adaptive):
            now = budgets[i]
            g0, o0 = now_terms[j]
            for x, (g1, o1), r1 in moves[j]:
                time_s = forward_s(rows - now_rows[j] + r1) + own - o0 + o1
                g = (gain - g0 + g1) / time_s
                score = g if now else (gain - g0 + g1 - handicap) / time_s
                if score > best and (choice is None or score > choice[0]):
                    choice = (score, g, j, x, (g1, o1), r1)
        if choice is None:
            break
        _, best, j, x, (g1, o1), r1 = choice
        i = adaptive[j]
        g0, o0 = now_terms[j]
        gain, own, rows = gain - g0 + g1, own - o0 + o1, rows - now_rows[j] + r1
        budgets[i], now_terms[j], now_rows[j] = x, (g1, o1), r1
        moves[j] = est[j].next_moves(x)
    if explore:
        for i in adaptive:
            budgets[i] = seqs[i].adaptive.explore(budgets[i])
    return budgets


class Exploration:
    """Which request of a batch explores (drafts one size above its allocation) at each step:
    one request in turn every `gap` steps. One exploring request serves the batch (requests of
    one drafter share what they learn); each exploring every ``explore_every``-th step of its own
    would put an extra row in every forward of a batch of eight. The gap starts at the
    requests' ``explore_every``; each exploration at a step whose allocation drafts nothing
    doubles it, up to `longest` times that but no more times than the batch has adaptive
    requests, and a step whose allocation drafts resets it. So where drafts pay the batch explores
    as often as a request alone, and where they do not it tests them ever more rarely (in process,
    8 in flight, drafting nothing: a test every 8th step cost 1.2% of the batch's time, a SENSE
    retrieval about 1 ms each time), while each request is still tested within a few answers'
    steps: two requests in flight that stopped drafting on a pessimistic estimate explored one
    every 64 steps, each once per 128, longer than a 64-token answer, and the estimate never
    recovered (served, 2 in flight: runs that drafted 2.8 rows a forward, 1.00x `ar`, beside runs
    of 7-15 rows and 1.2-1.5x)."""

    longest = 8

    def __init__(self) -> None:
        self.gap: int | None = None     # steps between explorations now
        self.wait = 0                   # steps until the next one
        self.turn = 0

    def pick(self, seqs: Seq[Sequence], drafting: bool) -> int | None:
        """The index of the request that explores this step, or None; `drafting`: whether this
        step's allocation gives any request a budget above 0."""
        adaptive = [i for i, s in enumerate(seqs) if s.adaptive]
        if not adaptive:
            return None
        base = seqs[adaptive[0]].adaptive.explore_every
        if self.gap is None or drafting:
            self.wait = base if self.gap is None else min(self.wait, base)
            self.gap = base
        self.wait -= 1
        if self.wait > 0:
            return None
        self.turn += 1
        if not drafting:
            self.gap = min(2 * self.gap, min(self.longest, len(adaptive)) * base)
        self.wait = self.gap
        return adaptive[self.turn % len(adaptive)]


def _memo(fn):
    """`fn` of one argument, each value computed once (within one allocation)."""
    values: dict = {}

    def get(x):
        v = values.get(x)
        if v is None:
            v = values[x] = fn(x)
        return v
    return get


def _forward_seconds(requests: int, budget, batch_cost: BatchCost | None):
    """rows -> seconds of a forward of `requests` requests: `batch_cost`, or without one the
    single-request curve of `budget` (an ``AdaptiveBudget``) at rows - 1 draft tokens."""
    if batch_cost is not None:
        return lambda rows: batch_cost.seconds(requests, rows)
    return lambda rows: budget.step_seconds * interpolate_cost(budget.cost, rows - 1)


def cut_budgets(seqs: Seq[Sequence], trees: Seq[TokenTree | None], budgets: Seq[int],
                batch_cost: BatchCost | None = None, wide: Seq[bool] | None = None) -> list[int | None]:
    """The budget each request keeps of the tree it drafted this step (``Sequence.keep``), the
    batch's counterpart of ``AdaptiveBudget.cut``: the same objective as :func:`allocate_budgets`,

        G(k) = sum_i (1 + A_i(k_i)) / (C(R, T) + sum_i D_i),    T = sum_i (1 + n_i(k_i)) rows,

    but with A_i(k) = sum of P(on path) over the k best-ranked nodes of request i's tree at hand
    (``AdaptiveBudget.tree_terms``; n_i(k): the nodes kept) for the requests that drafted wide (an
    adaptive budget above 0 from the allocation, a ready node model); the others keep their trees
    and their terms. The drafting is paid, so D_i is fixed. Ascent from every such request
    keeping nothing: raise the k of the request, to whichever of its sizes, that increases G
    most, until none does. So the rows of a loaded forward go to the nodes most likely to land,
    whichever request drafted them; a request whose candidates are strays this step verifies
    its pending token alone. None for a request whose tree stays as drafted (a grammar's forced
    tokens stay whole: each one lands). `wide`: which requests drafted wide (default: every one
    with an adaptive budget above 0)."""
    keep: list[int | None] = [None] * len(seqs)
    wide = {i for i, (s, t, b) in enumerate(zip(seqs, trees, budgets))
            if t is not None and not s.done and s.adaptive and b > 0 and s.adaptive.nodes.ready
            and (wide is None or wide[i]) and not s.forced}
    if not wide:
        return keep
    forward_s = _forward_seconds(sum(t is not None and not s.done for s, t in zip(seqs, trees)),
                                 seqs[min(wide)].adaptive, batch_cost)
    terms = {}
    gain = own = 0.0
    rows = 0
    for i, (s, t, b) in enumerate(zip(seqs, trees, budgets)):
        if t is None or s.done:
            continue
        g, d = s.adaptive.term(b) if s.adaptive else (1.0 + b / 2, 0.0)
        if i in wide and s.adaptive.wide_ready:
            d = s.adaptive.wide[2]
        own += d
        if i in wide:
            terms[i] = s.adaptive.tree_terms(t)
            keep[i] = 0
            g = 1.0
        gain += g
        rows += 1 + (0 if i in wide else t.n_draft)
    best = gain / (forward_s(rows) + own)
    while True:
        choice = None
        for i, options in terms.items():
            g0, n0 = options[keep[i]]
            for k, (g1, n1) in options.items():
                if k <= keep[i]:
                    continue
                v = (gain - g0 + g1) / (forward_s(rows - n0 + n1) + own)
                if v > best and (choice is None or v > choice[0]):
                    choice = (v, i, k)
        if choice is None:
            return keep
        best, i, k = choice
        (g0, n0), (g1, n1) = terms[i][keep[i]], terms[i][k]
        gain, rows, keep[i] = gain - g0 + g1, rows - n0 + n1, k


class BatchScheduler:
    """Runs :class:`~decoding.engine.Sequence` requests of one target in shared forwards; add
    them at any time, drive it with :meth:`step` (or :meth:`run` until all are done)."""

    def __init__(self, target, *, max_batch: int = 16, prefill_tokens: int = 256, prefill_prompts: int = 1) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if prefill_tokens < 1:
            raise ValueError("prefill_tokens must be at least 1")
        if prefill_prompts < 1:
            raise ValueError("prefill_prompts must be at least 1")
        self.target = target
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.prefill_prompts = prefill_prompts
        self.waiting: deque[Sequence] = deque()
        self.prefilling: Sequence | None = None             # a prompt being prefilled a piece a step
        self.running: list[Sequence] = []
        self.forwards = 0               # verification forwards run
        self.rows = 0                   # tree nodes verified in them
        self.last_forward: tuple[int, int] | None = None    # (requests, rows) of the last step's forward
        self.last_prefills = 0          # requests prefilled in the last step
        self.batch_cost: BatchCost | None = None            # cost.batch_cost; every forward observed
        self.steps = 0                  # steps with running requests
        self.lifetime: float | None = None  # mean steps of the requests that ended (a running mean)
        self.lifetime_weight = 0.125    # an ended request's weight in it
        self.exploration = Exploration()
        self.gate: DraftingGate | None = DraftingGate()     # whether a load drafts at all, measured
        self.reallocate_every = 4       # steps an allocation that drafts nothing is kept (_allocate)
        self._held: tuple[list[int], int] | None = None     # (the requests' serials, the step) of that allocation
        self.forward_s = 0.0            # seconds in the verification forwards
        self.own_s = 0.0                # seconds in the requests' own work: drafting, acceptance, commit

    def add(self, seq: Sequence) -> None:
        if seq.target is not self.target:
            raise ValueError("the request was made for another target model")
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        return not self.waiting and self.prefilling is None and not self.running

    def step(self) -> list[Sequence]:
        """One scheduling step; returns the requests that finished in it. A request whose own
        work fails (its prefill, drafter or verifier) ends with ``seq.error`` set and the others
        go on; a failure of the shared forward ends every request in it."""
        finished = [s for s in (self.prefilling, *self.running) if s is not None and s.cancelled()]
        if self.prefilling is not None and self.prefilling.done:
            self.prefilling = None
        self.running = [s for s in self.running if not s.done]
        self.last_forward = None
        self.last_prefills = 0
        delaying, prefilled, prompts = bool(self.running), 0, 0
        most = max(self.prefill_prompts, math.ceil(len(self.waiting) / self.lifetime) if self.lifetime else 0)

        def prefill(seq: Sequence) -> bool:
            """A piece of `seq`'s prefill within what is left of the step's budget; whether it is
            in (started, or ended) and out of the prefill queue."""
            nonlocal prefilled, prompts
            prompts += 1
            prefilled += _guarded(seq, seq.start, self.prefill_tokens - prefilled if delaying else None) or 0
            if not (seq.started or seq.done):
                return False
            self.last_prefills += 1
            (finished if seq.done else self.running).append(seq)
            return True

        # A prompt begun in an earlier step goes on first (only one is ever part-prefilled: no
        # other starts while it is).
        if self.prefilling is not None and prefill(self.prefilling):
            self.prefilling = None
        while self.prefilling is None and self.waiting and len(self.running) < self.max_batch:
            if delaying and prefilled and (
                    prompts >= most
                    or prefilled + self.target.prefill_rows(self.waiting[0].prompt_ids) > self.prefill_tokens):
                break               # the running requests have waited for enough prefill this step
            seq = self.waiting.popleft()
            if seq.cancelled():
                finished.append(seq)
            elif not prefill(seq):
                self.prefilling = seq           # longer than the budget left: goes on next step
        if self.running:
            if self.batch_cost is None and len(self.running) > 1 and any(s.adaptive for s in self.running):
                self.batch_cost = batch_cost(self.target)
            self.steps += 1
            n = len(self.running)
            gated = n > 1 and self.gate is not None and any(s.adaptive for s in self.running)
            drafting = not gated or self.gate.allows(n)
            t_step = time.perf_counter()
            budgets = self._allocate() if drafting else [0 if s.adaptive else s.budget for s in self.running]
            t_own = time.perf_counter()
            if n == 1:
                trees = [_guarded(self.running[0], self.running[0].propose, budgets[0], True)]
            else:
                # An exploring request whose allocation was 0 tests whether drafting pays at this
                # load: once its node model is ready, as a drafting request would draft (wide,
                # the cut deciding its rows: the outcome its allocation weighs); before, the
                # smallest size and no wider, the test at its least cost.
                e = self.exploration.pick(self.running, any(budgets)) if drafting else None
                wide = [True] * len(budgets)
                if e is not None:
                    wide[e] = budgets[e] > 0 or self.running[e].adaptive.nodes.ready
                    budgets[e] = self.running[e].adaptive.larger(budgets[e])
                trees = [_guarded(s, s.propose, b, False, w) for s, b, w in zip(self.running, budgets, wide)]
                keep = cut_budgets(self.running, trees, budgets, self.batch_cost, wide)
                trees = [t if k is None else s.keep(t, k) for s, t, k in zip(self.running, trees, keep)]
            batch = [(s, t) for s, t in zip(self.running, trees) if not s.done]
            if batch:
                t0 = time.perf_counter()
                self.own_s += t0 - t_own
                try:
                    outs = self.target.verify_batch([s.state for s, _ in batch], [t for _, t in batch])
                except Exception as exc:
                    for s, _ in batch:
                        s.fail(exc)
                else:
                    rows = sum(len(t) for _, t in batch)
                    self.target.synchronize()
                    t1 = time.perf_counter()
                    # The forwards of two requests or more price the allocation. A lone request's
                    # prices its own budget (AdaptiveBudget's forward time); in a server it runs as
                    # one request ends and the next arrives, beside their HTTP and tokenizing work:
                    # served at 2 in flight, lone forwards read 1.4-5.7x the model (two-request ones
                    # 0.9-1.3x), and through the ratio kernel priced 16 rows at 1.9x 10 rows' time
                    # for every batch after (1.05x measured), which then drafted 4 rows a forward.
                    expected = None
                    if self.batch_cost is not None and len(batch) > 1:
                        if gated:
                            expected = self.batch_cost.seconds(len(batch), rows)
                        self.batch_cost.observe(len(batch), rows, t1 - t0)
                    self.forwards += 1
                    self.rows += rows
                    self.forward_s += t1 - t0
                    self.last_forward = (len(batch), rows)
                    committed = 0
                    for (seq, tree), out in zip(batch, outs):
                        committed += len(_guarded(seq, seq.advance, tree, out, len(batch) == 1) or ())
                    t2 = time.perf_counter()
                    self.own_s += t2 - t1
                    if gated:               # the allocation's time in; a disturbed forward out
                        self.gate.observe(n, committed, t2 - t_step,
                                          None if expected is None else (t1 - t0, expected))
            finished += [s for s in self.running if s.done]
            self.running = [s for s in self.running if not s.done]
        self._learn_lifetime(finished)
        return finished

    def _learn_lifetime(self, finished: list[Sequence]) -> None:
        """Fold the steps of the answers that ended (not failed, not cancelled) into ``lifetime``,
        a running mean of weight ``lifetime_weight``."""
        for s in finished:
            if s.started and s.reason not in ("error", "cancelled"):
                n = max(1, s.stats.steps)
                self.lifetime = n if self.lifetime is None else self.lifetime + (n - self.lifetime) * self.lifetime_weight

    def _allocate(self) -> list[int]:
        """This step's budgets (:func:`allocate_budgets`). A batch whose allocation drafted nothing
        keeps it, with the same requests, for ``reallocate_every`` steps before it weighs them
        again: at load that is most steps, the estimates move slowly, and the allocation runs
        right after a forward has flushed the caches (8 in flight, in process: 70-85 us a step,
        1% of it, for the same answer). Exploration goes on meanwhile (:class:`Exploration`)."""
        running = self.running
        if len(running) == 1:
            return allocate_budgets(running, self.batch_cost)
        ids, held = [s.serial for s in running], self._held
        if held is not None and self.steps - held[1] < self.reallocate_every and held[0] == ids:
            return [0] * len(running)
        budgets = allocate_budgets(running, self.batch_cost, explore=False)
        self._held = None if any(budgets) else (ids, self.steps)
        return budgets

    def stats(self) -> dict:
        """The queue now; over the forwards run so far: rows per forward, the mean forward's
        milliseconds and the requests' own (drafting, acceptance, commit) milliseconds a step;
        the running mean of the steps an answer took (``answer_steps``: how the waiting are spread);
        the drafting gate's verdict per load (``DraftingGate.summary``)."""
        n = self.forwards
        return {"running": len(self.running), "waiting": len(self.waiting), "prefilling": int(self.prefilling is not None),
                "forwards": n, "rows_per_forward": round(self.rows / n, 3) if n else None,
                "forward_ms": round(1e3 * self.forward_s / n, 3) if n else None,
                "own_ms": round(1e3 * self.own_s / n, 3) if n else None,
                "answer_steps": round(self.lifetime, 1) if self.lifetime else None,
                "drafting_gate": self.gate.summary() if self.gate is not None else None}

    def run(self) -> None:
        while not self.idle:
            self.step()


def _guarded(seq: Sequence, fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        seq.fail(exc)
        return None


class BatchLoop:
    """A :class:`BatchScheduler` driven by a :class:`~decoding.compute_thread.ComputeThread` (its
    own, or the process's, which then also runs the process's other model work between steps):
    :meth:`submit` a request from any thread with a callback that runs (on that thread) when it
    has finished; the thread sleeps while there is nothing to do. The request's ``on_tokens`` hook
    also runs there, and so does `on_step(scheduler)` after every step (for metrics:
    ``scheduler.last_forward``, the queue)."""

    def __init__(self, target, *, max_batch: int = 16, prefill_tokens: int = 256, prefill_prompts: int = 1,
                 name: str = "batch-loop", on_step=None, compute: ComputeThread | None = None) -> None:
        self.scheduler = BatchScheduler(target, max_batch=max_batch, prefill_tokens=prefill_tokens,
                                        prefill_prompts=prefill_prompts)
        self.on_step = on_step
        self._incoming: list[tuple[Sequence, object]] = []
        self._callbacks: dict[int, object] = {}
        self.compute = compute or ComputeThread(name)
        self.compute.set_background(self._step, lambda: bool(self._incoming) or not self.scheduler.idle)

    def submit(self, seq: Sequence, on_done) -> None:
        self.compute.wake(lambda: self._incoming.append((seq, on_done)))

    def run(self, seq: Sequence) -> Sequence:
        """Submit `seq` and wait until it has finished (from a thread other than the loop's)."""
        done = threading.Event()
        self.submit(seq, done.set)
        done.wait()
        return seq

    def _step(self) -> None:
        sched = self.scheduler
        incoming: list = []
        self.compute.wake(lambda: (incoming.extend(self._incoming), self._incoming.clear()))
        for seq, cb in incoming:
            sched.add(seq)
            self._callbacks[id(seq)] = cb
        try:
            finished = sched.step()
        except Exception as exc:        # a bug in the step itself: end what it held, keep looping
            finished = [*sched.running, *sched.waiting]
            sched.running, sched.waiting = [], type(sched.waiting)()
            for seq in finished:
                seq.fail(exc)
        for seq in finished:
            cb = self._callbacks.pop(id(seq), None)
            if cb is not None:
                cb()
        if self.on_step is not None:
            try:
                self.on_step(sched)
            except Exception:           # metrics must never stop the loop
                pass


_GATES: PerOwner[DraftingGate] = PerOwner(DraftingGate)


def batch_gate(target, key: Hashable) -> DraftingGate:
    """The drafting gate of the :func:`generate_batch` calls on `target` whose requests draft
    as `key` says (their drafters and verifiers): a call's loads start from the verdicts earlier
    calls measured, as a serving replica's one scheduler carries them from request to request. A
    fresh gate a call learned every load again, its first pairs of blocks alternating drafting
    and not. Kept while `target` lives; calls on one target run one at a time (its forwards do)."""
    return _GATES.get(target, key)


def generate_batch(target, prompts: Seq[list[int]], *, max_batch: int = 16, **kwargs) -> list[GenerationResult]:
    """Decode `prompts` together (the keyword arguments of ``generate``, the same for all; a
    `drafter` must not be shared: pass ``drafters=[...]``, one per prompt). The drafting gate's
    verdicts carry over from earlier calls of the same drafters (:func:`batch_gate`)."""
    drafters = kwargs.pop("drafters", None) or [None] * len(prompts)
    scheduler = BatchScheduler(target, max_batch=max_batch)
    seqs = [Sequence(target, p, drafter=d, **kwargs) for p, d in zip(prompts, drafters)]
    scheduler.gate = batch_gate(target, tuple(sorted({(s.drafter.name, type(s.verifier).__name__) for s in seqs})))
    for s in seqs:
        scheduler.add(s)
    scheduler.run()
    return [s.result() for s in seqs]
