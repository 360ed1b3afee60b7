"""Presence and frequency penalties and a logit bias (decoding/logit_adjust.py): each row of a
verified tree adjusted as autoregressive decoding adjusts that position, so strict decoding with
them stays identical to autoregressive decoding with them, alone and in a batch."""

from __future__ import annotations

import pytest
import torch

from decoding.config import SamplingParams
from decoding.drafters import PromptLookupDrafter
from decoding.engine import Sequence, encode_prompt, generate
from decoding.errors import InvalidRequestError
from decoding.logit_adjust import LogitAdjust
from decoding.methods import Datastores, make_drafter
from decoding.scheduler import BatchScheduler
from decoding.tree import TokenTree
from index.dense_store import DenseStore


def test_each_tree_row_is_adjusted_as_its_position_alone():
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=0.3, logit_bias={5: 2.5, 9: -100})
    answer = [3, 4, 3, 7]                       # the answer so far; 7 is the tree's root (pending)
    # root 7 -> 3 -> 4, root -> 8 -> 3 (node 4), node 1 -> 5
    tree = TokenTree((7, 3, 4, 8, 3, 5), (-1, 0, 1, 0, 3, 1))
    logits = torch.randn(len(tree), 12)
    kept = logits.clone()
    adjust = LogitAdjust(params, 12)
    adjust.add(answer)
    rows = adjust.apply(logits, tree)
    assert torch.equal(logits, kept)            # never in place
    for i in range(len(tree)):
        path, node = [], i
        while node > 0:
            path.append(tree.tokens[node])
            node = tree.parents[node]
        alone = LogitAdjust(params, 12)
        alone.add(answer + path[::-1])
        assert torch.equal(rows[i], alone.apply(logits[i:i + 1])[0]), f"node {i}"
    # the values themselves: token 3 at node 4 (answer twice + path once), 9 banned, 5 raised
    want = logits[4, 3] - 0.3 * 3 - 0.7
    assert rows[4, 3] == pytest.approx(float(want), abs=1e-6)
    assert rows[0, 9] == pytest.approx(float(logits[0, 9]) - 100, abs=1e-4)
    assert rows[2, 5] == pytest.approx(float(logits[2, 5]) + 2.5, abs=1e-6)
    assert torch.equal(rows[:, 0], logits[:, 0])          # a token never seen, not biased: untouched


def test_bad_adjustments_are_one_line_errors():
    for kwargs in ({"presence_penalty": 2.5}, {"frequency_penalty": float("nan")}, {"logit_bias": {-1: 1.0}},
                   {"logit_bias": {3: 101}}, {"logit_bias": {"3": 1.0}}, {"logit_bias": [(3, 1.0), (3, 2.0)]}):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**kwargs)
    with pytest.raises(InvalidRequestError, match="outside the model's vocabulary"):
        LogitAdjust(SamplingParams(logit_bias={12: 1.0}), 12)
    assert not SamplingParams().adjusts_logits
    assert SamplingParams(logit_bias={3: 1}).logit_bias == ((3, 1.0),)


PROMPT = ("Copy this list exactly, one item a line:\napples, 3 kg\npears, 2 kg\nplums, 5 kg\n"
          "cherries, 1 kg\nlemons, 4 kg\napples, 3 kg\npears, 2 kg")
ADJUSTED = [dict(frequency_penalty=0.4, presence_penalty=0.2),
            dict(presence_penalty=-0.5, logit_bias={28: 3.0}),
            dict(frequency_penalty=0.3, logit_bias={30: -100, 31: -100})]


@pytest.fixture(scope="module")
def stores(dense_store_dir):
    return Datastores(dense=DenseStore.load(dense_store_dir))


def test_strict_greedy_with_adjustments_equals_autoregressive(target_bf16, stores):
    """PLD and SENSE with penalties and biases, alone and three to a batch (each request its own
    adjustments), token for token the autoregressive answers with the same adjustments; and the
    adjustments change the answer (or the equality would prove nothing about them)."""
    ids = encode_prompt(target_bf16, PROMPT)
    plain = generate(target_bf16, ids, params=SamplingParams(max_new_tokens=40)).token_ids
    refs, drafted = [], 0
    for kw in ADJUSTED:
        params = SamplingParams(max_new_tokens=40, **kw)
        ref = generate(target_bf16, ids, params=params, logprobs=2)
        refs.append(ref.token_ids)
        for make in (lambda: PromptLookupDrafter(max_candidates=4), lambda: make_drafter("sense", stores)):
            out = generate(target_bf16, ids, params=params, drafter=make(), budget=8, logprobs=2)
            assert out.token_ids == ref.token_ids, kw
            assert out.logprobs == ref.logprobs, kw
            drafted += out.stats.accepted
    assert drafted > 0
    assert any(r != plain for r in refs)
    assert 30 not in refs[2] and 31 not in refs[2]
    for method in ("pld", "sense"):
        scheduler = BatchScheduler(target_bf16, max_batch=4)
        seqs = [Sequence(target_bf16, ids, params=SamplingParams(max_new_tokens=40, **kw),
                         drafter=PromptLookupDrafter() if method == "pld" else make_drafter("sense", stores),
                         budget=6) for kw in ADJUSTED]
        for s in seqs:
            scheduler.add(s)
        scheduler.run()
        assert [s.result().token_ids for s in seqs] == refs, method


def test_a_large_bias_forces_a_token_and_its_logprob_says_so(target_bf16):
    ids = encode_prompt(target_bf16, "Say hello.")
    forced = target_bf16.tokenizer.encode(" yes")[0]
    out = generate(target_bf16, ids, params=SamplingParams(max_new_tokens=5, logit_bias={forced: 100}), logprobs=1)
    assert out.token_ids == [forced] * 5
    assert all(e.logprob > -1e-3 for e in out.logprobs)


def test_seeded_sampling_with_penalties_reproduces_across_methods(target_bf16):
    ids = encode_prompt(target_bf16, PROMPT)
    params = SamplingParams(max_new_tokens=32, temperature=0.8, seed=7, frequency_penalty=0.5)
    ref = generate(target_bf16, ids, params=params).token_ids
    assert generate(target_bf16, ids, params=params, drafter=PromptLookupDrafter(), budget=6).token_ids == ref
    unpenalized = SamplingParams(max_new_tokens=32, temperature=0.8, seed=7)
    assert generate(target_bf16, ids, params=unpenalized).token_ids != ref
