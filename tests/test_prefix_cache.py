"""The prefix cache (decoding/prefix_cache.py): a prompt's positions shared with a prompt
prefilled before are copied, not run, and are bitwise what running them gives, so no output
depends on what ran before it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decoding.config import SamplingParams
from decoding.drafters import PromptLookupDrafter
from decoding.engine import encode_prompt, generate
from decoding.errors import InvalidRequestError
from decoding.prefix_cache import PrefixCache
from decoding.scheduler import generate_batch
from decoding.target import TargetModel

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Write the numbers from one to twenty in words, separated by commas.",
]


def _entry(n: int, fill: float = 0.0):
    return torch.full((2, 1, 1, 1, n, 4), fill), torch.full((n, 4), fill)


def test_the_longest_shared_prefix_is_found_and_the_last_token_is_always_run():
    cache = PrefixCache(1 << 20)
    cache.add(np.arange(10), *_entry(10, 1.0))
    cache.add(np.array([0, 1, 2, 7, 7]), *_entry(5, 2.0))
    entry, n = cache.longest(np.array([0, 1, 2, 3, 4, 5, 99]))
    assert n == 6 and entry.kv[0, 0, 0, 0, 0, 0] == 1.0
    entry, n = cache.longest(np.array([0, 1, 2, 7, 7, 7]))
    assert n == 5 and entry.kv[0, 0, 0, 0, 0, 0] == 2.0
    _, n = cache.longest(np.arange(10))                 # the same prompt: all but its last token
    assert n == 9
    assert cache.longest(np.array([5, 0, 1])) == (None, 0)
    assert cache.longest(np.array([0])) == (None, 0)    # one token: nothing to reuse
    s = cache.stats()
    assert (s["lookups"], s["hits"], s["reused_tokens"]) == (5, 3, 20) and s["entries"] == 2


def test_a_longer_prompt_replaces_what_it_extends_and_a_repeat_is_not_kept_twice():
    cache = PrefixCache(1 << 20)
    cache.add(np.arange(5), *_entry(5))
    one = cache.stats()["bytes"]
    cache.add(np.arange(8), *_entry(8))                 # extends: replaces
    assert cache.stats()["entries"] == 1 and cache.stats()["bytes"] > one
    cache.add(np.arange(6), *_entry(6))                 # inside the kept one: not kept
    assert cache.stats()["entries"] == 1


def test_the_least_recently_used_prompt_goes_first_within_the_budget():
    kv, hidden = _entry(4)
    size = kv.numel() * kv.element_size() + hidden.numel() * hidden.element_size() + 4 * 8
    cache = PrefixCache(2 * size)
    cache.add(np.array([1, 1, 1, 1]), *_entry(4))
    cache.add(np.array([2, 2, 2, 2]), *_entry(4))
    assert cache.longest(np.array([1, 1, 1, 9]))[1] == 3        # used: now the newest
    cache.add(np.array([3, 3, 3, 3]), *_entry(4))               # over budget: [2, ...] goes
    assert cache.longest(np.array([2, 2, 2, 9])) == (None, 0)
    assert cache.longest(np.array([1, 1, 1, 9]))[1] == 3 and cache.longest(np.array([3, 3, 9]))[1] == 2
    assert cache.stats()["bytes"] <= 2 * size
    cache.add(np.arange(1000), *_entry(1000))                   # larger than the whole budget
    assert cache.stats()["entries"] == 2
    with pytest.raises(ValueError):
        PrefixCache(0)


def test_a_prefix_shared_with_a_dropped_prompt_still_finds_the_one_kept():
    kv, hidden = _entry(4)
    size = kv.numel() * kv.element_size() + hidden.numel() * hidden.element_size() + 4 * 8
    cache = PrefixCache(2 * size)
    cache.add(np.array([1, 2, 3, 4]), *_entry(4, 1.0))
    cache.add(np.array([1, 2, 5, 6]), *_entry(4, 2.0))
    cache.add(np.array([7, 7, 7, 7]), *_entry(4, 3.0))          # over budget: [1, 2, 3, 4] goes
    entry, n = cache.longest(np.array([1, 2, 3, 9]))
    assert n == 2 and entry.kv[0, 0, 0, 0, 0, 0] == 2.0
    cache.add(np.array([1, 2, 5, 6, 8, 8]), *_entry(6, 4.0))    # extends [1, 2, 5, 6]: replaces it
    entry, n = cache.longest(np.array([1, 2, 5, 6, 8, 8, 1]))
    assert n == 6 and entry.kv[0, 0, 0, 0, 0, 0] == 4.0 and cache.stats()["bytes"] <= 2 * size
    cache.clear()
    assert cache.longest(np.array([1, 2, 5])) == (None, 0) and cache.stats()["bytes"] == 0


def test_the_trie_finds_what_comparing_every_kept_prompt_finds():
    """Random prompts over a small vocabulary (many shared prefixes), a budget of a few prompts:
    after every add, random lookups agree with the brute-force longest common prefix over the
    prompts kept."""
    rng = np.random.default_rng(0)
    kv, hidden = _entry(1)
    per_token = kv.numel() * kv.element_size() + hidden.numel() * hidden.element_size() + 8
    cache = PrefixCache(40 * per_token)

    def shared(a, b):
        n = min(len(a), len(b))
        differ = np.flatnonzero(a[:n] != b[:n])
        return int(differ[0]) if len(differ) else n

    for _ in range(300):
        ids = rng.integers(0, 3, rng.integers(1, 12))
        cache.add(ids, *_entry(len(ids)))
        kept = [e.tokens for e in cache._entries.values()]
        assert sum(len(t) for t in kept) * per_token <= cache.max_bytes
        assert not any(shared(a, b) == min(len(a), len(b)) for i, a in enumerate(kept) for b in kept[i + 1:])
        for _ in range(5):
            q = rng.integers(0, 3, rng.integers(1, 14))
            want = min(max((shared(t, q) for t in kept), default=0), len(q) - 1)
            entry, n = cache.longest(q, use=False)
            assert n == want and (entry is None) == (want == 0)
            if entry is not None:
                assert shared(entry.tokens, q) >= n


@pytest.fixture(params=["float32", "bfloat16"])
def lean_target(request, target, target_bf16):
    t = target if request.param == "float32" else target_bf16
    assert t.prefix_cache is not None, t.prefix_cache_note
    return t


def test_a_reused_prefix_is_bitwise_what_the_prefill_computes(lean_target):
    """Cuts before, at and after the invariant kernels' row limit (64), at one token and at all
    but the last: logits, hidden states and the keys and values of every position equal the
    prompt's prefill with nothing kept, bitwise."""
    t = lean_target
    vocab = t.vocab_size
    prompt = [(31 * i + 7) % vocab for i in range(100)]
    t.prefix_cache.clear()
    state, cold = t.prefill(prompt)
    assert state.reused == 0
    cold_kv = state.cache.buf[..., :len(prompt), :].clone()
    for cut in (1, 24, 64, 65, 99):
        t.prefix_cache.clear()
        t.prefill(prompt[:cut] + [(prompt[cut] + 1) % vocab] * 3)       # shares exactly `cut` tokens
        state, warm = t.prefill(prompt)
        assert state.reused == cut and state.n_committed == len(prompt)
        assert torch.equal(warm.logits, cold.logits), cut
        assert torch.equal(warm.hidden, cold.hidden), cut
        assert torch.equal(state.cache.buf[..., :len(prompt), :], cold_kv), cut
    t.prefix_cache.clear()


def _in_pieces(target, ids, rows):
    """prefill_pieces driven `rows` at a time: (state, output, the pieces run)."""
    pieces = target.prefill_pieces(ids)
    at, n = next(pieces), 0
    while True:
        try:
            after = pieces.send(rows)
        except StopIteration as done:
            return (*done.value, n + 1)
        assert after - at == rows
        at, n = after, n + 1


def test_a_prompt_prefilled_in_pieces_is_bitwise_the_prompt_prefilled_at_once(lean_target):
    """Pieces of 1, 7, 64 and 65 positions, from nothing kept and after a kept prefix: the
    same logits, hidden states and keys and values, bitwise."""
    t = lean_target
    prompt = [(29 * i + 11) % t.vocab_size for i in range(150)]
    t.prefix_cache.clear()
    ref_state, ref = t.prefill(prompt)
    for kept in (0, 40):
        for rows in (1, 7, 64, 65):
            t.prefix_cache.clear()
            if kept:
                t.prefill(prompt[:kept] + [(prompt[kept] + 1) % t.vocab_size])
            state, out, pieces = _in_pieces(t, prompt, rows)
            assert state.reused == kept and pieces == -(-(len(prompt) - kept) // rows)
            assert torch.equal(out.logits, ref.logits) and torch.equal(out.hidden, ref.hidden), (kept, rows)
            assert torch.equal(state.cache.buf[..., :len(prompt), :], ref_state.cache.buf[..., :len(prompt), :])
    t.prefix_cache.clear()


def test_without_a_prefix_cache_a_prompt_runs_in_one_piece(target):
    """The large-row prefill rounds by its row count: no pieces without the invariant prefill."""
    t = TargetModel(target.model, target.tokenizer, prefix_cache_mb=0)
    prompt = [(29 * i + 11) % t.vocab_size for i in range(100)]
    state, out, pieces = _in_pieces(t, prompt, None)
    pieces_gen = t.prefill_pieces(prompt)
    assert next(pieces_gen) == 0
    with pytest.raises(StopIteration):
        pieces_gen.send(10)                 # all of it at once
    assert pieces == 1 and torch.equal(out.logits, t.prefill(prompt)[1].logits)


def test_a_finished_request_is_kept_whole_for_the_next_turn(lean_target):
    """A request decoded with drafts (tree verification, alone and in a batch) is kept with the
    tokens it committed: the next turn's prompt, which starts with it, reuses all of it, and its
    prefill is bitwise the prefill of that prompt with nothing kept."""
    t = lean_target
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    prompts = [encode_prompt(t, q) for q in ("Repeat exactly: the cat sat on the mat. the cat sat on the mat.",
                                             QUESTIONS[1])]
    for batched in (False, True):
        t.prefix_cache.clear()
        if batched:
            results = generate_batch(t, prompts, params=params, budget=8,
                                     drafters=[PromptLookupDrafter() for _ in prompts])
        else:
            results = [generate(t, p, params=params, drafter=PromptLookupDrafter(), budget=8) for p in prompts]
        assert results[0].stats.accepted > 0                    # drafts were verified and landed
        turns = [p + r.token_ids[:-1] for p, r in zip(prompts, results)]     # what each request committed
        follow = encode_prompt(t, "And once more?")[5:]
        warm = []
        for turn in turns:
            state, out = t.prefill(turn + follow)
            assert state.reused == len(turn), (batched, state.reused, len(turn))
            warm.append((out, state.cache.buf[..., :state.n_committed, :].clone()))
        for turn, (out, kv) in zip(turns, warm):
            t.prefix_cache.clear()
            state, cold = t.prefill(turn + follow)
            assert state.reused == 0
            assert torch.equal(out.logits, cold.logits) and torch.equal(out.hidden, cold.hidden), batched
            assert torch.equal(kv, state.cache.buf[..., :state.n_committed, :])
    t.prefix_cache.clear()


def test_a_requests_choices_prefill_their_prompt_once(target_bf16):
    """A request's n choices, batched: the first prefilled keeps its prompt (a prefill keeps what it
    ran), so the others prefill only its last token; each answer is the one decoded alone (sampled
    with its own seed, as the server's choices are); a sequence kept already is not copied again."""
    from decoding.engine import Sequence
    from decoding.scheduler import BatchScheduler

    t = target_bf16
    t.prefix_cache.clear()
    prompt = encode_prompt(t, QUESTIONS[0])
    alone = [generate(t, prompt, params=SamplingParams(max_new_tokens=12, temperature=0.8, seed=s)).token_ids
             for s in range(3)]
    t.prefix_cache.clear()
    scheduler = BatchScheduler(t, max_batch=4)
    seqs = [Sequence(t, prompt, params=SamplingParams(max_new_tokens=12, temperature=0.8, seed=s),
                     drafter=PromptLookupDrafter(), budget=4) for s in range(3)]
    for s in seqs:
        scheduler.add(s)
    scheduler.run()
    results = [s.result() for s in seqs]
    assert [r.token_ids for r in results] == alone
    assert [r.stats.cached_tokens for r in results] == [0, len(prompt) - 1, len(prompt) - 1]
    entries = t.prefix_cache.stats()["entries"]
    assert t.prefix_cache.touch(prompt) and not t.prefix_cache.touch(prompt + [5])
    assert t.prefix_cache.stats()["entries"] == entries
    t.prefix_cache.clear()


def test_all_logits_and_text_that_is_no_prompt_leave_the_cache_alone(target):
    target.prefix_cache.clear()
    lookups = target.prefix_cache.stats()["lookups"]
    prompt = [(13 * i + 2) % target.vocab_size for i in range(30)]
    state, out = target.prefill(prompt, reuse=False)
    assert state.reused == 0 and target.prefix_cache.stats()["lookups"] == lookups
    assert target.prefix_cache.stats()["entries"] == 0
    target.prefill(prompt)
    state, out = target.prefill(prompt, all_logits=True)
    assert state.reused == 0 and out.logits.shape[0] == len(prompt)
    assert target.prefix_cache.stats()["lookups"] == lookups + 1


def test_outputs_do_not_depend_on_what_was_prefilled_before(target):
    """Chat prompts share their template: decoded with the cache emptied before each, then one
    after another (the template reused), then all in one batch: the same tokens."""
    prompts = [encode_prompt(target, q) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    alone = []
    for p in prompts:
        target.prefix_cache.clear()
        r = generate(target, p, params=params, drafter=PromptLookupDrafter())
        assert r.stats.cached_tokens == 0
        alone.append(r.token_ids)
    after = [generate(target, p, params=params, drafter=PromptLookupDrafter()) for p in prompts]
    assert [r.token_ids for r in after] == alone
    assert all(r.stats.cached_tokens > 0 for r in after[1:])          # the chat template at least
    batched = generate_batch(target, prompts, params=params, drafters=[PromptLookupDrafter() for _ in prompts])
    assert [r.token_ids for r in batched] == alone
    target.prefix_cache.clear()


def test_the_cache_is_off_where_reuse_could_not_be_exact_or_when_asked(target):
    t = TargetModel(target.model, target.tokenizer, prefix_cache_mb=0)
    assert t.prefix_cache is None and t.prefix_cache_note == "off (asked for)"
    t = TargetModel(target.model, target.tokenizer, invariant_forward=False)
    assert t.prefix_cache is None and "lean forward" in t.prefix_cache_note
    with pytest.raises(InvalidRequestError):
        TargetModel(target.model, target.tokenizer, prefix_cache_mb=-1)


def test_serving_defaults_to_the_engines_budget():
    """serving/config.py spells the default out (the ingress imports no torch): the same number."""
    from decoding.target import PREFIX_CACHE_MB
    from serving.config import ModelConfig

    assert ModelConfig().prefix_cache_mb == PREFIX_CACHE_MB
