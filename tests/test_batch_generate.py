"""Batched greedy generation (self-distillation's throughput path) against the engine."""

from __future__ import annotations

import pytest

from decoding.batch_generate import generate_greedy_batched, greedy_batches


def test_batches_sorted_bounded_and_complete():
    lengths = [5, 50, 3, 7, 7, 200, 1, 9]
    batches = greedy_batches(lengths, batch_size=3, batch_tokens=30)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 30
    with pytest.raises(ValueError):
        greedy_batches(lengths, 0, 10)


def _prompts(target):
    from decoding.engine import encode_prompt
    from index.corpus import gsm8k

    texts = ["Reply with the single word: yes", "What is 2 + 3? Answer with a number only."]
    texts += [r["question"] for r in gsm8k("test")[:4]]
    prompts = [encode_prompt(target, t) for t in texts]
    assert len({len(p) for p in prompts}) > 2
    return prompts


def _engine(target, prompts, n):
    from decoding.config import SamplingParams
    from decoding.engine import generate

    return [list(generate(target, p, params=SamplingParams(max_new_tokens=n)).token_ids) for p in prompts]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_greedy_is_the_engines_greedy(target, target_bf16, dtype):
    """Prompts of different lengths, fewer rows at once than prompts (each joins as an answer
    ends): each answer is exactly the engine's greedy answer in either dtype (the continuous
    batch's batch-invariant forward), including rows that stop early at EOS (kept, as the engine
    keeps it); the progress callback counts every answer."""
    t = target if dtype == "float32" else target_bf16
    prompts = _prompts(t)
    counted = []
    got = generate_greedy_batched(t, prompts, 24, batch_size=4, on_batch=counted.append)
    assert got == _engine(t, prompts, 24)
    assert sum(counted) == len(prompts)
    assert any(len(a) < 24 and a[-1] in t.eos_token_ids for a in got)     # an early stop was covered


def test_static_batches_equal_the_engine_in_float32(target):
    """The path for models without the lean forward (Hugging Face ``generate`` over left-padded
    static batches): in float32 the same answers as the engine's on these prompts."""
    from decoding.batch_generate import _static_batches

    prompts = _prompts(target)
    counted = []
    assert _static_batches(target, prompts, 24, 8, 16384, counted.append) == _engine(target, prompts, 24)
    assert sum(counted) == len(prompts)


def test_bad_arguments_are_clear(target):
    with pytest.raises(ValueError, match="at least one token"):
        generate_greedy_batched(target, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="context"):
        generate_greedy_batched(target, [[1] * 10], target.context_window)
    assert generate_greedy_batched(target, [], 4) == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_states_are_a_forwards_hidden_states_bitwise(target, target_bf16, dtype):
    """``generate_greedy_with_states``: the same answers, and per answer the hidden states its
    decode steps computed at the positions whose next token is an answer token, bitwise those of
    one forward over prompt + answer (what self-distillation stored keys from before, running that
    forward a second time); early stops at EOS included."""
    from decoding.batch_generate import generate_greedy_with_states
    from decoding.dense_extract import window_states

    t = target if dtype == "float32" else target_bf16
    prompts = _prompts(t)
    answers, states = generate_greedy_with_states(t, prompts, 24, batch_size=4)
    assert answers == generate_greedy_batched(t, prompts, 24, batch_size=4)
    assert any(len(a) < 24 for a in answers)
    for p, a, h in zip(prompts, answers, states):
        ref = window_states(t, [p + a])[0][len(p) - 1: len(p) + len(a) - 1]
        assert h is not None and h.shape == ref.shape == (len(a), t.model.config.hidden_size)
        assert (h == ref).all()


@pytest.mark.parametrize("method", ["pld", "ar"])
def test_a_speculative_answers_states_are_a_forwards_bitwise(target_bf16, method):
    """``generate_with_states`` (self-distillation's ``--distill-method pld`` / ``ar``, one prompt
    at a time through the engine): the engine's answer, and states bitwise a forward's over
    prompt + answer, the accepted drafts' taken from their tree rows."""
    from decoding.batch_generate import generate_with_states
    from decoding.config import SamplingParams
    from decoding.dense_extract import window_states
    from decoding.engine import generate
    from decoding.methods import make_drafter

    t = target_bf16
    accepted = 0
    for p in _prompts(t):
        answer, h = generate_with_states(t, p, 24, make_drafter(method))
        alone = generate(t, p, params=SamplingParams(max_new_tokens=24), drafter=make_drafter(method))
        assert answer == list(alone.token_ids)
        accepted += alone.stats.accepted
        ref = window_states(t, [p + answer])[0][len(p) - 1: len(p) + len(answer) - 1]
        assert h is not None and h.shape == ref.shape and (h == ref).all()
    assert accepted > 0 if method == "pld" else accepted == 0


def test_states_of_a_middle_layer(target):
    """A datastore keyed on another layer (``hidden_layer``): the decode steps hand over that
    layer's states, bitwise a forward's."""
    from decoding.batch_generate import generate_greedy_with_states
    from decoding.dense_extract import window_states
    from decoding.target import TargetModel

    mid = TargetModel.load(dtype="float32", hidden_layer=12)
    prompts = _prompts(mid)[:3]
    answers, states = generate_greedy_with_states(mid, prompts, 12, batch_size=2)
    for p, a, h in zip(prompts, answers, states):
        ref = window_states(mid, [p + a])[0][len(p) - 1: len(p) + len(a) - 1]
        assert (h == ref).all()
        last = window_states(target, [p + a])[0][len(p) - 1: len(p) + len(a) - 1]
        assert not (h == last).all()                # another layer's, not the last one's
