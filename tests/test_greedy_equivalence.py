"""Strict greedy speculative decoding reproduces autoregressive greedy decoding token for token.

The reference is this engine's own autoregressive decoding in the same dtype (the promise: the
batch-invariant forward of decoding/invariant/ makes it hold in every dtype); in float32 that
reference is itself checked against transformers' `generate(do_sample=False)`, an independent
decoding loop, on the shortest prompt of every category and the longest one.
41 Spec-Bench prompts spread over all categories, every drafter, short generations. Each prompt
is prefilled once: the target's prefix cache (decoding/prefix_cache.py, its budget raised for
the module) gives every drafter all of it but its last token (the same computation, bitwise;
what differs, the decode loop, runs in full). The
reference decodes each prompt alone with ``generate``; the drafters decode the prompts 8 at a
time with the continuous-batching scheduler, so every comparison also checks that a request's
output does not depend on its batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decoding.config import SamplingParams
from decoding.drafters import NoDrafter, PromptLookupDrafter
from decoding.engine import Sequence, encode_prompt, generate
from decoding.methods import Datastores, make_drafter
from decoding.scheduler import BatchScheduler
from index.corpus import spec_bench
from index.dense_store import DenseStore

MAX_NEW = 12                # new tokens per prompt: every drafter still drafts and is accepted (asserted)
BATCH = 8                   # prompts verified together by the drafters' runs
N_PROMPTS = 50
LONG = ("summarization", "rag")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompts(target):
    """N_PROMPTS spread evenly over Spec-Bench, every category; of the long-context categories
    (summarization and RAG, 400-1,000 tokens each) every other one, as they cost most prefill."""
    questions = sorted(spec_bench(), key=lambda q: q["question_id"])
    picked = [questions[i] for i in np.linspace(0, len(questions) - 1, N_PROMPTS).astype(int)]
    seen: dict[str, int] = {}
    kept = []
    for q in picked:
        seen[q["category"]] = seen.get(q["category"], 0) + 1
        if q["category"] not in LONG or seen[q["category"]] % 2:
            kept.append(q)
    assert len({q["category"] for q in kept}) == len({q["category"] for q in questions})
    out = [(q["category"], encode_prompt(target, q["turns"][0])) for q in kept]
    assert sum(len(ids) > 600 for _, ids in out) >= 6        # long contexts still in the set
    return out


def _whole_prompts_kept(target):
    """The target, its prefix cache large enough for every prompt of the module (restored after)."""
    budget = target.prefix_cache.max_bytes
    target.prefix_cache.max_bytes = 4 << 30
    yield target
    target.prefix_cache.max_bytes = budget


@pytest.fixture(scope="module")
def prefilled(target):
    yield from _whole_prompts_kept(target)


@pytest.fixture(scope="module")
def reference(prefilled, prompts):
    """This engine's autoregressive greedy continuations (no drafter), the reference of every
    drafter; checked against transformers' generate() by test_autoregressive_equals_transformers."""
    return autoregressive(prefilled, prompts)


def autoregressive(prefilled, prompts) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=MAX_NEW)
    return [generate(prefilled, ids, params=params, drafter=NoDrafter(), budget=0).token_ids for _, ids in prompts]


def shortest_per_category(prompts, k: int = 1) -> list[int]:
    """Indices of the k shortest prompts of every category."""
    by_category: dict[str, list[int]] = {}
    for i, (category, ids) in enumerate(prompts):
        by_category.setdefault(category, []).append(i)
    return [i for group in by_category.values() for i in sorted(group, key=lambda j: len(prompts[j][1]))[:k]]


def test_autoregressive_equals_transformers(target, prompts, reference):
    """The reference itself: the engine's one-token steps reproduce transformers' own generate()
    (an independent decoding loop) on the shortest prompt of every category and the longest prompt."""
    picked = shortest_per_category(prompts) + [max(range(len(prompts)), key=lambda i: len(prompts[i][1]))]
    for i in picked:
        ids = prompts[i][1]
        with torch.inference_mode():
            gen = target.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=MAX_NEW, do_sample=False)
        assert gen[0, len(ids):].tolist() == reference[i], f"prompt {i} ({prompts[i][0]})"


DRAFTERS = {
    "pld": (lambda stores: PromptLookupDrafter(), 10),
    "pld_tree": (lambda stores: PromptLookupDrafter(max_candidates=4), 12),
    "rest": (lambda stores: make_drafter("rest", stores), 12),
    "dense": (lambda stores: make_drafter("dense", stores), 12),
    "sense": (lambda stores: make_drafter("sense", stores), 12),
}


def check_drafter(prefilled, prompts, reference, stores, method) -> None:
    """Every prompt decoded with `method`'s drafter equals `reference` (each prompt decoded alone,
    autoregressively), and drafts were accepted. The prompts are decoded BATCH at a time by the
    continuous-batching scheduler, joining as others finish: the same Sequence steps as
    ``generate`` with every tree verified in a shared forward, so this checks exactness and
    batch invariance at once (and costs a third of decoding the prompts one by one)."""
    make, budget = DRAFTERS[method]
    params = SamplingParams(max_new_tokens=MAX_NEW)
    scheduler = BatchScheduler(prefilled, max_batch=BATCH)
    seqs = [Sequence(prefilled, ids, params=params, drafter=make(stores), budget=budget)  # fresh drafter state
            for _, ids in prompts]
    for seq in seqs:
        scheduler.add(seq)
    scheduler.run()
    mismatches, drafted, accepted = [], 0, 0
    for (category, ids), ref, seq in zip(prompts, reference, seqs):
        result = seq.result()
        drafted += result.stats.drafted
        accepted += result.stats.accepted
        if result.token_ids != ref:
            mismatches.append((category, result.token_ids, ref))
    assert not mismatches, f"{len(mismatches)} of {len(prompts)} prompts differ, first: {mismatches[0]}"
    # The drafts must actually be exercised, or equality proves nothing; and batches were shared.
    assert drafted > 0 and accepted > 0
    assert scheduler.forwards < sum(seq.stats.steps for seq in seqs)


@pytest.mark.parametrize("method", list(DRAFTERS))
def test_strict_greedy_equals_autoregressive(prefilled, prompts, reference, gsm8k_sparse_index, dense_store_dir,
                                             method):
    stores = Datastores(sparse=gsm8k_sparse_index, dense=DenseStore.load(dense_store_dir))
    check_drafter(prefilled, prompts, reference, stores, method)


# bfloat16: the shortest prompt of every category of the same set (bfloat16 prefill of the
# 1,000-token prompts is slow on CPUs without native bfloat16), every drafter against the
# engine's own autoregressive decoding in bfloat16.
BF16_PER_CATEGORY = 1


@pytest.fixture(scope="module")
def prompts_bf16(prompts):
    return [prompts[i] for i in shortest_per_category(prompts, BF16_PER_CATEGORY)]


@pytest.fixture(scope="module")
def prefilled_bf16(target_bf16):
    yield from _whole_prompts_kept(target_bf16)


@pytest.fixture(scope="module")
def reference_bf16(prefilled_bf16, prompts_bf16):
    return autoregressive(prefilled_bf16, prompts_bf16)


@pytest.mark.parametrize("method", list(DRAFTERS))
def test_strict_greedy_equals_autoregressive_bfloat16(prefilled_bf16, prompts_bf16, reference_bf16,
                                                      gsm8k_sparse_index, dense_store_dir, method):
    stores = Datastores(sparse=gsm8k_sparse_index, dense=DenseStore.load(dense_store_dir))
    check_drafter(prefilled_bf16, prompts_bf16, reference_bf16, stores, method)
