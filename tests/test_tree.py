"""Token trees: construction from weighted chains, budgets, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decoding.tree import TokenTree


def test_chain_and_root():
    t = TokenTree.chain(5, [6, 7])
    assert t.tokens == (5, 6, 7) and t.parents == (-1, 0, 1) and t.is_chain()
    assert t.depths == (0, 1, 2) and t.n_draft == 2
    assert TokenTree.root_only(3).n_draft == 0


def test_from_chains_merges_prefixes_and_orders_by_weight():
    t = TokenTree.from_chains(1, [([2, 3, 4], 5), ([2, 3, 9], 3), ([7], 1)], budget=64)
    assert t.tokens[0] == 1 and len(t) == 6
    two = t.child(0, 2)
    assert two is not None and t.child(0, 7) is not None
    three = t.child(two, 3)
    assert t.child(three, 4) is not None and t.child(three, 9) is not None
    # The heavier child comes first in the node order.
    assert list(t.children(0)) == [2, 7]


def test_budget_keeps_heaviest_connected_nodes():
    chains = [([2, 3, 4, 5], 10), ([2, 8], 4), ([6], 3), ([2, 3, 9], 2)]
    t = TokenTree.from_chains(1, chains, budget=3)
    assert t.n_draft == 3
    assert t.path_tokens([0, 1, 2, 3]) == [1, 2, 3, 4]  # the heavy chain, depth-first kept whole
    for i in range(1, len(t)):
        assert 0 <= t.parents[i] < i
    assert TokenTree.from_chains(1, chains, budget=0).n_draft == 0


def test_ancestor_mask_and_bias():
    t = TokenTree((1, 2, 3, 4), (-1, 0, 0, 1))
    m = t.ancestor_mask()
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=bool)
    assert (m == expected).all()
    bias = t.attention_bias(5, torch.float32)
    assert bias.shape == (1, 1, 4, 9)
    assert (bias[0, 0, :, :5] == 0).all()
    assert (bias[0, 0, :, 5:] == 0).numpy().tolist() == expected.tolist()


@pytest.mark.parametrize("tokens,parents", [((1, 2), (0, 0)), ((1, 2, 3), (-1, 2, 0)), ((1, 2, 2), (-1, 0, 0)),
                                            ((1,), ())])
def test_invalid_trees_are_refused(tokens, parents):
    with pytest.raises(ValueError):
        TokenTree(tokens, parents)
