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


def test_main_chain_follows_the_heaviest_child_from_the_root():
    """For a target that verifies chains only: the best path of a drafted tree, ranked along it
    (so its budgets still cut it), with the nodes' weights and sources; a chain is itself."""
    t = TokenTree.from_chains(1, [([2, 3, 4], 5), ([2, 3, 9], 3), ([2, 8], 2), ([7], 1)], budget=64,
                              labels=["pld", "dense", "dense", "pld"])
    c = t.main_chain()
    assert c.is_chain() and c.tokens == (1, 2, 3, 4) and c.ranks == (-1, 0, 1, 2)
    n2 = t.child(0, 2)
    n3 = t.child(n2, 3)
    n4 = t.child(n3, 4)
    assert c.weights == (t.weights[0], t.weights[n2], t.weights[n3], t.weights[n4])
    assert c.sources == (t.sources[0], t.sources[n2], t.sources[n3], t.sources[n4])
    assert c.cut(2).tokens == (1, 2, 3)
    chain = TokenTree.chain(5, [6, 7])
    assert chain.main_chain() is chain and TokenTree.root_only(3).main_chain().tokens == (3,)


@pytest.mark.parametrize("seed", range(40))
def test_best_first_merge_equals_the_whole_trie_cut_to_budget(seed):
    """Random chains over few tokens (shared prefixes, equal weights, chains of every length):
    the kept nodes, their order, ranks, sources and anchor keys are those of the whole trie."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    chains = [(rng.integers(0, 3, int(rng.integers(0, 7))).tolist(),
               float(rng.choice([0.5, 1.0, 2.0])) if seed % 2 else float(rng.random())) for _ in range(n)]
    labels = [str(rng.choice(["pld", "rest", "dense", "dynamic"])) for _ in range(n)]
    keys = [None if rng.random() < 0.3 else rng.random((int(rng.integers(0, 7)), 4)).astype(np.float32)
            for _ in range(n)]
    for budget in (0, 1, 3, 8, 64):
        t = TokenTree.from_chains(9, chains, budget, labels, keys)
        tokens, parents, ranks, sources, anchor = trie_reference(9, chains, budget, labels, keys)
        assert (t.tokens, t.parents, t.ranks, t.sources) == (tokens, parents, ranks, sources)
        assert (t.anchor_keys is None) == (anchor is None)
        if anchor is not None:
            np.testing.assert_array_equal(t.anchor_keys, anchor)
        plain = TokenTree.from_chains(9, chains, budget)
        assert (plain.tokens, plain.parents, plain.ranks) == (tokens, parents, ranks)


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


def trie_reference(root, chains, budget, labels=None, keys=None):
    """The whole weighted trie, sorted and cut to `budget`: the plain definition that
    ``TokenTree.from_chains`` (best-first, without building the trie) must reproduce."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    chain_bits: list[int] | None = None          # per chain, when several proposers are named
    chains = list(chains)
    if keys is not None and len(keys) != len(chains):
        raise ValueError(f"{len(keys)} key arrays for {len(chains)} chains")
    keyed = keys is not None and any(k is not None for k in keys)
    best_key: dict[int, tuple[float, object]] = {}     # trie node -> (chain weight, key row)
    if labels is not None:
        if len(labels) != len(chains):
            raise ValueError(f"{len(labels)} labels for {len(chains)} chains")
        names = sorted(set(labels))
        bit = {name: 1 << j for j, name in enumerate(names)}
        chain_bits = [bit[name] for name in labels] if len(names) > 1 else None
    node_bits: list[int] = [0]
    trie: list[dict[int, int]] = [{}]
    weight: list[float] = [0.0]
    depth: list[int] = [0]
    node_token: list[int] = [root]
    node_parent: list[int] = [-1]
    for c, (chain, w) in enumerate(chains):
        node = 0
        for tok in chain:
            tok = int(tok)
            nxt = trie[node].get(tok)
            if nxt is None:
                nxt = len(trie)
                trie[node][tok] = nxt
                trie.append({})
                weight.append(0.0)
                depth.append(depth[node] + 1)
                node_token.append(tok)
                node_parent.append(node)
                node_bits.append(0)
            weight[nxt] += float(w)
            if chain_bits is not None:
                node_bits[nxt] |= chain_bits[c]
            if keyed and keys[c] is not None:
                j = depth[nxt] - 1
                if j < len(keys[c]) and (nxt not in best_key or best_key[nxt][0] < w):
                    best_key[nxt] = (float(w), keys[c][j])
            node = nxt
    order = sorted(range(1, len(trie)), key=lambda i: (-weight[i], depth[i], i))[:budget]
    keep = set(order)
    rank_of = {old: r for r, old in enumerate(order)}
    # Re-emit kept nodes in BFS order from the root so parents precede children.
    tokens, parents, ranks, new_index, kept = [root], [-1], [-1], {0: 0}, [0]
    frontier = [0]
    while frontier:
        nxt_frontier = []
        for old in frontier:
            kids = sorted((c for c in trie[old].values() if c in keep), key=lambda c: (-weight[c], c))
            for c in kids:
                new_index[c] = len(tokens)
                tokens.append(node_token[c])
                parents.append(new_index[old])
                ranks.append(rank_of[c])
                kept.append(c)
                nxt_frontier.append(c)
        frontier = nxt_frontier
    sources = None
    if labels is not None:
        if chain_bits is None:          # one proposer: every draft node is its
            sources = ((),) + (tuple(names),) * (len(tokens) - 1)
        else:
            sources = ((),) + tuple(tuple(n for n in names if node_bits[c] & bit[n]) for c in kept[1:])
    anchor = None
    if keyed and best_key:
        d = len(next(iter(best_key.values()))[1])
        anchor = np.full((len(tokens), d), np.nan, dtype=np.float32)
        for new, old in enumerate(kept):
            if old in best_key:
                anchor[new] = best_key[old][1]
    return tuple(tokens), tuple(parents), tuple(ranks), sources, anchor



@pytest.mark.parametrize("seed", range(12))
def test_a_cut_tree_is_the_tree_of_the_smaller_budget(seed):
    """``cut(k)`` of a drafted tree keeps exactly what ``from_chains`` with budget k builds: nodes,
    order, ranks, sources, anchor keys and weights (a node's weight: the chains through it)."""
    rng = np.random.default_rng(seed)
    chains = [(rng.integers(0, 3, int(rng.integers(0, 7))).tolist(), float(rng.random())) for _ in range(30)]
    labels = [str(rng.choice(["pld", "rest", "dense"])) for _ in chains]
    keys = [rng.random((len(c), 4)).astype(np.float32) for c, _ in chains]
    full = TokenTree.from_chains(9, chains, 16, labels, keys)
    assert full.weights[0] == pytest.approx(sum(w for _, w in chains))
    for i in range(1, len(full)):
        prefix = [full.tokens[j] for j in _path_to(full, i)]
        assert full.weights[i] == pytest.approx(sum(w for c, w in chains if c[:len(prefix)] == prefix))
    assert full.cut(40) is full
    for k in (0, 1, 3, 8, 16):
        small, cut = TokenTree.from_chains(9, chains, k, labels, keys), full.cut(k)
        assert (cut.tokens, cut.parents, cut.ranks, cut.sources, cut.weights) == \
            (small.tokens, small.parents, small.ranks, small.sources, small.weights)
        np.testing.assert_array_equal(cut.anchor_keys, small.anchor_keys)


def _path_to(tree, i):
    path = []
    while i > 0:
        path.append(i)
        i = tree.parents[i]
    return path[::-1]
