"""Engine behaviour: stopping, seeds, statistics."""

from __future__ import annotations

import pytest

from decoding.config import SamplingParams
from decoding.drafters import NoDrafter, PromptLookupDrafter
from decoding.engine import encode_prompt, generate


def test_prompt_lookup_drafts_every_earlier_occurrence_as_a_branch_most_recent_first():
    """Two earlier occurrences of the last two tokens with different continuations: the default
    drafter branches on both (the more recent one ranked first); one candidate is a single chain."""
    import numpy as np

    #                  0  1  2  3  4  5  6  7  8  9 10 11 12
    tokens = np.array([5, 1, 2, 7, 8, 5, 1, 2, 9, 9, 3, 1, 2])     # "1 2" at 1 and 6, then the suffix
    chains = PromptLookupDrafter().chains(tokens, 4)
    assert [c for c, _ in chains] == [[9, 9, 3, 1], [7, 8, 5, 1]]
    assert chains[0][1] > chains[1][1]
    tree = PromptLookupDrafter().propose(tokens, 3, 2)         # 3 nodes, 2 deep: 9, 9 9 and 7
    assert tree.tokens[0] == 2 and set(tree.children(0)) == {9, 7} and tree.n_draft == 3
    assert tree.ranks[tree.child(0, 9)] == 0            # a budget of 1 keeps the recent occurrence's token
    one = PromptLookupDrafter(max_candidates=1).propose(tokens, 3, 4)
    assert one.tokens == (2, 9, 9, 3) and one.parents == (-1, 0, 1, 2)


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
        r = generate(target, ids, params=SamplingParams(max_new_tokens=7), drafter=drafter, budget=64)
        assert len(r.token_ids) == 7 and r.finish_reason == "length"


def test_seeded_sampling_is_reproducible(target):
    ids = encode_prompt(target, "Tell me a fun fact.")
    p = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=1234)
    a = generate(target, ids, params=p, drafter=PromptLookupDrafter(), budget=64)
    b = generate(target, ids, params=p, drafter=PromptLookupDrafter(), budget=64)
    assert a.token_ids == b.token_ids


def test_the_default_budget_of_a_soft_request_drafts_its_window(target):
    """The engine's default (adaptive) budget chooses among the sizes decoding.budget.draft_sizes
    gives, as serving's and the benchmarks' do: a soft request's trees are at least its window."""
    from decoding.engine import Sequence
    from decoding.config import SoftGateConfig

    ids = encode_prompt(target, "Tell me a fun fact.")
    strict = Sequence(target, ids, drafter=PromptLookupDrafter())
    soft = Sequence(target, ids, drafter=PromptLookupDrafter(), soft=SoftGateConfig(window=4))
    assert min(strict.adaptive.sizes) == 1
    assert min(soft.adaptive.sizes) == 4 and set(soft.adaptive.sizes) < set(strict.adaptive.sizes)
    assert Sequence(target, ids, soft=SoftGateConfig()).budget == 0           # ar: nothing to draft


def test_statistics_add_up(target, monkeypatch):
    """The statistics against an independent count: every forward of the model is observed (a
    hook on its token embedding, which every forward runs once: prefill + one per verify step), and so is every commit (the path the
    KV cache keeps). Steps, drafted and accepted tokens, output length and MAT must agree with
    those counts; MAT must exceed 1 (this prompt repeats itself, so drafts get accepted)."""
    import time

    ids = encode_prompt(target, "Repeat exactly: the cat sat on the mat. the cat sat on the mat.")
    fed: list[int] = []                  # tokens fed to each forward of the model
    kept: list[int] = []                 # length of each committed path (pending root + accepted)

    def count_forward(module, args, output):
        fed.append(int(args[0].shape[-1]))

    real_commit = target.commit

    def observe_commit(state, path):
        kept.append(len(path))
        return real_commit(state, path)

    monkeypatch.setattr(target, "commit", observe_commit)
    hook = target.model.get_input_embeddings().register_forward_hook(count_forward)
    try:
        t0 = time.perf_counter()
        r = generate(target, ids, params=SamplingParams(max_new_tokens=32, ignore_eos=True),
                     drafter=PromptLookupDrafter(), budget=64)
        wall = time.perf_counter() - t0
    finally:
        hook.remove()
    s = r.stats
    assert r.finish_reason == "length" and len(r.token_ids) == 32 == s.new_tokens
    forwards = len(fed)
    # The prefill runs what the prefix cache does not hold (the chat template at least, when an
    # earlier test prefilled a chat prompt).
    assert fed[0] == len(ids) - s.cached_tokens and s.steps == forwards - 1 == len(kept) >= 1
    assert s.drafted == sum(n - 1 for n in fed[1:])        # each verify feeds the root + its drafts
    assert s.accepted == sum(n - 1 for n in kept) > 0
    # No stop cut anything: the output is the prefill's token plus each step's committed path.
    assert len(r.token_ids) == 1 + sum(kept)
    mat = (len(r.token_ids) - 1) / (forwards - 1)          # output tokens per verification forward
    assert s.mat == pytest.approx(mat) and s.mat > 1
    assert s.acceptance_rate == pytest.approx(s.accepted / s.drafted)
    assert s.time_prefill + s.time_draft + s.time_verify + s.time_commit - 1e-3 <= s.time_total <= wall
    assert s.tokens_per_s >= len(r.token_ids) / wall
    d = s.to_dict()
    assert {"mat", "acceptance_rate", "tokens_per_s", "steps"} <= set(d)


class _Oracle:
    """Drafts the given continuation (what the target will choose) as one long chain, so every
    draft is accepted and a stop lands inside an accepted draft."""

    def __init__(self, prompt_len: int, continuation: list[int]) -> None:
        from decoding.drafters.base import Drafter

        self.drafter = type("OracleDrafter", (Drafter,), {"name": "oracle", "chains": self._chains})()
        self.prompt_len, self.continuation = prompt_len, continuation

    def _chains(self, tokens, max_depth, hidden=None):
        done = len(tokens) - self.prompt_len           # generated so far, the pending token included
        rest = self.continuation[done: done + max_depth]
        return [(rest, 1.0)] if rest else []


def _stop_inside_a_draft(target, kind):
    ids = encode_prompt(target, "What is 2+3?")
    if kind == "length":                                # PLD on a repetitive prompt, cut by max_new_tokens
        ids = encode_prompt(target, "Repeat exactly: the cat sat on the mat. the cat sat on the mat. "
                                    "the cat sat on the mat.")
        return generate(target, ids, params=SamplingParams(max_new_tokens=9), drafter=PromptLookupDrafter(),
                        budget=32)
    # What the target says with no stop at all: the oracle drafts it, past the stop.
    free = generate(target, ids, params=SamplingParams(max_new_tokens=64, ignore_eos=True)).token_ids
    if kind == "eos":
        params = SamplingParams(max_new_tokens=64)
    else:                                               # a stop string a third of the way in
        params = SamplingParams(max_new_tokens=64, ignore_eos=True,
                                stop=(target.tokenizer.decode(free[20:23], skip_special_tokens=True),))
    return generate(target, ids, params=params, drafter=_Oracle(len(ids), free).drafter, budget=64), free


@pytest.mark.parametrize("kind", ["eos", "stop_string", "length"])
def test_mat_counts_only_tokens_committed_to_the_output(target, kind):
    """A stop inside an accepted draft: the drafts past it are not output, so they do not count
    as accepted, and MAT's numerator (accepted + steps) is the output less the prefill's token."""
    if kind == "length":
        r = _stop_inside_a_draft(target, kind)
        assert r.finish_reason == "length"
    else:
        r, free = _stop_inside_a_draft(target, kind)
        assert r.finish_reason == "stop" and len(r.token_ids) < len(free)
        assert r.token_ids == free[: len(r.token_ids)]
        if kind == "eos":
            assert r.token_ids[-1] in target.eos_token_ids
        # the stop fell inside a draft the target accepted: more was drafted than output
        assert r.stats.drafted > len(r.token_ids)
    s = r.stats
    assert s.new_tokens == len(r.token_ids)
    # every output token but the prefill's is committed by a verify step: that is MAT's numerator
    assert s.accepted + s.steps == len(r.token_ids) - 1, s
    assert s.mat == (len(r.token_ids) - 1) / s.steps
