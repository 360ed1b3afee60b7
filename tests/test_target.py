"""The target wrapper: tree verification and KV commit agree with fresh prefills."""

from __future__ import annotations

import pytest
import torch

from decoding.target import TargetModel
from decoding.tree import TokenTree

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018]


def fresh_logits(target: TargetModel, ids: list[int]) -> torch.Tensor:
    _, out = target.prefill(ids, all_logits=True)
    return out.logits


def test_prefill_shapes(target):
    state, out = target.prefill(PROMPT, all_logits=True)
    assert out.logits.shape == (len(PROMPT), target.vocab_size)
    assert out.hidden.shape == (len(PROMPT), target.config.hidden_size)
    assert state.n_committed == len(PROMPT)
    _, last = target.prefill(PROMPT)
    assert torch.allclose(last.logits[0], out.logits[-1], atol=1e-4)


def test_tree_logits_equal_prefill_of_each_path(target):
    """Every node's logits equal those of a plain prefill of its root-to-node path."""
    tree = TokenTree((PROMPT[-1] + 1, 100, 200, 300, 400, 500, 600),
                     (-1, 0, 0, 1, 1, 2, 5))
    state, _ = target.prefill(PROMPT)
    out = target.verify(state, tree)
    assert out.logits.shape == (len(tree), target.vocab_size)
    for node in range(len(tree)):
        path, n = [], node
        while n >= 0:
            path.append(tree.tokens[n])
            n = tree.parents[n]
        ref = fresh_logits(target, PROMPT + path[::-1])[-1]
        assert torch.allclose(out.logits[node], ref, atol=1e-4), node


@pytest.mark.parametrize("path", [[0], [0, 1], [0, 2, 5], [0, 2, 5, 6], [0, 1, 3]])
def test_commit_then_decode_equals_fresh_prefill(target, path):
    """After committing a (possibly non-contiguous) path, the cache is that of the committed tokens."""
    tree = TokenTree((PROMPT[-1] + 1, 100, 200, 300, 400, 500, 600), (-1, 0, 0, 1, 1, 2, 5))
    state, _ = target.prefill(PROMPT)
    target.verify(state, tree)
    target.commit(state, path)
    committed = PROMPT + [tree.tokens[i] for i in path]
    assert state.n_committed == len(committed)
    assert state.cache.get_seq_length() == len(committed)
    # Next step: a small tree after the committed path, compared with a fresh prefill.
    nxt = TokenTree((42, 43, 44), (-1, 0, 0))
    out = target.verify(state, nxt)
    for node, tokens in ((0, [42]), (1, [42, 43]), (2, [42, 44])):
        ref = fresh_logits(target, committed + tokens)[-1]
        assert torch.allclose(out.logits[node], ref, atol=1e-4), (path, node)


def test_many_commits_equal_fresh_prefill(target):
    """A long run of verify/commit steps with branching trees keeps the cache exact."""
    gen = torch.Generator().manual_seed(0)
    state, _ = target.prefill(PROMPT)
    committed = list(PROMPT)
    for step in range(8):
        toks = torch.randint(100, 40000, (6,), generator=gen).tolist()
        tree = TokenTree(tuple(toks), (-1, 0, 0, 1, 2, 4))
        out = target.verify(state, tree)
        path = [[0], [0, 1, 3], [0, 2, 4, 5], [0, 2]][step % 4]
        target.commit(state, path)
        committed += [tree.tokens[i] for i in path]
        last = out.logits[path[-1]]
        ref = fresh_logits(target, committed)[-1]
        assert torch.allclose(last, ref, atol=1e-4), step
    assert state.cache.get_seq_length() == len(committed)


def test_hidden_states_of_verify_match_prefill(target):
    state, _ = target.prefill(PROMPT)
    tree = TokenTree.chain(7, [8, 9])
    out = target.verify(state, tree)
    _, ref = target.prefill(PROMPT + [7, 8, 9])
    assert torch.allclose(out.hidden, ref.hidden[-3:], atol=1e-4)


def test_intermediate_layer_hidden_states():
    from tests.conftest import tiny_llama

    model = tiny_llama()
    t = TargetModel(model, None, hidden_layer=1)
    _, out = t.prefill([0, 1, 2, 3])
    with torch.inference_mode():
        ref = model(torch.tensor([[0, 1, 2, 3]]), output_hidden_states=True).hidden_states[1][0]
    assert torch.allclose(out.hidden, ref, atol=1e-5)


def test_commit_rejects_a_non_path(target):
    state, _ = target.prefill(PROMPT)
    target.verify(state, TokenTree((5, 6, 7), (-1, 0, 0)))
    with pytest.raises(ValueError):
        target.commit(state, [0, 2, 1])
    with pytest.raises(ValueError):
        target.commit(state, [1])


@pytest.mark.parametrize("arch", ["qwen2", "gemma"])
def test_other_architectures_same_path(arch):
    """Qwen2 and Gemma go through the same wrapper (random small models; no weights download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(config).eval()
    t = TargetModel(model, None)
    prompt = [3, 5, 7, 11, 13]
    state, _ = t.prefill(prompt)
    tree = TokenTree((17, 19, 23, 29), (-1, 0, 0, 2))
    out = t.verify(state, tree)
    t.commit(state, [0, 2, 3])
    _, ref = t.prefill(prompt + [17, 23, 29], all_logits=True)
    assert torch.allclose(out.logits[3], ref.logits[-1], atol=1e-4)
    nxt = t.verify(state, TokenTree.root_only(31))
    _, ref2 = t.prefill(prompt + [17, 23, 29, 31])
    assert torch.allclose(nxt.logits[0], ref2.logits[-1], atol=1e-4)


@pytest.mark.parametrize("invariant_forward", [None, False], ids=["invariant", "stock"])
@pytest.mark.parametrize("arch", ["gemma3_text", "mistral"])
def test_a_sliding_window_model_decodes_with_drafts_past_its_window(arch, invariant_forward, monkeypatch):
    """Gemma 3's local layers and Mistral v0.1 attend over a sliding window. Past the window
    (16 tokens here, a 40-token prompt) verification must still crop the rejected drafts (the
    target keeps every position; transformers' sliding cache layer had dropped the oldest and
    refused to crop) and a tree's nodes must see only their window, as a chain's do: a sibling
    gets the logits of its own chain, and greedy decoding with drafts equals plain decoding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from decoding.drafters import PromptLookupDrafter
    from decoding.engine import generate

    from decoding import lean_forward

    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                                  max_position_embeddings=256)
    if arch == "gemma3_text":           # its lean forward: tests/test_lean_forward.py; here transformers'
        monkeypatch.setenv(lean_forward.ENV, "0")
    t = TargetModel(AutoModelForCausalLM.from_config(config).eval(), None, invariant_forward=invariant_forward)
    # Gemma 3 and the stock kernels on transformers' forward, Mistral on the lean forward
    assert (t.lean is None) == (arch == "gemma3_text" or invariant_forward is False)
    assert (t.lean.window if t.lean is not None else t._window) == 16
    prompt = [(37 * i + 11) % 512 for i in range(40)]
    state, _ = t.prefill(prompt)
    star = t.verify(state, TokenTree((17, 19, 23), (-1, 0, 0)))
    t.commit(state, [0, 2])
    state2, _ = t.prefill(prompt)
    chain = t.verify(state2, TokenTree.chain(17, [23]))
    assert torch.allclose(star.logits[2], chain.logits[1], atol=1e-5)
    if invariant_forward is None:
        assert torch.equal(star.logits[2], chain.logits[1])
    ar = generate(t, prompt, budget=0)
    pld = generate(t, prompt, drafter=PromptLookupDrafter(), budget=8)
    assert pld.stats.accepted > 0
    if invariant_forward is None:       # (the stock kernels are exact only up to their rounding)
        assert pld.token_ids == ar.token_ids


# Small random models of other families (no download): the config's own sizes, vocabulary 512.
_FAMILIES = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                max_position_embeddings=256),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256),
    "phi": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False),
    "falcon-alibi": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False,
                         alibi=True),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "mistral-sliding-window": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256, sliding_window=16),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
}
# Where the invariant forward cannot run, and why (the target must say so, not claim it).
_NOT_INVARIANT = {"falcon-alibi": "ALiBi", "bloom": "AttentionInterface"}


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_other_families_verify_what_their_own_forward_computes(family):
    """A chain verified after a 40-token prompt (past a sliding window of 16) gets the logits of
    the model's own forward over prompt + chain, family by family: Conv1D linears (GPT-2),
    parallel attention (Falcon, Phi, GPT-NeoX), partial rotary, q/k norms (Qwen3), a sliding
    window, and ALiBi biases folded into the mask (Falcon), which the invariant attention cannot
    take: those models run the stock forward and the target says why."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family.split("-")[0], vocab_size=512, **_FAMILIES[family])
    model = AutoModelForCausalLM.from_config(config).eval()
    reference = copy.deepcopy(model)
    t = TargetModel(model, None)
    if family in _NOT_INVARIANT:
        assert not t.invariant and _NOT_INVARIANT[family] in t.invariant_note
    else:
        assert t.invariant, t.invariant_note
    prompt, chain = [(37 * i + 11) % 512 for i in range(40)], [(7 * i + 3) % 512 for i in range(6)]
    state, _ = t.prefill(prompt)
    out = t.verify(state, TokenTree.chain(chain[0], chain[1:]))
    with torch.no_grad():
        ref = reference(torch.tensor([prompt + chain])).logits[0, len(prompt):]
    torch.testing.assert_close(out.logits.float(), ref.float(), rtol=0, atol=1e-5)


def test_a_bias_in_the_attention_mask_goes_to_sdpa():
    """The invariant attention takes a mask as visibility only: a mask that carries an additive
    bias (ALiBi's) is run by SDPA instead, so a model routed onto the invariant kernels anyway
    still computes its own forward (it read 0.4 off in the logits before)."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    from decoding import invariant

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "falcon", vocab_size=512, **_FAMILIES["falcon-alibi"])).eval()
    reference = copy.deepcopy(model)
    invariant.install(model)
    ids = torch.tensor([[(37 * i + 11) % 512 for i in range(40)]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_a_model_that_takes_no_tree_mask_verifies_each_steps_best_path():
    """BLOOM builds its ALiBi from a 2-D mask and cannot take a tree's: the target finds that out
    at load (``takes_trees``), and the engine verifies each step's best path instead of failing
    mid-generation (it raised on the first drafted tree before). Models that take tree masks
    keep their trees."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from decoding.config import SamplingParams
    from decoding.engine import generate
    from decoding.methods import make_drafter

    torch.manual_seed(0)
    bloom = TargetModel(AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "bloom", vocab_size=512, **_FAMILIES["bloom"])).eval(), None)
    assert not bloom.takes_trees
    prompt = [(37 * i + 11) % 512 for i in range(12)] * 3          # repeats, for prompt lookup
    out = generate(bloom, prompt, params=SamplingParams(max_new_tokens=24), drafter=make_drafter("pld"))
    assert len(out.token_ids) == 24 and out.stats.drafted > 0
    for family in ("gpt2", "falcon"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, vocab_size=512, **_FAMILIES[family]))
        assert TargetModel(model.eval(), None).takes_trees, family
