"""Continuous batching (decoding/scheduler.py): a request's output does not depend on its batch.

Every request decoded in a shared batch (requests joining and leaving, mixed methods, greedy and
seeded sampling) must equal the same request decoded alone by ``generate``, token for token; the
batched verification forward must give each request bitwise the logits and hidden states of its
own forward; and the budget allocation must draft less per request as the batch's forward gets
dearer.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from decoding.budget import AdaptiveBudget
from decoding.config import SamplingParams
from decoding.drafters import NoDrafter, PromptLookupDrafter
from decoding.engine import Sequence, encode_prompt, generate
from decoding.methods import Datastores, make_drafter
from decoding.scheduler import BatchScheduler, allocate_budgets, generate_batch
from decoding.tree import TokenTree

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Repeat exactly: the cat sat on the mat. the cat sat on the mat. the cat sat on the mat.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Write the numbers from one to twenty in words, separated by commas.",
]


@pytest.fixture(scope="module")
def prompts(target):
    return [encode_prompt(target, q) for q in QUESTIONS]


def _drafters(stores):
    return [PromptLookupDrafter(max_candidates=1), PromptLookupDrafter(), make_drafter("rest", stores), NoDrafter()]


def test_verify_batch_is_bitwise_each_request_alone(target, prompts):
    """Trees of 1, 3, 6 and 70 nodes (past the kernels' 64-row tuning limit) verified together
    and one by one, from different contexts: the same logits and hidden states, bit for bit."""
    assert target.lean is not None, target.lean_note
    trees = [TokenTree.root_only(11), TokenTree.chain(12, [13, 14]),
             TokenTree((5, 7, 9, 11, 13, 15), (-1, 0, 0, 1, 1, 3)),
             TokenTree.chain(21, list(range(100, 169)))]
    def undo(state):                    # commit the root, then drop it again: the same context
        target.commit(state, [0])
        state.cache.crop(-1)
        state.n_committed -= 1

    alone = []
    states = [target.prefill(p)[0] for p in prompts]
    for s, t in zip(states, trees):
        alone.append(target.verify(s, t))
        undo(s)
    outs = target.verify_batch(states, trees)
    for s in states:
        undo(s)
    for a, b in zip(alone, outs):
        assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden)


def test_batched_greedy_equals_each_request_alone(target, prompts, gsm8k_sparse_index):
    stores = Datastores(sparse=gsm8k_sparse_index)
    params = SamplingParams(max_new_tokens=24)
    alone = [generate(target, p, params=params, drafter=d, budget=8).token_ids
             for p, d in zip(prompts, _drafters(stores))]
    scheduler = BatchScheduler(target)
    seqs = [Sequence(target, p, params=params, drafter=d, budget=8) for p, d in zip(prompts, _drafters(stores))]
    for s in seqs:
        scheduler.add(s)
    scheduler.run()
    assert [s.result().token_ids for s in seqs] == alone
    steps = sum(s.stats.steps for s in seqs)
    assert scheduler.forwards < steps, "the requests never shared a forward"
    assert sum(s.stats.accepted for s in seqs) > 0


def test_soft_and_strict_requests_share_a_batch(target, prompts, gsm8k_sparse_index, dense_store_dir):
    """Verification is per request: a soft-gated SENSE request decoded beside strict ones. Every
    output equals the same request decoded alone, the soft one included (its gates read the same
    logits and hidden states), and the soft request did accept mismatched drafts."""
    from decoding.config import SoftGateConfig
    from index.dense_store import DenseStore

    stores = Datastores(sparse=gsm8k_sparse_index, dense=DenseStore.load(dense_store_dir))
    soft = SoftGateConfig(theta=0.0, lam=0.05, window=1)     # permissive gates: mismatches get accepted
    params = SamplingParams(max_new_tokens=24)

    def requests():
        return [Sequence(target, p, params=params, budget=8,
                         drafter=make_drafter("sense", stores) if i == 0 else PromptLookupDrafter(),
                         soft=soft if i == 0 else None) for i, p in enumerate(prompts)]

    alone = [s.run() for s in requests()]
    scheduler = BatchScheduler(target)
    seqs = requests()
    for s in seqs:
        scheduler.add(s)
    scheduler.run()
    assert [s.result().token_ids for s in seqs] == [r.token_ids for r in alone]
    assert seqs[0].stats.verifier == "soft" and seqs[0].stats.soft_gates["soft_tokens"] > 0
    assert all(s.stats.verifier != "soft" for s in seqs[1:])
    assert scheduler.forwards < sum(s.stats.steps for s in seqs), "the requests never shared a forward"


def test_seeded_sampling_in_a_batch_reproduces_each_alone(target, prompts):
    params = [SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.95, seed=100 + i) for i in range(len(prompts))]
    alone = [generate(target, p, params=q, drafter=PromptLookupDrafter(), budget=6).token_ids
             for p, q in zip(prompts, params)]
    scheduler = BatchScheduler(target)
    seqs = [Sequence(target, p, params=q, drafter=PromptLookupDrafter(), budget=6) for p, q in zip(prompts, params)]
    for s in seqs:
        scheduler.add(s)
    scheduler.run()
    assert [s.result().token_ids for s in seqs] == alone


def test_requests_join_leave_and_cancel_mid_batch(target, prompts):
    """Two requests start; two more join after some steps; one of them, whose answer runs to the
    token limit, is cancelled on its fourth step (its tokens so far are a prefix of its output
    alone); adaptive budgets throughout. (A short answer could end before its fourth step, by
    how much its drafts land.)"""
    params = SamplingParams(max_new_tokens=20)
    alone = [generate(target, p, params=params, drafter=PromptLookupDrafter()).token_ids for p in prompts]
    asked = {"n": 0}

    def stop_on_fourth():
        asked["n"] += 1
        return asked["n"] > 4

    scheduler = BatchScheduler(target, max_batch=3)
    seqs = [Sequence(target, p, params=params, drafter=PromptLookupDrafter(),
                     should_stop=stop_on_fourth if i == 2 else None) for i, p in enumerate(prompts)]
    scheduler.add(seqs[0])
    scheduler.add(seqs[1])
    for _ in range(3):
        scheduler.step()
    scheduler.add(seqs[2])
    scheduler.add(seqs[3])
    scheduler.run()
    results = [s.result() for s in seqs]
    assert len(alone[2]) == params.max_new_tokens
    assert results[2].finish_reason == "cancelled" and 0 < len(results[2].token_ids) < len(alone[2])
    assert results[2].token_ids == alone[2][:len(results[2].token_ids)]
    assert [r.token_ids for i, r in enumerate(results) if i != 2] == [a for i, a in enumerate(alone) if i != 2]
    st = scheduler.stats()          # what /health shows: where a step's time went
    assert st["running"] == st["waiting"] == 0 and st["forwards"] > 0 and st["rows_per_forward"] >= 1
    assert st["forward_ms"] > 0 and 0 < st["own_ms"] < 10 * st["forward_ms"]


def test_waiting_requests_are_prefilled_within_a_token_budget(target, prompts):
    """With nothing running, every waiting request is prefilled in one step (nobody waits for
    them); with requests running, a step prefills at most `prefill_prompts` prompts while the
    positions they run fit `prefill_tokens` (what the prefix cache holds is not run), at least
    one however long. Every output still equals the request decoded alone."""
    params = SamplingParams(max_new_tokens=6)
    alone = [generate(target, p, params=params, budget=0).token_ids for p in prompts]
    target.prefix_cache.clear()
    scheduler = BatchScheduler(target, prefill_tokens=1 << 20, prefill_prompts=3)
    first = [Sequence(target, p, params=params, budget=0) for p in prompts[:2]]
    for s in first:
        scheduler.add(s)
    scheduler.step()
    assert scheduler.last_prefills == 2 and not scheduler.waiting      # idle: both at once
    order = (0, 2, 3)               # a prompt prefilled before (all its positions but the last kept), two new
    rows = [target.prefill_rows(prompts[i]) for i in order]
    assert rows[0] == 1 and 1 < rows[1] < len(prompts[2])               # the new ones: the chat template kept
    scheduler.prefill_tokens = rows[0] + rows[1]                        # by prompt lengths, one would fit
    later = [Sequence(target, prompts[i], params=params, budget=0) for i in order]
    for s in later:
        scheduler.add(s)
    scheduler.step()
    assert scheduler.last_prefills == 2 and len(scheduler.waiting) == 1
    assert [s.state.reused for s in later[:2]] == [len(prompts[0]) - 1, len(prompts[2]) - rows[1]]
    scheduler.run()
    assert [s.result().token_ids for s in first] == alone[:2]
    assert [s.result().token_ids for s in later] == [alone[i] for i in order]

    long_first = BatchScheduler(target, prefill_tokens=1, prefill_prompts=3)    # a prompt longer than the budget
    seqs = [Sequence(target, p, params=params, budget=0) for p in prompts[:3]]
    long_first.add(seqs[0])
    long_first.step()
    long_first.add(seqs[1])
    long_first.add(seqs[2])
    long_first.step()
    assert long_first.last_prefills == 1                                 # one per step, never none
    long_first.run()
    assert [s.result().token_ids for s in seqs] == alone[:3]


def test_requests_arriving_together_beside_running_ones_start_a_step_apart(target, prompts):
    """By default a step with requests running prefills one waiting prompt, however many fit the
    token budget: requests that arrive together start, and with answers of one length end, a step
    apart (their clients then come back apart, not in a wave). With nothing running, all start
    at once. Every output equals the request decoded alone."""
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    alone = [generate(target, p, params=params, budget=0).token_ids for p in prompts]
    target.prefix_cache.clear()
    scheduler = BatchScheduler(target, prefill_tokens=1 << 20)
    first = [Sequence(target, p, params=params, budget=0) for p in prompts[:2]]
    for s in first:
        scheduler.add(s)
    scheduler.step()
    assert scheduler.last_prefills == 2                                  # nothing running: both at once
    later = [Sequence(target, p, params=params, budget=0) for p in prompts[2:]]
    assert len(later) >= 2
    for s in later:
        scheduler.add(s)
    started = []
    while not all(s.started for s in later):
        scheduler.step()
        assert scheduler.last_prefills <= 1
        started.append(sum(s.started for s in later))
    assert started == list(range(1, len(later) + 1))                     # one a step, in order
    ended = {}
    while not scheduler.idle:
        for s in scheduler.step():
            ended[id(s)] = scheduler.steps
    assert [ended[id(s)] for s in later] == list(range(ended[id(later[0])], ended[id(later[0])] + len(later)))
    assert [s.result().token_ids for s in (*first, *later)] == alone


def test_a_queue_longer_than_an_answer_starts_spread_over_one_answers_steps(target, prompts):
    """Where more requests wait than an answer lasts steps, a step prefills ceil(waiting / L), L the
    mean steps of the answers that ended (short answers would leave the batch half empty at one
    a step); the token budget still bounds it. Every output equals the request decoded alone."""
    short = SamplingParams(max_new_tokens=3, ignore_eos=True)        # a first token, then 2 steps
    long = SamplingParams(max_new_tokens=40, ignore_eos=True)
    queued = [*prompts, *prompts]
    alone = [generate(target, p, params=short, budget=0).token_ids for p in prompts]
    target.prefix_cache.clear()
    scheduler = BatchScheduler(target, prefill_tokens=1 << 20)
    assert scheduler.lifetime is None
    first = [Sequence(target, p, params=short, budget=0) for p in prompts[:2]]
    for s in first:
        scheduler.add(s)
    scheduler.run()
    assert scheduler.lifetime == 2 and scheduler.stats()["answer_steps"] == 2     # each ended after 2 steps
    runner = Sequence(target, prompts[0], params=long, budget=0)
    scheduler.add(runner)
    scheduler.step()
    later = [Sequence(target, p, params=short, budget=0) for p in queued]
    for s in later:
        scheduler.add(s)
    scheduler.step()
    assert scheduler.last_prefills == -(-len(later) // 2)               # ceil(8 / 2)
    scheduler.prefill_tokens = 1                                        # the token budget still binds
    scheduler.step()
    assert scheduler.last_prefills == 1
    scheduler.run()
    assert [s.result().token_ids for s in first] == alone[:2]
    assert [s.result().token_ids for s in later] == [*alone, *alone]


def test_a_long_prompt_is_prefilled_in_pieces_while_the_others_go_on(target, prompts):
    """A prompt longer than the step's prefill budget, arriving while two requests run: it is
    prefilled `prefill_tokens` positions a step, each step also advancing the running requests,
    and a short prompt behind it waits for it; every output equals the request decoded alone."""
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    long_prompt = encode_prompt(target, " ".join(2 * QUESTIONS) + " Answer each question in turn.")
    alone = [generate(target, p, params=params, budget=0).token_ids for p in (*prompts[:3], long_prompt)]
    target.prefix_cache.clear()
    scheduler = BatchScheduler(target, prefill_tokens=32)
    running = [Sequence(target, p, params=params, budget=0) for p in prompts[:2]]
    for s in running:
        scheduler.add(s)
    scheduler.step()
    long_seq = Sequence(target, long_prompt, params=params, budget=0)
    short = Sequence(target, prompts[2], params=params, budget=0)
    scheduler.add(long_seq)
    scheduler.add(short)
    rows = target.prefill_rows(long_prompt)
    assert rows > 3 * 32
    steps = 0
    while not long_seq.started:
        before = [len(s.generated) for s in running]
        scheduler.step()
        steps += 1
        assert all(len(s.generated) > b for s, b in zip(running, before))     # the others went on
        assert not short.started                                              # it waits its turn
    assert steps == -(-rows // 32) and scheduler.stats()["prefilling"] == 0
    scheduler.run()
    assert [s.result().token_ids for s in (*running, short, long_seq)] == alone
    assert long_seq.result().stats.cached_tokens == len(long_prompt) - rows


def test_generate_batch_matches_generate(target, prompts):
    params = SamplingParams(max_new_tokens=12)
    batch = generate_batch(target, prompts, params=params, drafters=[PromptLookupDrafter() for _ in prompts])
    assert [r.token_ids for r in batch] == [generate(target, p, params=params, drafter=PromptLookupDrafter()).token_ids
                                           for p in prompts]


def test_generate_batch_carries_the_drafting_gate_from_call_to_call(target, prompts):
    """A second call with the same drafters starts from the verdicts the first measured (its
    loads' steps and pairs go on counting; a pair completes only when a block of the other kind
    has run, which past a verdict is a probe every 8 blocks or more, so the second call may add
    none); another drafter has a gate of its own."""
    from decoding.drafters import NoDrafter
    from decoding.scheduler import batch_gate

    params = SamplingParams(max_new_tokens=64, ignore_eos=True)     # answers of one length: the load stays 4
    key = (("pld", "StrictGreedyVerifier"),)
    gate = batch_gate(target, key)

    def counts():
        s = gate.summary()
        return {k: v["pairs"] for k, v in s.items()}, {k: v["steps"] for k, v in s.items()}

    pairs0, steps0 = counts()
    generate_batch(target, prompts, params=params, drafters=[PromptLookupDrafter() for _ in prompts])
    pairs1, steps1 = counts()
    assert sum(pairs1.values()) > sum(pairs0.values())           # this gate measured the first call
    generate_batch(target, prompts, params=params, drafters=[PromptLookupDrafter() for _ in prompts])
    pairs2, steps2 = counts()
    assert sum(steps2.values()) > sum(steps1.values())           # ... and the second, going on
    assert all(pairs2[k] >= n for k, n in pairs1.items()) and all(steps2[k] >= n for k, n in steps1.items())
    assert batch_gate(target, key) is gate and batch_gate(target, (("ar", "StrictGreedyVerifier"),)) is not gate
    generate_batch(target, prompts[:2], params=params, drafters=[NoDrafter(), NoDrafter()])
    assert counts() == (pairs2, steps2)                          # ar's calls: not this gate


def _request(cost, accepted, learned=False):
    """A running request as the allocation sees it: an adaptive budget whose estimates say
    `accepted(b)` draft tokens are accepted with budget b (`learned`: as measured by its steps,
    else as priors)."""
    a = AdaptiveBudget(cost)
    for b in a.sizes:
        a.accepted[b] = accepted(b)
        a.seen[b] = int(learned)
    a.steps = 1                         # away from an exploration step
    return SimpleNamespace(adaptive=a, budget=a, choose_budget=a.choose, serial=next(_SERIALS), forced=False)


_SERIALS = itertools.count()


CPU_LIKE = {0: 1.0, 1: 1.2, 2: 1.35, 3: 1.5, 4: 1.7, 6: 2.0, 8: 2.4, 12: 3.1, 16: 3.8, 24: 5.2, 32: 6.6, 48: 9.4,
            64: 12.2}
GPU_LIKE = {n: 1.0 + 0.004 * n for n in CPU_LIKE}
# A quiet 2-core AVX2 EPYC's measured float32 curve (the suite's pinned dtype, 2 threads).
REAL_CPU = {0: 1.0, 1: 1.03, 2: 1.06, 3: 1.1, 4: 1.2, 6: 1.33, 8: 1.48, 12: 1.8, 16: 2.18, 24: 2.9, 32: 3.69,
            48: 5.4, 64: 7.19}


def test_allocation_drafts_less_as_the_forward_gets_dearer():
    good = lambda b: 0.8 * min(b, 6)          # noqa: E731  a drafter that often hits
    per_request = {}
    for n in (1, 2, 4, 8, 16, 32):
        budgets = allocate_budgets([_request(CPU_LIKE, good, learned=True) for _ in range(n)])
        assert all(b >= 0 for b in budgets)
        per_request[n] = sum(budgets) / n
    assert per_request[1] > 0
    assert per_request[32] < per_request[2] <= per_request[1]
    # Cheap rows (a GPU-like flat curve): every request drafts, at every batch size.
    assert all(b > 0 for b in allocate_budgets([_request(GPU_LIKE, good) for _ in range(32)]))
    # Drafts that never hit: nothing is drafted in a batch.
    assert allocate_budgets([_request(CPU_LIKE, lambda b: 0.0) for _ in range(4)]) == [0, 0, 0, 0]


def test_the_batch_cost_model_prices_requests_and_rows_apart():
    """C(R, T) = f(T) + b (R - 1), f interpolated between measured one-request points: a linear
    truth comes back exactly (within the points and beyond them), a convex one (flat, then
    steep, as a CPU's forward) within a few percent where a straight line in T was 30% off, and
    a noisy measurement never makes more rows or requests cheaper."""
    from decoding.cost import BATCH_POINTS, BatchCost

    # 25 ms base, 5 ms a request, 3 ms a row.
    truth = lambda r, t: 0.025 + 0.005 * r + 0.003 * t             # noqa: E731
    points = [[r, r + e, truth(r, r + e)] for r, e in BATCH_POINTS]
    model = BatchCost(points)
    assert model.seconds(8, 8) == pytest.approx(truth(8, 8), rel=1e-6)
    assert model.seconds(16, 140) == pytest.approx(truth(16, 140), rel=1e-6)
    with pytest.raises(ValueError):
        BatchCost([p for p in points if p[0] == 1])
    # The 2-core VM's shape (bfloat16): 12 ms to 8 rows, then 0.9 ms a row; 0.4 ms a request.
    convex = lambda r, t: 0.012 + 0.0009 * max(0, t - 8) + 0.0004 * (r - 1)       # noqa: E731
    model = BatchCost([[r, r + e, convex(r, r + e)] for r, e in BATCH_POINTS])
    for r, t in ((2, 10), (2, 18), (4, 12), (4, 20), (8, 24), (3, 7), (16, 100)):
        assert model.seconds(r, t) == pytest.approx(convex(r, t), rel=0.05), (r, t)
    # A noisy measurement that says rows got cheaper is clamped, not believed.
    noisy = BatchCost([[1, 1, 0.03], [1, 9, 0.029], [8, 8, 0.02], [8, 16, 0.069]])
    assert noisy.seconds(1, 9) >= noisy.seconds(1, 1) and noisy.per_request >= 0
    assert noisy.seconds(8, 16) >= noisy.seconds(8, 8) >= noisy.seconds(1, 8)
    good = lambda b: 0.8 * min(b, 6)          # noqa: E731
    reqs = [_request(CPU_LIKE, good) for _ in range(8)]
    dear_rows = allocate_budgets(reqs, BatchCost([[r, r + e, 0.02 + 0.001 * r + 0.02 * (r + e)]
                                                  for r, e in BATCH_POINTS]))
    cheap_rows = allocate_budgets(reqs, BatchCost([[r, r + e, 0.02 + 0.02 * r + 0.0002 * (r + e)]
                                                   for r, e in BATCH_POINTS]))
    assert sum(dear_rows) < sum(cheap_rows) and all(b > 0 for b in cheap_rows)


def test_the_forwards_run_correct_a_misread_batch_cost():
    """A cost measurement taken while something else ran on a core (one remembered on this VM read
    a 3-row forward at 25 ms, the truth 12) would price drafts as dear in every later process; the
    forwards the batch runs correct it: where T rows ran, their measured time; elsewhere the model
    scaled by the ratio seen around T; later forwards move it (drift)."""
    from decoding.cost import BATCH_POINTS, BatchCost

    truth = lambda r, t: 0.012 + 0.0009 * max(0, t - 8) + 0.0004 * (r - 1)          # noqa: E731
    misread = lambda r, t: 2.0 * truth(r, t) if t >= 3 else truth(r, t)            # noqa: E731
    model = BatchCost([[r, r + e, misread(r, r + e)] for r, e in BATCH_POINTS])
    assert model.seconds(2, 10) == pytest.approx(2 * truth(2, 10), rel=0.05)
    fair = lambda b: 0.5 * min(b, 4)          # noqa: E731
    reqs = [_request(CPU_LIKE, fair) for _ in range(2)]
    before = allocate_budgets(reqs, model)
    assert before == [0, 0]                   # a draft looks like it doubles the forward
    for t in (2, 3, 4, 10, 12):               # plain steps, explored sizes
        model.observe(2, t, truth(2, t))
    assert model.seconds(2, 10) == pytest.approx(truth(2, 10), rel=1e-3)           # its forwards (and 12's)
    assert model.seconds(2, 11) == pytest.approx(truth(2, 11), rel=0.05)           # between 10 and 12
    assert model.seconds(2, 40) == pytest.approx(truth(2, 40), rel=0.05)           # scaled as at 12
    assert model.modelled(2, 10) == pytest.approx(2 * truth(2, 10), rel=0.05)      # the measurement itself kept
    assert all(b > 0 for b in allocate_budgets(reqs, model))
    # Drift: the machine slows down; the running mean, then the EMA, follows it.
    for _ in range(60):
        model.observe(2, 10, 1.5 * truth(2, 10))
    assert model.seconds(2, 10) == pytest.approx(1.5 * truth(2, 10), rel=0.01)
    model.observe(2, 10, 0.0)                 # nonsense is ignored
    model.observe(3, 2, 0.01)
    assert model.seconds(2, 10) == pytest.approx(1.5 * truth(2, 10), rel=0.01)


def test_one_slow_forward_does_not_price_its_row_count_out_of_the_allocation():
    """A forward slowed by another process (a busy VM, the HTTP side of a served replica) must
    not make its row count look dearer than its neighbours for good: the allocation would stop
    asking for it and never see it run at its true speed again. The ratio at T weighs the row
    counts around it by their forwards; many forwards at T itself still set it (drift)."""
    from decoding.cost import BATCH_POINTS, BatchCost

    truth = lambda r, t: 0.006 + 0.0002 * max(0, t - 4) + 0.0003 * (r - 1)          # noqa: E731
    model = BatchCost([[r, r + e, truth(r, r + e)] for r, e in BATCH_POINTS])
    for t in (3, 5, 6, 7, 8, 9):                # the batch's usual forwards, at their true speed
        for _ in range(10):
            model.observe(2, t, truth(2, t))
    model.observe(2, 4, 1.6 * truth(2, 4))       # once, while something else ran
    assert model.seconds(2, 4) < 1.25 * truth(2, 4)
    assert model.seconds(2, 4) < model.seconds(2, 8)                 # not dearer than twice the rows
    for _ in range(30):                          # the machine really is slower at 4 rows now
        model.observe(2, 4, 1.6 * truth(2, 4))
    assert model.seconds(2, 4) > 1.35 * truth(2, 4)
    # forwards slowed now and then (a quarter of them, twice as long): priced as the typical one
    noisy = BatchCost([[r, r + e, truth(r, r + e)] for r, e in BATCH_POINTS])
    for i in range(80):
        noisy.observe(2, 6, (2.0 if i % 4 == 3 else 1.0) * truth(2, 6))
    assert noisy.seconds(2, 6) < 1.15 * truth(2, 6)           # their mean: 1.25
    # one forward at a row count none has run near: its ratio is the nearest one's
    model.observe(2, 40, 2.0 * truth(2, 40))
    assert model.seconds(2, 44) == pytest.approx(2.0 * truth(2, 44), rel=0.05)
    assert model.seconds(2, 8) == pytest.approx(truth(2, 8), rel=0.03)


def test_a_batch_explores_with_one_request_at_a_time():
    """Every `explore_every`-th step one request in turn drafts one size above its allocation: 8
    steps of a batch of 8 explore once, not 8 times (one extra row in every forward) as requests
    counting their own steps would. While the allocation drafts nothing the gap doubles (to 8x,
    and to no more times than there are requests); a step whose allocation drafts brings it
    back."""
    from decoding.scheduler import Exploration

    def batch():
        return [_request(CPU_LIKE, lambda b: 0.0) for _ in range(8)]

    own = batch()
    assert sum(sum(allocate_budgets(own)) for _ in range(8)) == 8            # each on its own 8th step
    shared = batch()
    assert allocate_budgets(shared, explore=False) == [0] * 8
    exploration = Exploration()
    picks = [exploration.pick(shared, drafting=False) for _ in range(1, 8 * 16 + 1)]
    steps = [k + 1 for k, p in enumerate(picks) if p is not None]
    assert steps == [8, 24, 56, 120]                  # gaps 8, 16, 32, 64 (8 x 8 at most)
    assert len({picks[k - 1] for k in steps}) == 4    # in turn
    more = [exploration.pick(shared, drafting=False) for _ in range(64 * 3)]
    assert [k + 1 for k, p in enumerate(more) if p is not None] == [56, 120, 184]    # steps 184, 248, 312: 64 apart
    # Drafting again: exploration every 8th step, at once.
    again = [exploration.pick(shared, drafting=True) for _ in range(32)]
    assert [k + 1 for k, p in enumerate(again) if p is not None] == [8, 16, 24, 32]
    # Two requests: the gap stops at 2 x 8, so each is tested every 32 steps, within an answer.
    two, pair = Exploration(), batch()[:2]
    picks = [two.pick(pair, drafting=False) for _ in range(72)]
    assert [k + 1 for k, p in enumerate(picks) if p is not None] == [8, 24, 40, 56, 72]


def test_a_request_starts_drafting_only_past_the_margin():
    """A request that drafts nothing starts when its first size pays with 2% of the batch's
    tokens a step fewer accepted than estimated (the estimates' noise), at most a quarter token."""
    def batch(n, a1):
        return [_request(CPU_LIKE, lambda b: a1) for _ in range(n)]

    # two requests, no batch model: G(0) = 2 / c(1) = 1.667; one drafting 1: (2 + A) / c(2), and
    # the handicap 0.04 tokens: it pays from A = 0.25 without, 0.29 with.
    assert allocate_budgets(batch(2, 0.27), explore=False) == [0, 0]
    assert sum(allocate_budgets(batch(2, 0.27), explore=False, start=(0.0, 0.0))) >= 1
    assert sum(allocate_budgets(batch(2, 0.31), explore=False)) >= 1
    # 32 requests on a flat curve (a GPU), a row 0.36% of the forward: 2% would be 0.64 tokens,
    # and a first size promising half a token would never start; a quarter token it is.
    def gpu(a1):
        return [_request(GPU_LIKE, lambda b: a1) for _ in range(32)]

    assert sum(allocate_budgets(gpu(0.5), explore=False)) > 0
    assert sum(allocate_budgets(gpu(0.5), explore=False, start=(0.02, 1.0))) == 0
    assert sum(allocate_budgets(gpu(0.2), explore=False)) == 0
    assert sum(allocate_budgets(gpu(0.2), explore=False, start=(0.0, 0.0))) > 0


def test_a_request_may_start_at_the_size_it_would_pick_alone():
    """Drafting costs half a decode step whatever the size (the retrieval): one node (A = 0.5)
    never pays, six (A = 3) do. The ascent from 0 would stop at the first size; a request starts
    at the best size it has measured instead, and not at one only its prior vouches for."""
    def batch(measured):
        reqs = [_request(CPU_LIKE, lambda b: min(0.5 * b, 3.0)) for _ in range(2)]
        for r in reqs:
            a = r.adaptive
            a.overhead = {b: (0.5 if b else 0.0) for b in a.overhead}
            a.overhead_seen = {b: 1 for b in a.overhead}
            a.seen = {b: int(measured) for b in a.sizes}
        return reqs

    assert max(allocate_budgets(batch(True), explore=False)) >= 6
    assert allocate_budgets(batch(False), explore=False) == [0, 0]


def test_a_batch_prices_drafting_by_what_its_wide_steps_realized():
    """Once its node model is ready, a request's drafting in a batch is priced by what its wide
    steps realized (accepted tokens, nodes the cut kept, own time), not by its sizes' estimates:
    those the cut's choice of trees overrates. Sizes promising 0.8 tokens a node but wide steps
    that landed 0.2 tokens on 4 nodes: nothing is drafted; wide steps that landed 3: drafted."""
    def batch(outcome):
        reqs = [_request(CPU_LIKE, lambda b: 0.8 * min(b, 6)) for _ in range(4)]
        for r in reqs:
            r.adaptive.nodes.updates = r.adaptive.nodes.warm
            if outcome is not None:
                for _ in range(3):
                    r.adaptive.learn_wide(*outcome)
        return reqs

    assert sum(allocate_budgets(batch(None), explore=False)) > 0      # the sizes' estimates
    assert allocate_budgets(batch((0.2, 4, 0.0)), explore=False) == [0, 0, 0, 0]
    assert all(b > 0 for b in allocate_budgets(batch((3.0, 4, 0.0)), explore=False))
    # The own time counts: a retrieval of 2 decode steps a step does not pay for 3 tokens at 4 rows.
    assert allocate_budgets(batch((3.0, 4, 2.0 * CPU_LIKE[0])), explore=False) == [0, 0, 0, 0]
    # Learned by the shared estimates and seeded into the next request.
    from decoding.budget import SharedEstimates
    shared = SharedEstimates()
    first = AdaptiveBudget(CPU_LIKE, shared=shared)
    first.learn_wide(2, 5, 0.001)
    later = AdaptiveBudget(CPU_LIKE, shared=shared)
    assert later.wide == (2.0, 5.0, 0.001) and later.wide_seen == 1


def test_an_allocation_that_drafts_nothing_is_kept_a_few_steps(monkeypatch):
    """A batch whose allocation drafted nothing keeps it for `reallocate_every` steps while its
    requests stay the same; a change of requests, or an allocation that drafts, weighs again at
    the next step."""
    import decoding.scheduler as scheduler_module

    calls = []
    real = scheduler_module.allocate_budgets
    monkeypatch.setattr(scheduler_module, "allocate_budgets",
                        lambda seqs, *a, **k: (calls.append(len(seqs)), real(seqs, *a, **k))[1])
    sched = BatchScheduler(SimpleNamespace(), max_batch=8)
    sched.running = [_request(CPU_LIKE, lambda b: 0.0) for _ in range(4)]

    def steps(n):
        out = []
        for _ in range(n):
            sched.steps += 1
            out.append(sched._allocate())
        return out

    assert steps(8) == [[0] * 4] * 8 and len(calls) == 2          # steps 1 and 5
    sched.running = sched.running[:3]
    assert steps(1) == [[0] * 3] and len(calls) == 3                # a request left
    sched.running = [*sched.running[:2], _request(CPU_LIKE, lambda b: 0.0)]
    assert steps(1) == [[0] * 3] and len(calls) == 4                # another took its place
    sched.running = [_request(CPU_LIKE, lambda b: 0.8 * min(b, 6)) for _ in range(2)]
    drafted = steps(3)
    assert all(sum(b) > 0 for b in drafted) and len(calls) == 7     # drafting: every step


def test_a_batch_that_drafts_nothing_explores_narrow(target, prompts):
    """Where the allocation gives every request 0 and the node model is still learning, the
    exploring request drafts the smallest size, not its draft size (the test at its least cost),
    and the tests grow rarer; the outputs stay the ones decoded alone."""
    from decoding.cost import cost_curve

    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    drafted, seqs = [], []
    scheduler = BatchScheduler(target, max_batch=3)
    scheduler.gate = None               # its blocks that draft nothing pause the exploration's count
    for p in prompts[:3]:
        ab = AdaptiveBudget(cost_curve(target))
        for b in ab.sizes:              # drafting costs 50 decode steps, as far as it knows
            ab.overhead[b], ab.overhead_seen[b] = 50.0, 10**6
        seq = Sequence(target, p, params=params, drafter=PromptLookupDrafter(), budget=ab)
        propose = seq.drafter.propose
        seq.drafter.propose = (lambda tokens, budget, max_depth, hidden=None, _p=propose:
                               (drafted.append((scheduler.steps, budget)), _p(tokens, budget, max_depth, hidden))[1])
        seqs.append(seq)
        scheduler.add(seq)
    scheduler.run()
    smallest = seqs[0].adaptive.sizes[0]
    assert drafted and all(b == smallest for _, b in drafted)
    assert [step for step, _ in drafted] == [8, 24]             # then 56: past the end
    alone = [generate(target, p, params=params, drafter=PromptLookupDrafter()).token_ids for p in prompts[:3]]
    assert [s.result().token_ids for s in seqs] == alone


def test_a_load_the_gate_found_losing_drafts_nothing_but_fixed_budgets(target, prompts):
    """Where the drafting gate measured that drafting loses at this load, the adaptive requests
    draft nothing, exploration included, while a request of a fixed budget keeps it; the outputs
    stay the ones decoded alone."""
    from decoding.gate import DraftingGate

    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    scheduler = BatchScheduler(target, max_batch=3)
    gate = scheduler.gate
    assert isinstance(gate, DraftingGate)
    while gate.verdict(3) is not False:         # measured: drafting blocks 40% slower at 3 in flight
        drafting = gate.allows(3)
        gate.observe(3, 3, 3 / (60.0 if drafting else 100.0))
    drafted, seqs = [], []
    for i, p in enumerate(prompts[:3]):
        seq = Sequence(target, p, params=params, drafter=PromptLookupDrafter(), budget=4 if i == 2 else "adaptive")
        seq.propose = (lambda budget, alone=False, wide=False, _p=seq.propose, _i=i:      # what the batch gives
                       (drafted.append((len(scheduler.running), _i, budget)), _p(budget, alone, wide))[1])
        seqs.append(seq)
        scheduler.add(seq)
    scheduler.run()
    full = [(i, b) for n, i, b in drafted if n == 3]
    assert sorted({i for i, _ in full}) == [0, 1, 2] and len(full) >= 3 * 10
    assert all(b == 0 for i, b in full if i < 2) and all(b == 4 for i, b in full if i == 2)
    assert gate.verdict(3) is False
    alone = [generate(target, p, params=params, drafter=PromptLookupDrafter(), budget=4 if i == 2 else "adaptive").token_ids
             for i, p in enumerate(prompts[:3])]
    assert [s.result().token_ids for s in seqs] == alone


def _shares_tree():
    """Two proposers' chains: 'a' with a dominant continuation, 'b' with stray ones."""
    chains = [([1, 2, 3, 4], 2.0)] + [([10 + i, 20 + i], 0.5) for i in range(4)]
    return TokenTree.from_chains(0, chains, 16, ["a"] + ["b"] * 4)


def _drafted(cost, lands: bool):
    """A running request that drafted `_shares_tree()`, whose node model learned that 'a's nodes
    land (`lands`) or that nothing does."""
    req = _request(cost, lambda b: 0.5 * min(b, 4))
    tree = _shares_tree()
    path = [0]
    while lands and len(path) < 5:
        path.append(tree.child(path[-1], [1, 2, 3, 4][len(path) - 1]))
    for _ in range(300):
        req.adaptive.nodes.learn(tree, path)
    req.done = False
    return req, tree


def test_the_batch_cut_gives_the_rows_to_the_nodes_likely_to_land():
    """Of the trees a batch drafted wide, the forward verifies the nodes likely to land: a request
    whose tree lands keeps its likely chain, one whose candidates are strays keeps nothing; dearer
    rows keep fewer; a request whose allocation was 0 (it did not draft wide) keeps its tree."""
    from decoding.cost import BATCH_POINTS, BatchCost
    from decoding.scheduler import cut_budgets

    flat = BatchCost([[r, r + e, 0.012 + 0.0001 * (r + e) + 0.0004 * (r - 1)] for r, e in BATCH_POINTS])
    steep = BatchCost([[r, r + e, 0.012 + 0.01 * max(0, r + e - 5) + 0.0004 * (r - 1)] for r, e in BATCH_POINTS])
    (a, ta), (b, tb), (c, _) = _drafted(CPU_LIKE, True), _drafted(CPU_LIKE, False), _drafted(CPU_LIKE, True)
    tc = TokenTree.root_only(7)
    keep = cut_budgets([a, b, c], [ta, tb, tc], [4, 4, 0], flat)
    assert keep[0] >= 4 and keep[1] == 0 and keep[2] is None
    on_flat = keep[0]
    keep = cut_budgets([a, b, c], [ta, tb, tc], [4, 4, 0], steep)
    assert 1 <= keep[0] < on_flat and keep[1] == 0
    # The kept part is the tree the budget keeps: a's chain first.
    assert ta.cut(keep[0]).tokens[1:3] == (1, 2)
    # A tree of a grammar's forced tokens (Sequence.propose) stays whole: each of its nodes lands.
    a.forced = True
    assert cut_budgets([a, b, c], [ta, tb, tc], [4, 4, 0], steep)[0] is None
    a.forced = False
    # A node model still learning keeps the allocation's trees as drafted.
    fresh, tree = _request(CPU_LIKE, lambda b: 0.5 * min(b, 4)), _shares_tree()
    fresh.done = False
    assert cut_budgets([fresh, a], [tree, ta], [4, 4], flat)[0] is None


def test_a_batch_drafts_wide_and_verifies_the_cut(target, prompts, monkeypatch):
    """In a batch, a request the allocation lets draft drafts its draft size, and the forward
    verifies the cut (``cut_budgets``); every output stays the one decoded alone."""
    import decoding.scheduler as scheduler_module
    from decoding.cost import BATCH_POINTS, BatchCost, interpolate_cost

    # The costs are pinned (a quiet 2-core AVX2 VM's float32 curve, 17.5 ms a decode step): what
    # this machine measured would decide whether drafting wide pays at all (a run that read c(16)
    # at 3.4 instead of 2.2 never cut), and that is not what this test is about. The forwards the
    # batch runs still correct the batch model, as they do in a server.
    curve = {n: 0.0175 * c for n, c in REAL_CPU.items()}
    monkeypatch.setattr(target, "_batch_cost", BatchCost(
        [[r, r + e, interpolate_cost(curve, r + e - 1) + 0.0005 * (r - 1)] for r, e in BATCH_POINTS]), raising=False)
    params = SamplingParams(max_new_tokens=20)
    drafted, seqs = [], []
    for p in prompts[:3]:
        ab = AdaptiveBudget(curve)
        ab.nodes.warm = 0               # cut from the first step (the model's prior)
        seq = Sequence(target, p, params=params, drafter=PromptLookupDrafter(), budget=ab)
        propose = seq.drafter.propose
        seq.drafter.propose = (lambda tokens, budget, max_depth, hidden=None, _p=propose:
                               (drafted.append(budget), _p(tokens, budget, max_depth, hidden))[1])
        seqs.append(seq)
    cuts = []
    cut_budgets = scheduler_module.cut_budgets

    def recording(batch, trees, *args):
        keep = cut_budgets(batch, trees, *args)
        cuts.extend((t.n_draft, k) for t, k in zip(trees, keep) if k is not None)
        return keep

    monkeypatch.setattr(scheduler_module, "cut_budgets", recording)
    scheduler = BatchScheduler(target, max_batch=3)
    for s in seqs:
        scheduler.add(s)
    scheduler.run()
    alone = [generate(target, p, params=params, drafter=PromptLookupDrafter()).token_ids for p in prompts[:3]]
    assert [s.result().token_ids for s in seqs] == alone
    assert drafted and max(drafted) >= seqs[0].adaptive.draft_size > 0
    assert any(k < n for n, k in cuts)          # trees drafted wide in a batch, verified cut
    # What the wide steps realized is learned (it prices the next allocations): the nodes the
    # cut kept, of which `accepted` landed, in the request's own time.
    learned = [s.adaptive for s in seqs if s.adaptive.wide_seen]
    assert learned and all(0 <= a.wide[0] <= a.wide[1] <= a.draft_size and a.wide[2] > 0 for a in learned)
    assert sum(a.wide_seen for a in learned) == len(cuts)


def test_only_forwards_of_several_requests_price_the_batch(target, prompts):
    """The batch cost model learns from the forwards of two requests or more; a request left
    alone in the batch (here the short one ended) prices its own budget instead: in a server its
    forwards fall as a request ends and the next arrives, beside their HTTP work, and read
    several times the model."""
    from decoding.cost import batch_cost

    model = batch_cost(target)                  # the target's own, which the scheduler takes up
    before = sum(model._seen.values())
    scheduler = BatchScheduler(target, max_batch=2)
    for n in (6, 30):
        scheduler.add(Sequence(target, prompts[0], params=SamplingParams(max_new_tokens=n, ignore_eos=True),
                               drafter=PromptLookupDrafter()))
    shared = lone = 0
    while not scheduler.idle:
        scheduler.step()
        if scheduler.last_forward is not None:
            shared += scheduler.last_forward[0] > 1
            lone += scheduler.last_forward[0] == 1
    assert shared and lone and scheduler.batch_cost is model
    assert sum(model._seen.values()) - before == shared


def test_a_request_that_drafts_nothing_takes_no_part_in_the_allocation(target, prompts):
    """An `ar` request handed an adaptive budget (as a server hands every request one) has
    nothing to draft: it is not adaptive, so the batch allocation neither prices it nor gives it
    rows on its estimates' optimistic prior."""
    from decoding.cost import cost_curve

    seq = Sequence(target, prompts[0], drafter=NoDrafter(), budget=AdaptiveBudget(cost_curve(target)))
    assert seq.adaptive is None and seq.budget == 0
    pld = Sequence(target, prompts[1], drafter=PromptLookupDrafter(), budget=AdaptiveBudget(cost_curve(target)))
    assert allocate_budgets([seq, pld])[0] == 0


def test_the_compute_thread_runs_calls_in_order_and_the_loop_between_them():
    """Calls from other threads run on the one compute thread, in order, with their results and
    exceptions handed back; a call made on the compute thread runs at once (no deadlock); the
    background step runs while it has work and the thread sleeps otherwise."""
    import threading
    import time

    from decoding.compute_thread import ComputeThread

    compute = ComputeThread("test-compute")
    seen = []
    assert compute.call(lambda: threading.current_thread().name) == "test-compute"
    assert [compute.call(seen.append, i) for i in range(5)] == [None] * 5 and seen == [0, 1, 2, 3, 4]
    assert compute.call(lambda: compute.call(lambda: 7)) == 7                    # re-entrant
    with pytest.raises(ZeroDivisionError):
        compute.call(lambda: 1 / 0)
    work = {"left": 3, "steps": 0}

    def step():
        work["left"] -= 1
        work["steps"] += 1

    compute.set_background(step, lambda: work["left"] > 0)
    deadline = time.time() + 10
    while work["left"] > 0 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert work == {"left": 0, "steps": 3}                                   # then it sleeps
    compute.wake(lambda: work.update(left=2))
    assert compute.call(lambda: "after") == "after"
    deadline = time.time() + 10
    while work["left"] > 0 and time.time() < deadline:
        time.sleep(0.01)
    assert work["steps"] == 5


def test_a_batch_loop_shares_the_compute_thread_with_other_work(target, prompts):
    """The serving replica's arrangement: the batch loop and the replica's other model calls on
    one compute thread; requests submitted from other threads finish with their answers alone."""
    from concurrent.futures import ThreadPoolExecutor

    from decoding.compute_thread import ComputeThread
    from decoding.scheduler import BatchLoop

    compute = ComputeThread("test-torch")
    loop = BatchLoop(target, max_batch=4, compute=compute)
    params = SamplingParams(max_new_tokens=8)
    want = [generate(target, p, params=params, drafter=PromptLookupDrafter()).token_ids for p in prompts[:3]]
    with ThreadPoolExecutor(3) as pool:
        seqs = list(pool.map(lambda p: loop.run(Sequence(target, p, params=params, drafter=PromptLookupDrafter())),
                             prompts[:3]))
    assert [s.result().token_ids for s in seqs] == want
    assert compute.call(lambda: loop.scheduler.idle)
