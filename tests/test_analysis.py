"""Draft source labels (TokenTree.sources) and the analysis helpers of bench/analysis.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.analysis import (RecordingVerifier, Step, accepted_by_source_combination, acceptance_by_depth,
                            accepted_by_group, co_proposal,
                            acceptance_by_source, aggregate, committed_cost_curve, committed_method_rows,
                            run_recorded, spec_bench_by_category, speedups)
from decoding.drafters import DenseDrafter, Drafter, HybridDrafter, PromptLookupDrafter, SparseDrafter
from decoding.metrics import GenerationStats
from decoding.tree import TokenTree

CHAINS = [([2, 3, 4], 5.0), ([2, 3, 9], 3.0), ([7], 1.0), ([2, 8], 2.0), ([7, 5], 0.5)]


# -- source labels never change the tree --------------------------------------------------------


@pytest.mark.parametrize("budget", [0, 1, 3, 4, 64])
def test_labels_leave_the_tree_unchanged(budget):
    plain = TokenTree.from_chains(1, CHAINS, budget)
    labelled = TokenTree.from_chains(1, iter(CHAINS), budget, ["pld", "rest", "dense", "pld", "dynamic"])
    assert labelled == plain
    assert (labelled.tokens, labelled.parents, labelled.ranks) == (plain.tokens, plain.parents, plain.ranks)
    assert plain.sources is None
    assert len(labelled.sources) == len(labelled) and labelled.sources[0] == ()


def test_labels_name_every_chain_through_a_node():
    t = TokenTree.from_chains(1, CHAINS, 64, ["pld", "rest", "dense", "pld", "dynamic"])
    src = {tuple(t.path_tokens(_path_to(t, i))[1:]): t.sources[i] for i in range(1, len(t))}
    assert src[(2,)] == ("pld", "rest")           # sorted, each label once
    assert src[(2, 3)] == ("pld", "rest")
    assert src[(2, 3, 4)] == ("pld",)
    assert src[(2, 3, 9)] == ("rest",)
    assert src[(2, 8)] == ("pld",)
    assert src[(7,)] == ("dense", "dynamic")
    assert src[(7, 5)] == ("dynamic",)
    one = TokenTree.from_chains(1, CHAINS, 3, ["rest"] * len(CHAINS))
    assert one.sources == ((),) + (("rest",),) * 3


def test_labels_are_checked():
    with pytest.raises(ValueError):
        TokenTree.from_chains(1, CHAINS, 4, ["pld"])
    with pytest.raises(ValueError):
        TokenTree((1, 2), (-1, 0), sources=((),))


def _path_to(t: TokenTree, node: int) -> list[int]:
    path = [node]
    while t.parents[path[-1]] >= 0:
        path.append(t.parents[path[-1]])
    return path[::-1]


class _Fixed(Drafter):
    def __init__(self, found, source=None):
        self.found, self.source = found, source

    def chains(self, tokens, max_depth, hidden=None):
        return list(self.found)


def test_hybrid_labels_each_part_and_keeps_its_chains():
    a, b = _Fixed([([2, 3], 2.0), ([4], 2.0)], "pld"), _Fixed([([2, 5], 1.0)], "rest")
    empty = _Fixed([], "dense")
    h = HybridDrafter([(a, 1.0), (empty, 1.0), (b, 3.0)])
    tokens = np.array([9, 1])
    found, labels = h.labelled_chains(tokens, 8)
    assert found == h.chains(tokens, 8) == [([2, 3], 0.5), ([4], 0.5), ([2, 5], 3.0)]
    assert labels == ["pld", "pld", "rest"]
    tree = h.propose(tokens, 8, 8)
    assert tree == TokenTree.from_chains(1, found, 8)
    assert tree.sources[tree.child(0, 2)] == ("pld", "rest")
    # nested hybrids pass their parts' labels through
    outer = HybridDrafter([(h, 1.0), (_Fixed([([6], 1.0)], "x"), 1.0)])
    assert outer.labelled_chains(tokens, 8)[1] == ["pld", "pld", "rest", "x"]


def test_a_longer_prompt_lookup_match_weighs_more_in_a_fused_tree():
    """PLD's share of a fused tree scales with its longest match (/ 2): a 5-token match outweighs
    a dense part of share 2, a 1-token match does not."""
    dense = _Fixed([([42], 1.0)], "dense")
    pld = PromptLookupDrafter()
    long = np.array([1, 2, 3, 4, 5, 60, 61, 9, 1, 2, 3, 4, 5])         # the last 5 tokens occurred before
    short = np.array([5, 70, 71, 9, 8, 5])                            # only the last token did
    assert pld.fusion_scale(pld.chains(long, 4)) == 2.5 and pld.fusion_scale(pld.chains(short, 4)) == 0.5
    assert PromptLookupDrafter(scale_by_match=False).fusion_scale(pld.chains(long, 4)) == 1.0
    for tokens, first in ((long, 60), (short, 42)):
        tree = HybridDrafter([(pld, 1.0), (dense, 2.0)]).propose(tokens, 1, 4)
        assert tree.tokens[1:] == (first,), (tokens, tree.tokens)


def test_single_source_drafters_label_their_nodes():
    assert PromptLookupDrafter.source == "pld" and SparseDrafter.source == "rest"
    tokens = np.array([5, 6, 7, 8, 5, 6])
    tree = PromptLookupDrafter().propose(tokens, 8, 8)
    assert tree.n_draft > 0 and set(tree.sources[1:]) == {("pld",)}
    assert _Fixed([([2], 1.0)]).labelled_chains(tokens, 4)[1] == ["drafter"]     # default: the name


class _FakeStore:
    """A static dense datastore of two entries (unit keys), enough for DenseDrafter."""

    class manifest:
        eos_token_id = 0

    def __init__(self):
        self.keys = np.eye(2, dtype=np.float32)
        self.first_token = np.array([6, 6])
        self.values = np.array([[6, 11, 12], [6, 13, 14]])
        self.transform = lambda h: h / np.linalg.norm(h, axis=-1, keepdims=True)

    def __len__(self):
        return 2

    def search(self, q, k):
        sims = q @ self.keys.T
        order = np.argsort(-sims, axis=1)[:, :k]
        return np.take_along_axis(sims, order, 1), order


def test_dense_labels_static_and_dynamic_chains():
    import torch

    d = DenseDrafter(_FakeStore(), k=2)
    tokens = np.array([3, 6, 21, 22, 3, 6])
    d.begin(tokens[:4].tolist(), torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.1, 1.0]]))
    found, labels = d.labelled_chains(tokens, 2, torch.tensor([1.0, 0.1]))
    assert found == d.chains(tokens, 2, torch.tensor([1.0, 0.1]))
    assert sorted(zip(labels, (tuple(c) for c, _ in found)))[:3] == [
        ("dense", (11, 12)), ("dense", (13, 14)), ("dynamic", (21, 22))]
    tree = d.propose(tokens, 8, 2, torch.tensor([1.0, 0.1]))
    assert tree.sources[tree.child(0, 21)] == ("dynamic",) and tree.sources[tree.child(0, 11)] == ("dense",)
    chains_mode = DenseDrafter(_FakeStore(), k=2, mode="chains", n_chains=1, dynamic=False)
    found, labels = chains_mode.labelled_chains(tokens, 2, torch.tensor([1.0, 0.1]))
    assert [c for c, _ in found] == [[11, 12]] and labels == ["dense"]


# -- analysis of recorded steps -----------------------------------------------------------------


def _steps():
    # root 1; tree: 1 -> 2 -> 3 -> 4, 1 -> 7; 2 proposed by pld+rest, 3 by pld, 4 by pld, 7 by dense
    t = TokenTree.from_chains(1, [([2, 3, 4], 3.0), ([2], 1.0), ([7], 1.0)], 8, ["pld", "rest", "dense"])
    two, seven = t.child(0, 2), t.child(0, 7)
    three = t.child(two, 3)
    chain = TokenTree.from_chains(5, [([6, 8], 1.0)], 8, ["dynamic"])
    return [Step(t, (0, two, three)),              # accepted 2, 3; rejected at 4
            Step(t, (0,)),                         # nothing accepted
            Step(chain, (0, 1, 2)),                # the whole chain, no children left to try
            Step(TokenTree.root_only(9), (0,))], (two, seven)


def test_acceptance_by_depth():
    steps, _ = _steps()
    table = acceptance_by_depth(steps)
    assert sorted(table) == [1, 2, 3]
    assert table[1]["drafted"] == 5 and table[1]["accepted"] == 2 and table[1]["tried"] == 3
    assert table[2]["drafted"] == 3 and table[2]["accepted"] == 2 and table[2]["tried"] == 2
    assert table[3]["drafted"] == 2 and table[3]["accepted"] == 0 and table[3]["tried"] == 1
    assert table[1]["rate"] == pytest.approx(2 / 5) and table[1]["conditional"] == pytest.approx(2 / 3)
    assert table[2]["conditional"] == 1.0 and table[3]["conditional"] == 0.0


def test_acceptance_by_source():
    steps, _ = _steps()
    table = acceptance_by_source(steps)
    assert list(table)[:4] == ["pld", "rest", "dense", "dynamic"]
    assert table["pld"] == {"drafted": 6, "accepted": 2, "rate": pytest.approx(1 / 3),
                            "sole_drafted": 4, "sole_accepted": 1}
    assert table["rest"]["drafted"] == 2 and table["rest"]["accepted"] == 1 and table["rest"]["sole_drafted"] == 0
    assert table["dense"]["drafted"] == 2 and table["dense"]["accepted"] == 0
    assert table["dynamic"]["drafted"] == 2 and table["dynamic"]["accepted"] == 2
    assert accepted_by_source_combination(steps) == {"pld+rest": 1, "pld": 1, "dynamic": 2}
    groups = {"request": ("pld", "dynamic"), "datastores": ("rest", "dense")}
    assert accepted_by_group(steps, groups) == {"request+datastores": 1, "request": 3}
    assert accepted_by_group(steps, {"ds": ("dense",)}) == {"other": 4}
    overlap = co_proposal(steps)
    assert overlap["pld"]["rest"] == pytest.approx(2 / 6) and overlap["rest"]["pld"] == 1.0
    assert overlap["pld"]["pld"] == 1.0 and overlap["dense"]["dynamic"] == 0.0
    assert co_proposal([])["pld"]["pld"] == 0.0
    unlabelled = [Step(TokenTree.chain(1, [2]), (0, 1))]
    assert acceptance_by_source(unlabelled, sources=())["unknown"]["accepted"] == 1


def test_aggregate_and_speedups():
    a = GenerationStats(new_tokens=10, steps=10, drafted=0, accepted=0, time_total=2.0)
    b = GenerationStats(new_tokens=12, steps=6, drafted=12, accepted=6, time_total=1.0)
    c = GenerationStats(new_tokens=8, steps=4, drafted=8, accepted=4, time_total=1.0)
    agg = {"ar": aggregate([a]), "x": aggregate([b, c])}
    assert agg["x"]["mat"] == pytest.approx((10 + 10) / 10) and agg["x"]["acceptance_rate"] == 0.5
    assert agg["x"]["tokens_per_s"] == 10.0 and agg["x"]["requests"] == 2
    assert speedups(agg) == {"ar": 1.0, "x": 2.0}
    assert aggregate([])["mat"] == 0.0


def test_spec_bench_by_category():
    qs = [{"question_id": i, "category": c, "turns": [f"q{i}"]}
          for i, c in [(330, "qa"), (90, "writing"), (325, "qa"), (170, "translation"), (81, "coding")]]
    assert spec_bench_by_category(qs) == {"mt_bench": ["q81"], "translation": ["q170"], "qa": ["q325"]}
    assert spec_bench_by_category(qs, 2) == {"mt_bench": ["q81", "q90"], "translation": ["q170"],
                                              "qa": ["q325", "q330"]}


def test_spec_bench_by_category_on_the_shipped_data():
    """The real question file: six categories of 80 questions (MT-Bench's 8 x 10 as one)."""
    from index.corpus import spec_bench

    by_cat = spec_bench_by_category(spec_bench(), per_category=1000)
    assert {k: len(v) for k, v in by_cat.items()} == {
        "mt_bench": 80, "translation": 80, "summarization": 80, "qa": 80, "math_reasoning": 80, "rag": 80}


def test_committed_results_parse(tmp_path):
    engine = {"rows": [{"method": "ar", "ratio": 1.0},
                       {"method": "verify_cost", "draft_tokens": 0, "relative_cost": 1.0},
                       {"method": "verify_cost", "draft_tokens": 8, "relative_cost": 2.0}]}
    assert committed_cost_curve(engine) == {0: 1.0, 8: 2.0}
    sense = {"rows": [{"method": "ar", "dataset": "gsm8k", "datastore": "ood", "mat": 1.0},
                      {"method": "sense_soft", "dataset": "gsm8k", "datastore": "ood", "accuracy_ratio": 0.5},
                      {"method": "pld", "dataset": "spec_bench_heldout", "datastore": "ood", "mat": 1.4}]}
    assert list(committed_method_rows(sense, "gsm8k")) == ["ar"]
    # the ID store where there is one; wide-tree and float32 rows never stand in for the run's
    sense["rows"] += [{"method": "ar", "dataset": "gsm8k", "datastore": "id", "mat": 1.0},
                      {"method": "rest", "dataset": "gsm8k", "datastore": "id", "mat": 1.2},
                      {"method": "rest", "dataset": "gsm8k", "datastore": "id", "mat": 1.8, "budget": 32},
                      {"method": "ar", "dataset": "gsm8k", "datastore": "id", "mat": 1.0, "float32_beside": True,
                       "tokens_per_s": 1.0}]
    assert {m: r["mat"] for m, r in committed_method_rows(sense, "gsm8k").items()} == {"ar": 1.0, "rest": 1.2}
    assert "tokens_per_s" not in committed_method_rows(sense, "gsm8k")["ar"]
    two = {"machine": {"dtype": "bfloat16"}, "rows": [
        {"method": "verify_cost", "dtype": "bfloat16", "draft_tokens": 8, "relative_cost": 1.5},
        {"method": "verify_cost", "dtype": "float32", "draft_tokens": 8, "relative_cost": 1.7}]}
    assert committed_cost_curve(two) == {8: 1.5} and committed_cost_curve(two, "float32") == {8: 1.7}
    from bench.analysis import RESULTS, load_results

    (tmp_path / "x.json").write_text(json.dumps(engine))
    assert load_results("x", tmp_path) == engine
    # the committed files have what the notebook plots
    assert committed_cost_curve(load_results("engine"))[0] == 1.0
    assert "sense_strict" in committed_method_rows(load_results("sense", RESULTS), "gsm8k")


def test_recording_changes_nothing(target):
    """The recorded run gives the same tokens, and the steps add up to the engine's statistics."""
    from decoding.config import SamplingParams
    from decoding.engine import encode_prompt, generate
    from decoding.verifiers import StrictGreedyVerifier

    params = SamplingParams(max_new_tokens=16)
    ids = encode_prompt(target, "Repeat after me: one two three, one two three, one two three.")
    plain = generate(target, ids, params=params, drafter=PromptLookupDrafter(), budget=8)
    result, steps = run_recorded(target, ids, PromptLookupDrafter(), params=params, budget=8)
    assert result.token_ids == plain.token_ids
    assert len(steps) == result.stats.steps
    assert sum(s.tree.n_draft for s in steps) == result.stats.drafted
    # The recorded steps hold what the verifier accepted; the engine counts only the accepted
    # tokens that reach the output (here the answer's EOS falls inside an accepted draft and
    # drops the rest of it), so MAT's numerator is the output less the prefill's token.
    assert result.stats.accepted + result.stats.steps == len(result.token_ids) - 1
    assert sum(s.n_accepted for s in steps) >= result.stats.accepted > 0
    assert sum(s.n_accepted + 1 for s in steps) >= len(result.token_ids) - 1
    rec = RecordingVerifier(StrictGreedyVerifier())
    with pytest.raises(AttributeError):
        rec.stats                                  # the inner verifier has none: the engine sees none
