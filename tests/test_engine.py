"""Engine behaviour: stopping, seeds, statistics."""

from __future__ import annotations

from decoding.config import SamplingParams
from decoding.drafters import NoDrafter, PromptLookupDrafter
from decoding.engine import encode_prompt, generate


def test_stop_string_truncates(target):
    ids = encode_prompt(target, "Count from 1 to 20, separated by commas.")
    full = generate(target, ids, params=SamplingParams(max_new_tokens=40))
    assert "5" in full.text
    cut = generate(target, ids, params=SamplingParams(max_new_tokens=40, stop=("5",)))
    assert "5" not in cut.text and cut.finish_reason == "stop"
    assert full.text.startswith(cut.text)
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids


def test_eos_stops(target):
    ids = encode_prompt(target, "What is 2+3?")
    r = generate(target, ids, params=SamplingParams(max_new_tokens=64))
    assert r.finish_reason == "stop" and r.token_ids[-1] in target.eos_token_ids
    assert len(r.token_ids) < 64


def test_max_new_tokens(target):
    ids = encode_prompt(target, "Write a long story about a dragon.")
    for drafter in (NoDrafter(), PromptLookupDrafter()):
        r = generate(target, ids, params=SamplingParams(max_new_tokens=7), drafter=drafter)
        assert len(r.token_ids) == 7 and r.finish_reason == "length"


def test_seeded_sampling_is_reproducible(target):
    ids = encode_prompt(target, "Tell me a fun fact.")
    p = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=1234)
    a = generate(target, ids, params=p, drafter=PromptLookupDrafter())
    b = generate(target, ids, params=p, drafter=PromptLookupDrafter())
    assert a.token_ids == b.token_ids


def test_statistics_add_up(target):
    ids = encode_prompt(target, "Repeat exactly: the cat sat on the mat. the cat sat on the mat.")
    r = generate(target, ids, params=SamplingParams(max_new_tokens=32), drafter=PromptLookupDrafter())
    s = r.stats
    assert s.steps >= 1 and s.drafted >= s.accepted >= 0
    # Every step commits accepted + 1 tokens; the first token comes from the prefill.
    assert s.new_tokens <= 1 + s.steps + s.accepted
    assert s.mat == (s.accepted + s.steps) / s.steps
    assert s.time_total >= s.time_prefill + s.time_draft + s.time_verify + s.time_commit - 1e-3
    assert s.tokens_per_s > 0
    d = s.to_dict()
    assert {"mat", "acceptance_rate", "tokens_per_s", "steps"} <= set(d)
