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


def test_batched_greedy_equals_the_engine(target):
    """Prompts of different lengths in one left-padded batch: each answer equals the engine's
    greedy answer, including rows that stop early at EOS (kept, as the engine keeps it)."""
    from decoding.config import SamplingParams
    from decoding.engine import encode_prompt, generate
    from index.corpus import gsm8k

    texts = ["Reply with the single word: yes", "What is 2 + 3? Answer with a number only."]
    texts += [r["question"] for r in gsm8k("test")[:4]]
    prompts = [encode_prompt(target, t) for t in texts]
    assert len({len(p) for p in prompts}) > 2
    got = generate_greedy_batched(target, prompts, 24, batch_size=8)
    want = [list(generate(target, p, params=SamplingParams(max_new_tokens=24)).token_ids) for p in prompts]
    assert got == want
    assert any(len(a) < 24 and a[-1] in target.eos_token_ids for a in got)     # an early stop was covered


def test_bad_arguments_are_clear(target):
    with pytest.raises(ValueError, match="at least one token"):
        generate_greedy_batched(target, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="context"):
        generate_greedy_batched(target, [[1] * 10], target.context_window)
    assert generate_greedy_batched(target, [], 4) == []
