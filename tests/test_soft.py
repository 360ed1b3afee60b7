"""Soft-gated verification: each gate on hand-built logits, where it must and must not accept."""

from __future__ import annotations

import math

import pytest
import torch

from decoding.config import SamplingParams
from decoding.errors import InvalidRequestError
from decoding.config import SoftGateConfig
from decoding.soft import SoftGatedVerifier, topk_entropy
from decoding.tree import TokenTree

V = 10


def logits_from(probs_by_node: list[dict[int, float]]) -> torch.Tensor:
    """[T, V] logits whose softmax puts the given mass on tokens (the rest shared evenly)."""
    rows = []
    for spec in probs_by_node:
        rest = (1.0 - sum(spec.values())) / (V - len(spec))
        p = torch.full((V,), rest)
        for t, v in spec.items():
            p[t] = v
        rows.append(torch.log(p))
    return torch.stack(rows)


UNCERTAIN = {1: 0.40, 2: 0.35, 3: 0.20}     # top-3 entropy ~1.03 nats
CONFIDENT = {1: 0.97}                        # top-3 entropy ~0.01


def chain_tree(first: int, rest: list[int]) -> TokenTree:
    """root -> first -> rest..., a single draft chain."""
    return TokenTree.chain(0, [first, *rest])


def greedy(**cfg) -> SoftGatedVerifier:
    return SoftGatedVerifier(SamplingParams(), SoftGateConfig(**cfg))


def test_entropy_of_topk():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert topk_entropy(p, 2) == pytest.approx(math.log(2))
    assert topk_entropy(torch.tensor([1.0, 0.0, 0.0]), 3) == pytest.approx(0.0, abs=1e-6)


def test_accepts_plausible_token_when_uncertain_and_window_agrees():
    # Root: target prefers 1, draft says 2 (in top-3, entropy high). After 2 the target agrees
    # natively with the next two draft tokens 5, 6 (window 3).
    tree = chain_tree(2, [5, 6])
    logits = logits_from([UNCERTAIN, {5: 0.9}, {6: 0.9}, {7: 0.9}])
    v = greedy(window=3)
    verdict = v.verify(tree, logits)
    assert verdict.path == [0, 1, 2, 3] and verdict.next_token == 7
    assert v.stats.window_pass == 1 and v.stats.soft_tokens == 3


def test_rejects_when_target_is_confident():
    tree = chain_tree(2, [5, 6])
    logits = logits_from([CONFIDENT, {5: 0.9}, {6: 0.9}, {7: 0.9}])
    v = greedy(window=3)
    verdict = v.verify(tree, logits)
    assert verdict.path == [0] and verdict.next_token == 1
    assert v.stats.mismatches == 1 and v.stats.entropy_pass == 0


def test_rejects_implausible_token():
    # Uncertain among 1, 2, 3, but the draft token 8 is outside the top-3 with a low ratio.
    tree = chain_tree(8, [5, 6])
    logits = logits_from([UNCERTAIN, {5: 0.9}, {6: 0.9}, {7: 0.9}])
    v = greedy(window=3)
    assert v.verify(tree, logits).path == [0]
    assert v.stats.entropy_pass == 1 and v.stats.plausible_pass == 0


def test_ratio_gate_admits_token_outside_topk():
    spec = {1: 0.30, 2: 0.26, 3: 0.25, 8: 0.17}   # 8 is 4th, ratio 0.57 >= lam 0.5
    tree = chain_tree(8, [5])
    logits = logits_from([spec, {5: 0.9}, {6: 0.9}])
    assert greedy(window=2, lam=0.5).verify(tree, logits).path == [0, 1, 2]
    assert greedy(window=2, lam=0.9).verify(tree, logits).path == [0]


def test_rejects_when_window_disagrees():
    tree = chain_tree(2, [5, 6])
    logits = logits_from([UNCERTAIN, {5: 0.9}, {9: 0.9}, {7: 0.9}])  # target wants 9, draft has 6
    v = greedy(window=3)
    verdict = v.verify(tree, logits)
    assert verdict.path == [0] and verdict.next_token == 1
    assert v.stats.plausible_pass == 1 and v.stats.window_pass == 0


def test_rejects_when_path_is_shorter_than_window():
    tree = chain_tree(2, [5])
    logits = logits_from([UNCERTAIN, {5: 0.9}, {6: 0.9}])
    assert greedy(window=6).verify(tree, logits).path == [0]


def test_strict_agreement_is_kept_and_soft_continues_deeper():
    # Target agrees with the first draft token natively, then a soft step at depth 1.
    tree = chain_tree(1, [3, 4])
    logits = logits_from([{1: 0.9}, UNCERTAIN, {4: 0.9}, {5: 0.9}])   # at node 1 target wants 1, draft 3
    v = greedy(window=2)
    assert v.verify(tree, logits).path == [0, 1, 2, 3]


def test_picks_most_probable_plausible_child():
    tree = TokenTree((0, 3, 2, 5, 6), (-1, 0, 0, 1, 2))
    logits = logits_from([UNCERTAIN, {5: 0.9}, {6: 0.9}, {7: 0.9}, {7: 0.9}])
    verdict = greedy(window=2).verify(tree, logits)
    assert verdict.path == [0, 2, 4]   # token 2 (p=.35) beats token 3 (p=.20)


SURE = 1 - 1e-6     # a node where the target (sampling at temperature 1) draws one token


def _sampled(tree: TokenTree, logits: torch.Tensor, seeds, window: int, **params):
    """Verdicts and stats of a sampling-mode verifier per seed (each seed: a fresh verifier)."""
    out = []
    for seed in seeds:
        v = SoftGatedVerifier(SamplingParams(temperature=1.0, seed=seed, **params), SoftGateConfig(window=window))
        out.append((v.verify(tree, logits), v.stats))
    return out


def test_sampling_mode_soft_accepts_through_the_gates():
    """Sampling, top_k=2: the target draws 1 or 2 at the root, the draft has only 2 (then 5, 6,
    which the target draws almost surely). Where the draw is 1, the gates must accept 2 softly
    (entropy of {.5, .4} renormalised ~0.69 >= 0.3, 2 in the top-k, the window agrees); where it
    is 2, strict acceptance takes it. Either way the whole chain is committed, and the soft path
    was taken for some seeds. Seeded runs repeat."""
    tree = chain_tree(2, [5, 6])
    logits = logits_from([{1: 0.5, 2: 0.4}, {5: SURE}, {6: SURE}, {7: SURE}])
    runs = _sampled(tree, logits, range(20), window=3, top_k=2)
    for verdict, stats in runs:
        assert verdict.path == [0, 1, 2, 3] and verdict.next_token == 7
        assert stats.mismatches == stats.entropy_pass == stats.plausible_pass == stats.window_pass
        assert stats.soft_tokens == 3 * stats.window_pass and stats.cosine_pass == 0
    soft = sum(stats.window_pass for _, stats in runs)
    assert 0 < soft < len(runs)                  # both the soft and the strict path were taken
    assert [v for v, _ in runs] == [v for v, _ in _sampled(tree, logits, range(20), window=3, top_k=2)]


def test_sampling_mode_soft_rejects_when_the_window_disagrees():
    """As above, but after 2 -> 5 the target draws 9, not the drafted 6: where the root draw is 1,
    the soft candidate 2 passes gates 1 and 2 and fails the window, so the step ends at the root
    with the target's own draw; where it is 2, the strict path stops at 5 (the target is sure
    there, so no soft step either)."""
    tree = chain_tree(2, [5, 6])
    logits = logits_from([{1: 0.5, 2: 0.4}, {5: SURE}, {9: SURE}, {7: SURE}])
    runs = _sampled(tree, logits, range(20), window=3, top_k=2)
    rejected = 0
    for verdict, stats in runs:
        assert stats.window_pass == stats.soft_tokens == 0
        if verdict.path == [0]:
            assert verdict.next_token == 1
            assert stats.mismatches == stats.entropy_pass == stats.plausible_pass == 1
            rejected += 1
        else:
            assert verdict.path == [0, 1, 2] and verdict.next_token == 9
            assert stats.mismatches == 1 and stats.entropy_pass == 0     # node 2: target sure
    assert 0 < rejected < len(runs)


@pytest.mark.parametrize("filt", [{"top_k": 2}, {"top_p": 0.01}, {"top_k": 1}])
def test_sampling_never_accepts_a_token_the_filter_removed(filt):
    """With top_k / top_p leaving fewer than the gate's top-3 tokens, torch.topk pads with
    zero-probability ties; a draft token among them has p(d) = 0 under the target's sampling
    distribution and must never be accepted. Every filtered-out token is drafted (so whichever
    ties topk returns, some are drafted) and window=1 (no window to fail), theta=0 (the entropy
    gate passes even when one token survives)."""
    from decoding.sampling import sampling_probs

    params = SamplingParams(temperature=1.0, **filt)
    allowed = set(torch.nonzero(sampling_probs(logits_from([UNCERTAIN])[0], params)).flatten().tolist())
    assert allowed and len(allowed) < 3
    drafted = [t for t in range(V) if t not in allowed]
    tree = TokenTree((0, *drafted), (-1,) + (0,) * len(drafted))
    logits = logits_from([UNCERTAIN] * len(tree))
    for seed in range(5):
        v = SoftGatedVerifier(SamplingParams(temperature=1.0, seed=seed, **filt),
                              SoftGateConfig(window=1, theta=0.0))
        verdict = v.verify(tree, logits)
        assert verdict.path == [0] and verdict.next_token in allowed
        assert v.stats.mismatches == v.stats.entropy_pass == 1
        assert v.stats.plausible_pass == v.stats.window_pass == 0


def test_entropy_gate_ignores_zero_probability_ties():
    """The top-k entropy is that of the tokens with p > 0 among the top k, in any dtype: zero
    ties must not turn it into NaN (NaN < theta is False, which would open the gate)."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert topk_entropy(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=dtype), 3) == pytest.approx(0.0, abs=1e-6)
        assert topk_entropy(torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=dtype), 3) == pytest.approx(math.log(2))
    # A confident filtered target (one token left) fails the gate: nothing is accepted.
    tree = chain_tree(2, [])
    v = SoftGatedVerifier(SamplingParams(), SoftGateConfig(window=1))
    half = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float16).log()
    half[0, 1] = 0.0                              # p = (0, 1, 0) in float16
    assert v._soft_candidate(tree, 0, half.softmax(-1)) is None and v.stats.entropy_pass == 0


@pytest.mark.parametrize("kwargs", [{"theta": -1}, {"theta": math.nan}, {"top_k": 1}, {"lam": 0},
                                    {"lam": 1.5}, {"window": 0}])
def test_bad_options(kwargs):
    with pytest.raises(InvalidRequestError):
        SoftGateConfig(**kwargs)


# -- the cosine stand-in: a window the tree cuts short ------------------------------------------

class _Identity:
    """A key transform that only L2-normalises (the anchors below are unit vectors)."""

    def __call__(self, h):
        import numpy as np

        h = np.asarray(h, dtype=np.float32)
        return h / np.linalg.norm(h, axis=-1, keepdims=True)


def _anchored(tree: TokenTree, node: int, key) -> TokenTree:
    import numpy as np

    anchors = np.full((len(tree), len(key)), np.nan, dtype=np.float32)
    anchors[node] = key
    return TokenTree(tree.tokens, tree.parents, anchor_keys=anchors)


def _hidden(rows: int, node: int, vec) -> torch.Tensor:
    h = torch.zeros(rows, len(vec))
    h[:, 0] = 1.0
    h[node] = torch.tensor(vec, dtype=torch.float32)
    return h


def test_cosine_stands_in_where_the_draft_ends_inside_the_window():
    """d = 2 is plausible, the only token after it agrees, but the window wants 3 tokens: the
    target's state after d close to d's anchor key (cosine 0.96 >= 0.9) accepts; far (0.6)
    or without an anchor, it rejects as before."""
    import numpy as np

    base = chain_tree(2, [5])
    logits = logits_from([UNCERTAIN, {5: 0.9}, {6: 0.9}])
    key = np.array([0.6, 0.8, 0.0], dtype=np.float32)
    close = _hidden(3, 1, [0.8, 0.6, 0.0])          # cosine with key: 0.96
    far = _hidden(3, 1, [1.0, 0.0, 0.0])            # 0.6
    tree = _anchored(base, 1, key)

    v = SoftGatedVerifier(SamplingParams(), SoftGateConfig(window=3, tau=0.9), transform=_Identity())
    verdict = v.verify(tree, logits, close)
    assert verdict.path == [0, 1, 2] and verdict.next_token == 6
    assert v.stats.cosine_pass == 1 and v.stats.window_pass == 1 and v.stats.soft_tokens == 2

    v = SoftGatedVerifier(SamplingParams(), SoftGateConfig(window=3, tau=0.9), transform=_Identity())
    assert v.verify(tree, logits, far).path == [0] and v.stats.cosine_pass == 0
    v = SoftGatedVerifier(SamplingParams(), SoftGateConfig(window=3, tau=0.9), transform=_Identity())
    assert v.verify(base, logits, close).path == [0]                           # no anchors
    v = SoftGatedVerifier(SamplingParams(), SoftGateConfig(window=3, tau=None), transform=_Identity())
    assert v.verify(tree, logits, close).path == [0]                           # stand-in off
    v = SoftGatedVerifier(SamplingParams(), SoftGateConfig(window=3, tau=0.9))
    assert v.verify(tree, logits, close).path == [0]                           # no transform


def test_cosine_never_overrides_a_disagreement():
    """The target disagrees with the token after d (the draft continues, differently): evidence of
    an error, so even a perfect cosine does not accept."""
    import numpy as np

    key = np.array([0.6, 0.8, 0.0], dtype=np.float32)
    tree = _anchored(chain_tree(2, [5, 6]), 1, key)
    logits = logits_from([UNCERTAIN, {5: 0.9}, {9: 0.9}, {7: 0.9}])
    v = SoftGatedVerifier(SamplingParams(), SoftGateConfig(window=4, tau=0.5), transform=_Identity())
    assert v.verify(tree, logits, _hidden(4, 1, [0.6, 0.8, 0.0])).path == [0]


def test_trie_nodes_take_the_heaviest_chains_anchor():
    import numpy as np

    a = np.array([[1, 0], [0, 1]], dtype=np.float32)
    b = np.array([[0, 1], [np.nan, np.nan]], dtype=np.float32)
    tree = TokenTree.from_chains(0, [([4, 5], 1.0), ([4, 6], 3.0), ([7], 2.0)], budget=4, keys=[a, b, None])
    by_token = {tree.tokens[i]: tree.anchor_keys[i] for i in range(1, len(tree))}
    assert by_token[4].tolist() == [0, 1]            # the heavier chain (weight 3) through 4
    assert by_token[5].tolist() == [0, 1]
    assert np.isnan(by_token[6]).all() and np.isnan(by_token[7]).all()
    assert np.isnan(tree.anchor_keys[0]).all()
    with pytest.raises(ValueError, match="key arrays"):
        TokenTree.from_chains(0, [([4], 1.0)], budget=2, keys=[a, b])
