"""Token log-probabilities (``generate(..., logprobs=k)``): one per output token, read off the
forward that verified it; bitwise the same whichever method drafted and whatever shared the batch."""

from __future__ import annotations

import math

import pytest
import torch

from decoding.config import SamplingParams, SoftGateConfig
from decoding.drafters import NoDrafter, PromptLookupDrafter
from decoding.engine import Sequence, encode_prompt, generate
from decoding.errors import InvalidRequestError
from decoding.scheduler import BatchScheduler

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " \
           "How many clips did Natalia sell altogether in April and May?"


@pytest.fixture(scope="module")
def plain(target):
    ids = encode_prompt(target, QUESTION)
    return ids, generate(target, ids, params=SamplingParams(max_new_tokens=48), budget=0, logprobs=3)


def test_greedy_logprobs_are_the_same_whichever_method_drafted_and_batched(target, plain):
    ids, ar = plain
    assert len(ar.logprobs) == len(ar.token_ids) and [r.token for r in ar.logprobs] == ar.token_ids
    assert all(len(r.top) == 3 and r.top[0] == (r.token, r.logprob) for r in ar.logprobs)     # greedy: the argmax
    pld = generate(target, ids, params=SamplingParams(max_new_tokens=48), drafter=PromptLookupDrafter(), budget=8,
                   logprobs=3)
    assert pld.stats.mat > 1.0 and pld.token_ids == ar.token_ids and pld.logprobs == ar.logprobs
    sched = BatchScheduler(target)
    other = encode_prompt(target, "Weng earns $12 an hour for babysitting. How much does she earn in 3 hours?")
    seqs = [Sequence(target, ids, params=SamplingParams(max_new_tokens=48), drafter=PromptLookupDrafter(),
                     logprobs=3),
            Sequence(target, other, params=SamplingParams(max_new_tokens=30), drafter=NoDrafter())]
    for s in seqs:
        sched.add(s)
    sched.run()
    assert seqs[0].result().logprobs == ar.logprobs and seqs[1].result().logprobs is None


def test_logprobs_are_the_models_distribution_at_each_position(target, plain):
    """Against transformers' own forward over prompt + answer (another kernel: equal to rounding)."""
    ids, ar = plain
    model = target.model
    with torch.inference_mode():
        logits = model(torch.tensor([ids + ar.token_ids])).logits[0].float()
    want = torch.log_softmax(logits[len(ids) - 1: len(ids) - 1 + len(ar.token_ids)], dim=-1)
    got = [r.logprob for r in ar.logprobs]
    assert got == pytest.approx(want[torch.arange(len(got)), torch.tensor(ar.token_ids)].tolist(), abs=2e-3)


def test_logprobs_follow_stops_sampling_and_soft_verification(target, plain):
    ids, ar = plain
    stopped = generate(target, ids, params=SamplingParams(max_new_tokens=48, stop=("48",)),
                       drafter=PromptLookupDrafter(), budget=8, logprobs=0)
    assert stopped.finish_reason == "stop" and len(stopped.logprobs) == len(stopped.token_ids) < len(ar.token_ids)
    assert stopped.logprobs == [type(r)(r.token, r.logprob, []) for r in ar.logprobs[: len(stopped.token_ids)]]
    for kwargs in ({"params": SamplingParams(max_new_tokens=32, temperature=0.9, seed=3)},
                   {"params": SamplingParams(max_new_tokens=32), "soft": SoftGateConfig()}):
        r = generate(target, ids, drafter=PromptLookupDrafter(), budget=8, logprobs=1, **kwargs)
        assert [x.token for x in r.logprobs] == r.token_ids
        assert all(x.logprob <= 0 and math.isfinite(x.logprob) and x.top[0][1] >= x.logprob for x in r.logprobs)
    with pytest.raises(InvalidRequestError, match="logprobs"):
        generate(target, ids, logprobs=-1)


def test_prompt_logprobs_score_every_prompt_token_in_pieces_and_change_no_answer(target):
    """A prompt longer than a piece (``PROMPT_PIECE``), scored: the model's distribution at each
    position (transformers' own forward over the prompt, float32: equal to rounding), the same
    answer as without scoring, alone and in a batch prefilling it a few rows a step."""
    from decoding.engine import PROMPT_PIECE

    ids = encode_prompt(target, "Summarize: " + "The quick brown fox jumps over the lazy dog. " * 40)
    assert len(ids) > PROMPT_PIECE
    params = SamplingParams(max_new_tokens=12)
    plain = generate(target, ids, params=params, drafter=PromptLookupDrafter())
    scored = generate(target, ids, params=params, drafter=PromptLookupDrafter(), prompt_logprobs=2)
    assert scored.token_ids == plain.token_ids and scored.logprobs is None
    assert [r.token for r in scored.prompt_logprobs] == ids[1:] and all(len(r.top) == 2 for r in scored.prompt_logprobs)
    with torch.inference_mode():
        logits = target.model(torch.tensor([ids])).logits[0, :-1].float()
    want = torch.log_softmax(logits, dim=-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert [r.logprob for r in scored.prompt_logprobs] == pytest.approx(want, abs=2e-3)
    sched = BatchScheduler(target, prefill_tokens=100)
    sched.add(Sequence(target, encode_prompt(target, QUESTION), params=params, drafter=NoDrafter()))
    sched.step()                        # running: the long prompt then comes in pieces of 100 rows
    seq = Sequence(target, ids, params=params, drafter=PromptLookupDrafter(), prompt_logprobs=2)
    sched.add(seq)
    pieces = 0
    while not sched.idle:
        sched.step()
        pieces += sched.prefilling is seq
    assert pieces >= 2
    batched = seq.result()
    assert batched.token_ids == plain.token_ids and batched.prompt_logprobs == scored.prompt_logprobs
