"""The lean Llama forward (decoding/lean_forward.py) gives the transformers forward's bits.

The same model runs through both (``SENSE_LEAN_FORWARD=0`` keeps transformers' forward) and every
logit and hidden state of a prefill, a tree verification, its commit and the chains that follow
must be bitwise equal, in float32 and bfloat16, for the layer whose hidden state drafts use. The
lean forward's RMSNorm and SiLU are its own fixed-order C code (decoding/kernels/invariant.c), so
the transformers side runs those two on the same code (everything else, the linears' rounding, the
rotary embedding, the residual adds, the cache, attention, is transformers' own); apart, the two
are checked against torch's within rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch

from decoding import invariant, lean_forward
from decoding.target import TargetModel
from decoding.tree import TokenTree
from tests.conftest import tiny_llama


def _same_norm_and_activation(model, monkeypatch):
    """transformers' forward of `model` with its RMSNorms and gated MLP activation on the lean
    forward's kernels (undone after the test)."""
    def norm(module):
        def forward(x):
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            return invariant.rmsnorm(flat, module, torch.empty_like(flat)).view_as(x)
        return forward

    gelu = model.config.model_type in lean_forward.GEMMA         # Gemma's gate: GELU-tanh

    def mlp(module):
        def forward(x):
            gu = (module.gate_up_proj(x) if hasattr(module, "gate_up_proj")
                  else torch.cat([module.gate_proj(x), module.up_proj(x)], dim=-1))
            flat = gu.reshape(-1, gu.shape[-1]).contiguous()
            act = (invariant.gelu_tanh_mul if gelu else invariant.silu_mul)(
                flat, torch.empty(flat.shape[0], flat.shape[1] // 2, dtype=flat.dtype))
            return module.down_proj(act.view(*x.shape[:-1], -1))
        return forward

    base = model.base_model
    monkeypatch.setattr(base.norm, "forward", norm(base.norm))
    for layer in base.layers:
        head_norms = [getattr(layer.self_attn, n) for n in ("q_norm", "k_norm") if hasattr(layer.self_attn, n)]
        for n in (*lean_forward._norms(layer), *head_norms):
            monkeypatch.setattr(n, "forward", norm(n))
        monkeypatch.setattr(layer.mlp, "forward", mlp(layer.mlp))


def _pair(model, monkeypatch, **kw):
    _same_norm_and_activation(model, monkeypatch)
    monkeypatch.setenv(lean_forward.ENV, "0")
    plain = TargetModel(model, None, **kw)
    monkeypatch.setenv(lean_forward.ENV, "1")
    lean = TargetModel(model, None, **kw)
    assert plain.lean is None and lean.lean is not None, (plain.lean_note, lean.lean_note)
    return plain, lean


def _session(target, prompt, vocab):
    """Prefill, a branching tree, a commit off the first branch, a chain, a root-only step."""
    outs = []
    state, out = target.prefill(prompt, all_logits=True)
    outs.append(out)
    tree = TokenTree((5 % vocab, 7 % vocab, 9 % vocab, 11 % vocab, 13 % vocab, 2 % vocab), (-1, 0, 0, 1, 1, 3))
    outs.append(target.verify(state, tree))
    target.commit(state, [0, 1, 4])
    outs.append(target.verify(state, TokenTree.chain(3 % vocab, [4 % vocab, 1 % vocab])))
    target.commit(state, [0, 1])
    outs.append(target.verify(state, TokenTree.root_only(1)))
    target.commit(state, [0])
    assert state.cache.get_seq_length() == state.n_committed == len(prompt) + 6
    return outs


def _assert_bitwise(a_outs, b_outs):
    for i, (a, b) in enumerate(zip(a_outs, b_outs)):
        assert torch.equal(a.logits, b.logits), (i, (a.logits - b.logits).abs().max())
        assert torch.equal(a.hidden, b.hidden), i


@pytest.mark.parametrize("one_call", [True, False], ids=["one-call", "per-step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden_layer", [-1, 0, 1, 2])
def test_tiny_llama_is_bitwise_the_transformers_forward(dtype, hidden_layer, one_call, monkeypatch):
    """Both ways of running the layers: all of them in one C call (sense_decoder_layers, the
    default) and one kernel call per step from Python."""
    model = tiny_llama(50, 3, 4.0).to(dtype)
    # A small first allocation, so the KV buffers grow (and copy) within the session.
    monkeypatch.setattr(lean_forward, "MIN_CAPACITY", 8)
    monkeypatch.setenv(lean_forward.ONE_CALL_ENV, "1" if one_call else "0")
    plain, lean = _pair(model, monkeypatch, hidden_layer=hidden_layer)
    assert (lean.lean.one_call is not None) == one_call
    prompt = [(7 * i + 3) % 50 for i in range(12)]
    _assert_bitwise(_session(plain, prompt, 50), _session(lean, prompt, 50))
    assert lean.kernels == "lean-" + plain.kernels


def test_qkv_bias_and_a_long_prefill_are_the_transformers_forward(monkeypatch):
    """A Qwen2-style model (biases on q, k and v), a prompt longer than the invariant kernels'
    row limit (without a prefix cache its prefill runs on SDPA and the large-row linear, as
    transformers' forward does; with one, on the invariant kernels: tests/test_prefix_cache.py)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()
    plain, lean = _pair(model, monkeypatch, prefix_cache_mb=0)
    prompt = [(5 * i + 1) % 64 for i in range(100)]
    _assert_bitwise(_session(plain, prompt, 64), _session(lean, prompt, 64))


@pytest.mark.parametrize("one_call", [True, False], ids=["one-call", "per-step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen3_head_norms_are_the_transformers_forward(dtype, one_call, monkeypatch):
    """Qwen3's attention RMS-norms each head of q and k before the rotary embedding (q_norm,
    k_norm): the lean forward runs them on q|k|v in place (the norms' weights random, q's and k's
    apart, so that a mix-up shows; heads x head size twice the hidden size, as in Qwen3's
    models) and gives the transformers forward's bits, a prefill of more rows than the kernels'
    limit (no prefix cache: the large-row path on both sides) included."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(-1.5, -0.5)
    model = model.to(dtype)
    assert lean_forward.unsupported(model) is None
    monkeypatch.setattr(model.model.layers[1].self_attn.k_norm, "variance_epsilon", 1e-5)
    assert lean_forward.unsupported(model) == "q/k norms that are not per-head RMSNorms of one epsilon"
    monkeypatch.undo()
    monkeypatch.setenv(lean_forward.ONE_CALL_ENV, "1" if one_call else "0")
    plain, lean = _pair(model, monkeypatch)
    assert (lean.lean.one_call is not None) == one_call
    prompt = [(7 * i + 3) % 64 for i in range(12)]
    _assert_bitwise(_session(plain, prompt, 64), _session(lean, prompt, 64))
    # past the kernels' row limit, without a prefix cache: SDPA and the large-row linear on both sides
    plain, lean = _pair(model, monkeypatch, prefix_cache_mb=0)
    prompt = [(5 * i + 1) % 64 for i in range(80)]
    _assert_bitwise(_session(plain, prompt, 64), _session(lean, prompt, 64))


def _gemma(arch: str, dtype: torch.dtype):
    """A random Gemma (1, 2 or 3) with a 16-token window in every other layer (2 and 3), Gemma 2's
    soft-capped scores and logits, and queries and keys scaled up 8x so that the scores reach
    the cap (at the initial weights' scale `cap * tanh(s / cap)` rounds to `s`); its norms'
    weights random (Gemma's norms multiply by 1 + w: zeros at init would hide a missing 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
    if arch == "gemma2":
        kw.update(sliding_window=16, attn_logit_softcapping=2.0, final_logit_softcapping=10.0, query_pre_attn_scalar=32)
    if arch == "gemma3_text":
        kw.update(sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2)
    config = AutoConfig.for_model(arch, **kw)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
            for n in lean_forward._norms(layer) + [getattr(layer.self_attn, a) for a in ("q_norm", "k_norm")
                                                   if hasattr(layer.self_attn, a)]:
                n.weight.uniform_(-0.5, 0.5)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3_text"])
def test_gemma_runs_on_the_lean_forward(arch, dtype, monkeypatch):
    """Gemma's layers on the lean forward: (1 + w) RMSNorms rounded once, the GELU-tanh gate,
    Gemma 2 and 3's norms of the attention's and the MLP's outputs before the residual adds,
    their windowed and global layers mixed (a list of visible keys per window), Gemma 3's rotary
    embedding per layer type and head norms, Gemma 2's soft-capped scores and logits. The
    transformers forward with its norms and gate on the same kernels gives the same bits (a
    session past the window, in trees); without them it is the same within rounding; requests
    batched in one forward get their lone bits; drafts decode as plain decoding does."""
    import copy

    from transformers import AutoModelForCausalLM

    from decoding.drafters import PromptLookupDrafter
    from decoding.engine import generate

    model = _gemma(arch, dtype)
    assert lean_forward.unsupported(model) is None
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(model.config)).to(dtype).eval()
    reference.load_state_dict(model.state_dict())        # transformers' own forward, its own kernels
    plain, lean = _pair(model, monkeypatch, prefix_cache_mb=0)
    windows = [16, None, 16, None] if arch != "gemma" else [None] * 4
    assert lean.lean.windows == windows and lean.lean.one_call is None
    prompt = [(37 * i + 11) % 512 for i in range(40)]
    a, b = _session(plain, prompt, 512), _session(lean, prompt, 512)
    _assert_bitwise(a, b)
    with torch.no_grad():
        ref = reference(torch.tensor([prompt])).logits[0].float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(b[0].logits, ref, atol=tol), (b[0].logits - ref).abs().max()
    # Requests batched in one forward (a tree and a chain) get their lone bits.
    trees = [TokenTree((5, 7, 9, 11), (-1, 0, 0, 1)), TokenTree.chain(3, [4, 1])]
    prompts = [prompt, [(3 * i + 2) % 512 for i in range(13)]]
    alone = [lean.verify(lean.prefill(p)[0], t) for p, t in zip(prompts, trees)]
    _assert_bitwise(alone, lean.verify_batch([lean.prefill(p)[0] for p in prompts], trees))
    ar = generate(lean, prompt, budget=0)
    pld = generate(lean, prompt, drafter=PromptLookupDrafter(), budget=8)
    assert pld.token_ids == ar.token_ids and pld.stats.accepted > 0
    # The hidden states of an inner layer (a dense datastore's keys), likewise.
    plain2, lean2 = _pair(model, monkeypatch, prefix_cache_mb=0, hidden_layer=2)
    _assert_bitwise(_session(plain2, prompt, 512), _session(lean2, prompt, 512))
    # With a prefix cache: a prompt whose first 30 tokens were prefilled before reuses them, and
    # its prefill is the whole prompt's, bitwise.
    cached = TargetModel(model, None)
    cached.prefill(prompt[:30])
    state, out = cached.prefill(prompt, all_logits=False)
    assert state.reused == 30
    _assert_bitwise([out], [lean.prefill(prompt)[1]])
    # Continuous batching: requests of several lengths decoded together equal each decoded alone.
    from decoding.config import SamplingParams
    from decoding.scheduler import generate_batch

    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    batch_prompts = [prompt, prompt[:25], [(11 * i + 5) % 512 for i in range(33)]]
    batched = generate_batch(lean, batch_prompts, params=params, drafters=[PromptLookupDrafter() for _ in batch_prompts])
    assert [r.token_ids for r in batched] == [generate(lean, p, params=params).token_ids for p in batch_prompts]
    # A Gemma whose MLP is not GELU-tanh keeps the transformers forward.
    monkeypatch.setattr(model.config, "hidden_activation", "gelu", raising=False)
    monkeypatch.setattr(model.config, "hidden_act", "gelu", raising=False)
    assert lean_forward.unsupported(model) == "a Gemma MLP activation of 'gelu', not gelu_pytorch_tanh"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_phi3_fused_projections_are_the_transformers_forward(dtype, monkeypatch):
    """Phi-3's q|k|v and gate|up are one linear each (qkv_proj, gate_up_proj): the lean forward
    packs them as they are and gives the transformers forward's bits; a partial rotary embedding
    (Phi-4-mini's) or a window narrower than the context keeps the transformers forward."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                        tie_word_embeddings=False)
    model = Phi3ForCausalLM(config).eval().to(dtype)
    assert lean_forward.unsupported(model) is None
    plain, lean = _pair(model, monkeypatch)
    prompt = [(7 * i + 3) % 64 for i in range(12)]
    _assert_bitwise(_session(plain, prompt, 64), _session(lean, prompt, 64))
    partial = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                         partial_rotary_factor=0.75)).eval()
    assert lean_forward.unsupported(partial) == "a rotary embedding on part of each head"
    # Phi-3-mini-4k attends through a window of 2,047 positions of its 4,096 (next test)
    windowed = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                          max_position_embeddings=4096, sliding_window=2047)).eval()
    assert lean_forward.unsupported(windowed) is None and lean_forward.sliding_window(windowed.config) == 2047
    windowed.config.sliding_window = 4096           # as wide as the context: hides nothing
    assert lean_forward.sliding_window(windowed.config) is None


@pytest.mark.parametrize("one_call", [True, False], ids=["one-call", "per-step"])
@pytest.mark.parametrize("arch", ["mistral", "phi3"])
def test_a_sliding_window_is_the_transformers_forward_past_it(arch, one_call, monkeypatch):
    """Mistral 7B v0.1 and Phi-3-mini-4k attend over a window narrower than their context: each
    row's visible keys stop at its window (a tree node's by its position), bitwise the transformers
    forward past the window (8 positions here: a 20-token prompt, trees, commits); a prefill longer
    than the invariant kernels' rows takes the window too (SDPA with its mask). Models whose layers
    mix windowed and full attention keep the transformers forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    extra = dict(pad_token_id=0) if arch == "phi3" else {}
    config = AutoConfig.for_model(arch, vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  sliding_window=8, tie_word_embeddings=False, **extra)
    model = AutoModelForCausalLM.from_config(config).eval()
    monkeypatch.setenv(lean_forward.ONE_CALL_ENV, "1" if one_call else "0")
    plain, lean = _pair(model, monkeypatch, prefix_cache_mb=0)
    assert lean.lean.window == 8 and plain._window == 8
    prompt = [(7 * i + 3) % 64 for i in range(20)]
    _assert_bitwise(_session(plain, prompt, 64), _session(lean, prompt, 64))
    # Without the window the same session differs (the test sees the window).
    wide = AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()     # (its own config)
    wide.load_state_dict(model.state_dict())
    wide.config.sliding_window = None
    _same_norm_and_activation(wide, monkeypatch)
    unwindowed = TargetModel(wide, None, prefix_cache_mb=0)
    assert unwindowed.lean is not None and unwindowed.lean.window is None
    assert not torch.equal(_session(unwindowed, prompt, 64)[1].logits, _session(lean, prompt, 64)[1].logits)
    # Requests batched in one forward (a tree and a chain, their own windows) get their lone bits.
    trees = [TokenTree((5, 7, 9, 11), (-1, 0, 0, 1)), TokenTree.chain(3, [4, 1])]
    prompts = [prompt, [(3 * i + 2) % 64 for i in range(13)]]
    alone = [lean.verify(lean.prefill(p)[0], t) for p, t in zip(prompts, trees)]
    batched = lean.verify_batch([lean.prefill(p)[0] for p in prompts], trees)
    _assert_bitwise(alone, batched)
    long = [(5 * i + 1) % 64 for i in range(100)]
    a, b = _session(plain, long, 64), _session(lean, long, 64)
    for x, y in zip(a, b):
        assert torch.allclose(x.logits, y.logits, atol=1e-4)
    mixed = AutoConfig.for_model("qwen2", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert lean_forward.unsupported(AutoModelForCausalLM.from_config(mixed).eval()) == \
        "sliding-window attention in some layers only"


def test_the_embedded_model_is_bitwise_the_transformers_forward(target, monkeypatch):
    plain, lean = _pair(target.model, monkeypatch)
    prompt = [(17 * i + 5) % target.vocab_size for i in range(40)]
    _assert_bitwise(_session(plain, prompt, target.vocab_size), _session(lean, prompt, target.vocab_size))


def test_a_head_size_the_kernels_do_not_tile_keeps_the_transformers_forward():
    """The kernels run whole 8-lane blocks of a head: a Llama with heads of 12 (or 20) runs on
    transformers' forward, with the right logits (on the lean forward it read past its rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, head_dim=12,
                                         max_position_embeddings=128)).eval()
    assert lean_forward.unsupported(model) == "a head size of 12, not a multiple of 8"
    target = TargetModel(model, None)
    assert target.lean is None
    prompt = [(7 * i + 3) % 64 for i in range(12)]
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1]
    _, out = target.prefill(prompt, reuse=False)
    assert torch.allclose(out.logits[-1], ref, atol=1e-5)


def test_other_architectures_keep_the_transformers_forward():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2)).eval()
    assert "gpt_neox is not a Llama-style decoder" in lean_forward.unsupported(neox)
    target = TargetModel(neox, None)
    assert target.lean is None and target.lean_note


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_norm_and_activation_kernels_are_torchs_within_rounding(dtype):
    """RMSNorm and silu(gate) * up on the lean forward's C code against transformers' modules:
    float32 within a few units in the last place, bfloat16 at most one bfloat16 step apart and
    nearly always the same bits; the tail of a width that is no multiple of 8 included."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    for width in (576, 100):
        norm = LlamaRMSNorm(width, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(width, generator=g))
        norm = norm.to(dtype)
        x = (3 * torch.randn(64, width, generator=g)).to(dtype)
        ours, theirs = invariant.rmsnorm(x, norm, torch.empty_like(x)), norm(x)
        gu = (4 * torch.randn(64, 2 * width, generator=g)).to(dtype)
        act = invariant.silu_mul(gu, torch.empty(64, width, dtype=dtype))
        ref = torch.nn.functional.silu(gu[:, :width]) * gu[:, width:]
        for a, b in ((ours, theirs), (act, ref)):
            a, b = a.float(), b.float()
            if dtype == torch.float32:
                assert torch.allclose(a, b, rtol=4e-6, atol=1e-6), (a - b).abs().max()
            else:
                step = b.abs().clamp_min(1e-3) * 2 ** -7           # one bfloat16 step at b
                assert ((a - b).abs() <= step).all(), (a - b).abs().max()
                assert (a == b).float().mean() > 0.97


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemmas_norm_and_activation_kernels_are_torchs_within_rounding(dtype):
    """Gemma's RMSNorm (x * inv * (1 + w) in float32, rounded once) and gelu_tanh(gate) * up on
    the lean forward's C code against transformers' modules: float32 within a few units in the
    last place (the GELU within a few of its output's scale: where the gate is very negative
    torch's 1 + tanh keeps few bits, the kernel's 2e / (1 + e) all of them), bfloat16 at most one
    bfloat16 step apart and nearly always the same bits (the gate's negative tail aside)."""
    from transformers.activations import ACT2FN
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    g = torch.Generator().manual_seed(0)
    for width in (640, 100):
        norm = GemmaRMSNorm(width, eps=1e-6)
        with torch.no_grad():
            norm.weight.copy_(0.5 * torch.randn(width, generator=g))
        norm = norm.to(dtype)
        assert invariant.offset_norm(norm)
        x = (3 * torch.randn(64, width, generator=g)).to(dtype)
        ours, theirs = invariant.rmsnorm(x, norm, torch.empty_like(x)).float(), norm(x).float()
        gu = (4 * torch.randn(64, 2 * width, generator=g)).to(dtype)
        act = invariant.gelu_tanh_mul(gu, torch.empty(64, width, dtype=dtype)).float()
        ref = (ACT2FN["gelu_pytorch_tanh"](gu[:, :width]) * gu[:, width:]).float()
        if dtype == torch.float32:
            assert torch.allclose(ours, theirs, rtol=4e-6, atol=1e-6), (ours - theirs).abs().max()
            assert torch.allclose(act, ref, rtol=4e-6, atol=2e-6), (act - ref).abs().max()
        else:
            for a, b in ((ours, theirs), (act, ref)):
                step = b.abs().clamp_min(1e-3) * 2 ** -7
                assert ((a - b).abs() <= step).all(), (a - b).abs().max()
            assert (ours == theirs).float().mean() > 0.97
            positive = gu[:, :width].float() > -2          # torch's tail aside
            assert (act == ref)[positive].float().mean() > 0.97
        one = invariant.gelu_tanh_mul(gu[:1].contiguous(), torch.empty(1, width, dtype=dtype))
        assert torch.equal(one[0].float(), act[0])          # a row's bits, whatever the rows beside it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_activation_is_the_same_bits_in_every_column(dtype):
    """A column's silu(gate) * up must not depend on where it stands in the row: on AVX-512 the
    row runs 16 lanes at a time and its last 8 columns (a width of 16k + 8) on the 8-lane path,
    which must give the same bits (the same operations lane for lane), inf, NaN and the exp's
    clamp included."""
    g = torch.Generator().manual_seed(1)
    width = 16 * 5 + 8
    vals = torch.tensor([0.0, -0.0, 1e-3, -1e-3, 7.5, -7.5, 90.0, -90.0, 3e38, -3e38,
                         float("inf"), -float("inf"), float("nan"), 0.7, -0.7, 20.0])
    for rep in range(8):
        gate = (torch.randn(8, generator=g) * 10 ** (rep % 4)) if rep < 6 else vals[8 * (rep - 6): 8 * (rep - 5)]
        up = torch.randn(8, generator=g) * 3
        gu = torch.randn(1, 2 * width, generator=g)
        for c0 in (0, 16, width - 8):             # 16-lane blocks, and the 8-lane tail
            gu[0, c0:c0 + 8], gu[0, width + c0:width + c0 + 8] = gate, up
        gu = gu.to(dtype)
        act = invariant.silu_mul(gu, torch.empty(1, width, dtype=dtype))
        bits = act.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)[0]
        assert torch.equal(bits[:8], bits[width - 8:]) and torch.equal(bits[16:24], bits[width - 8:])


def _exact_causal(q, keys, values, scale):
    """float64 causal attention: q [T, H, D], keys/values [G, T, D] -> [T, H * D]."""
    t, h, d = q.shape
    g = keys.shape[0]
    k = keys.double().repeat_interleave(h // g, 0)
    v = values.double().repeat_interleave(h // g, 0)
    s = torch.einsum("thd,hjd->htj", q.double(), k) * scale
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("htj,hjd->thd", s.softmax(-1), v).reshape(t, h * d)


@pytest.mark.skipif(not invariant.prefill_attention_ok(torch.bfloat16, 64),
                    reason="the blocked prefill attention needs AVX512-BF16")
@pytest.mark.parametrize("heads,groups,dim", [(9, 3, 64), (4, 1, 128), (2, 2, 32)])
def test_the_prefill_attention_is_as_accurate_as_sdpa(heads, groups, dim):
    """The blocked bfloat16 prefill kernel against float64 causal attention, beside torch's SDPA
    on the same bfloat16 inputs: errors of the same size (both round the result to bfloat16; the
    kernel also its probabilities), for lengths around its 16-row blocks; the cache's padding
    beyond the prompt is never read."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    scale = dim ** -0.5
    for t in (1, 15, 16, 17, 70, 300):
        qkv = (2 * torch.randn(t, (heads + 2 * groups) * dim, generator=g)).bfloat16()
        k_cache = torch.full((1, groups, t + 40, dim), float("nan")).bfloat16()
        v_cache = torch.full((1, groups, t + 40, dim), float("nan")).bfloat16()
        k_cache[0, :, :t] = qkv[:, heads * dim:(heads + groups) * dim].view(t, groups, dim).transpose(0, 1)
        v_cache[0, :, :t] = qkv[:, (heads + groups) * dim:].view(t, groups, dim).transpose(0, 1)
        out = torch.full((t, heads * dim), float("nan")).bfloat16()
        invariant.prefill_attention(qkv, k_cache, v_cache, heads, scale, out)
        q = qkv[:, :heads * dim].view(t, heads, dim)
        keys, values = k_cache[0, :, :t], v_cache[0, :, :t]
        exact = _exact_causal(q, keys, values, scale)
        sdpa = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], is_causal=True,
                                              scale=scale, enable_gqa=True)[0].transpose(0, 1).reshape(t, -1)
        ours_err, sdpa_err = (out.double() - exact).abs(), (sdpa.double() - exact).abs()
        assert ours_err.max() <= 1.5 * sdpa_err.max() + 1e-3, (t, ours_err.max(), sdpa_err.max())
        assert ours_err.mean() <= 1.1 * sdpa_err.mean() + 1e-5, (t, ours_err.mean(), sdpa_err.mean())


@pytest.mark.skipif(not invariant.prefill_attention_ok(torch.bfloat16, 64),
                    reason="the blocked prefill attention needs AVX512-BF16")
def test_a_long_bfloat16_prefill_takes_the_blocked_kernel_as_accurately_as_sdpa(target_bf16, monkeypatch):
    """A prompt beyond the invariant row limit on the embedded model in bfloat16: the prefill runs
    the blocked kernel (SDPA untouched), and its logits are as close as SDPA's to those of the
    same forward with its attention in float32."""
    import torch.nn.functional as F

    lean = target_bf16.lean
    assert lean is not None and lean.fast_prefill
    monkeypatch.setattr(target_bf16, "prefix_cache", None)     # with one, every prefill is invariant
    prompt = [(17 * i + 5) % target_bf16.vocab_size for i in range(3 * invariant.MAX_ROWS)]
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    _, fast = target_bf16.prefill(prompt, all_logits=True)
    assert not calls
    monkeypatch.setattr(lean, "fast_prefill", False)
    _, slow = target_bf16.prefill(prompt, all_logits=True)
    assert calls
    bf16_sdpa = lean._sdpa
    monkeypatch.setattr(lean, "_sdpa", lambda q, k, v: bf16_sdpa(q.float(), k.float(), v.float()).to(q.dtype))
    _, wide = target_bf16.prefill(prompt, all_logits=True)
    ours, theirs = (fast.logits - wide.logits).abs().mean(), (slow.logits - wide.logits).abs().mean()
    assert ours <= 1.25 * theirs, (ours, theirs)
    assert F.cosine_similarity(fast.hidden.float(), wide.hidden.float(), dim=-1).min() > 0.999
