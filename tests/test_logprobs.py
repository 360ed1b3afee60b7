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
