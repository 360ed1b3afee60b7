"""Batch invariance: a row's result does not depend on how many rows share the forward.

Kernel level (decoding/kernels/invariant.c through decoding/invariant/), then the whole target:
a token's logits and hidden state verified alone, beside 1, 3, 15 and 63 other tree nodes, and
along a chain against one-token autoregressive steps, bitwise, in float32 and bfloat16. Before
the invariant kernels none of these held in either dtype (bench/results/invariance.md).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from decoding import invariant
from decoding.invariant import attention_ops
from decoding.invariant import tuning
from decoding import measured as measured_mod
from decoding.tree import TokenTree

ROW_COUNTS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 16, 64)     # every block shape and split
DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if invariant.library() is None:
        pytest.fail(f"the invariant kernels did not build: {invariant.unavailable_reason()}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (50, 13), (17, 1536)])
def test_linear_rows_are_independent_of_the_row_count(shape, dtype):
    n, k = shape
    gen = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(64, k, generator=gen).to(dtype)
    packed = invariant.PackedWeight(w)
    one = torch.cat([packed(x[i:i + 1]) for i in range(64)])
    for m in ROW_COUNTS:
        assert torch.equal(packed(x[:m]), one[:m]), f"{m} rows"
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    ref = F.linear(x.float(), w.float())
    assert torch.allclose(one.float(), ref, atol=tol * k ** 0.5, rtol=tol), "not the product"


def test_linear_bias_and_module_install():
    lin = torch.nn.Linear(40, 24)
    x = torch.randn(5, 40)
    want = lin(x)
    invariant.install_linears(lin)
    got = lin(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(lin(x[2:3]), got[2:3])
    with torch.no_grad():
        lin.weight.mul_(2)                       # an in-place update of the parameter repacks
    assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5)


def _attention(q, k, v, mask, softcap=None):
    module = torch.nn.Module()
    module.num_key_value_groups = q.shape[1] // k.shape[1]
    return invariant.attention_forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5, softcap=softcap)[0]


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h, g, d", [(6, 2, 64), (8, 2, 128), (10, 2, 32)], ids=["3x64", "4x128", "5x32-general"])
def test_attention_depends_only_on_the_visible_keys(dtype, h, g, d, softcap):
    """A query over a masked tree of T rows gets bitwise what it gets alone over exactly the keys
    it sees; and the result is attention (close to SDPA; with `softcap`, to the scores
    soft-capped as Gemma 2's eager attention caps them). Heads per group x head size: two shapes
    the kernel compiles as constants and one it runs on its general routine."""
    gen = torch.Generator().manual_seed(3)
    past = 37
    parents = (-1, 0, 0, 1, 1, 2, 5, 6)
    t = len(parents)
    q = torch.randn(1, h, t, d, generator=gen).to(dtype)
    k = torch.randn(1, g, past + t, d, generator=gen).to(dtype)
    v = torch.randn(1, g, past + t, d, generator=gen).to(dtype)
    allowed = torch.zeros(t, past + t, dtype=torch.bool)
    allowed[:, :past] = True
    for i, p in enumerate(parents):
        allowed[i, past + i] = True
        while p >= 0:
            allowed[i, past + p] = True
            p = parents[p]
    out = _attention(q, k, v, allowed[None, None], softcap)
    for i in range(t):
        keys = allowed[i].nonzero()[:, 0]
        alone = _attention(q[:, :, i:i + 1], k[:, :, keys], v[:, :, keys], None, softcap)
        assert torch.equal(out[:, i:i + 1], alone), f"row {i}"
    scores = q.float() @ k.float().repeat_interleave(h // g, 1).transpose(-1, -2) * d ** -0.5
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    ref = probs @ v.float().repeat_interleave(h // g, 1)
    if softcap:     # the cap changes the result (the test would not see a kernel that ignored it)
        assert not torch.allclose(out.float(), _attention(q, k, v, allowed[None, None]).float(), atol=1e-2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.float(), ref.transpose(1, 2), atol=tol)


def test_a_batchs_visibility_lists_are_each_requests_own_one_after_another():
    """``visible_csr_batch`` (one CSR list for a forward's requests, chains built for the whole
    batch at once) against each request's mask on its own: its cached prefix, then the causal
    triangle of a chain or a tree's ancestors, as ``_csr`` lists it; random mixes of chains and
    trees."""
    import random

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 6)
        starts = [rng.randint(0, 40) for _ in range(n)]
        sizes = [rng.randint(1, 9) for _ in range(n)]
        ancestors, masks = [], []
        for start, t in zip(starts, sizes):
            if rng.random() < 0.5:
                ancestors.append(None)
                own = torch.ones(t, t, dtype=torch.bool).tril()
            else:
                parents = [-1] + [rng.randint(0, i - 1) for i in range(1, t)]
                own = torch.zeros(t, t, dtype=torch.bool)
                for i in range(t):
                    j = i
                    while j >= 0:
                        own[i, j], j = True, parents[j]
                ancestors.append(own)
            masks.append(torch.cat([torch.ones(t, start, dtype=torch.bool), own], dim=1))
        rowptr, idx = invariant.visible_csr_batch(starts, sizes, ancestors)
        ref = [attention_ops._csr(m) for m in masks]
        offsets = torch.tensor([0] + [int(rp[-1]) for rp, _ in ref]).cumsum(0)
        want_rowptr = torch.cat([torch.zeros(1, dtype=torch.int32)] + [rp[1:] + o for (rp, _), o in zip(ref, offsets)])
        assert torch.equal(rowptr, want_rowptr.to(torch.int32))
        assert torch.equal(idx, torch.cat([ix for _, ix in ref]))
        assert rowptr.dtype == idx.dtype == torch.int32


def _with_prefix(target, text="Speculative decoding verifies a draft in one forward pass. " * 6):
    ids = target.tokenizer(text)["input_ids"][:70]
    state, out = target.prefill(ids)
    return state, int(out.logits[-1].argmax())


def _verify_and_drop(target, state, tree):
    out = target.verify(state, tree)
    target.commit(state, [0])
    state.cache.crop(-1)
    state.n_committed -= 1
    return out


@pytest.fixture(params=["float32", "bfloat16"])
def any_target(request, target, target_bf16):
    return target if request.param == "float32" else target_bf16


def test_targets_run_invariantly(any_target):
    assert any_target.invariant, any_target.invariant_note


@pytest.mark.parametrize("others", [1, 3, 15, 63])
def test_a_rows_logits_do_not_depend_on_the_other_rows(any_target, others):
    state, tok = _with_prefix(any_target)
    alone = _verify_and_drop(any_target, state, TokenTree.root_only(tok))
    chain = _verify_and_drop(any_target, state, TokenTree.chain(tok, [300 + i for i in range(others)]))
    star = _verify_and_drop(any_target, state, TokenTree((tok, *(500 + i for i in range(others))), (-1,) + (0,) * others))
    for out in (chain, star):
        assert torch.equal(out.logits[0], alone.logits[0])
        assert torch.equal(out.hidden[0], alone.hidden[0])


def test_a_verified_chain_equals_autoregressive_steps(any_target):
    """Every node of a chain (not only the root) gets the logits of its own one-token step."""
    state, tok = _with_prefix(any_target)
    draft = [1001, 2002, 3003, 4004, 5005]
    chain = _verify_and_drop(any_target, state, TokenTree.chain(tok, draft))
    for i, t in enumerate([tok, *draft]):
        step = any_target.verify(state, TokenTree.root_only(t))
        any_target.commit(state, [0])
        assert torch.equal(step.logits[0], chain.logits[i]), f"node {i}"
        assert torch.equal(step.hidden[0], chain.hidden[i]), f"node {i}"


def test_the_forward_is_bitwise_the_same_whatever_the_thread_count(any_target):
    """A request's bits do not depend on the intra-op threads (a replica of one thread answers as
    a replica of two, and a prompt cached by one is what the other would compute): every kernel
    gives each output element to one thread, which computes it in a fixed order. A prompt of more
    than MAX_ROWS positions (a prefill in pieces), then a tree's verification."""
    ids = any_target.tokenizer("Speculative decoding verifies a draft in one forward pass. " * 12)["input_ids"][:150]
    assert len(ids) > invariant.MAX_ROWS
    tree = TokenTree((5, 300, 301, 302, 400), (-1, 0, 1, 0, 3))
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (2, 1, 3):
            torch.set_num_threads(threads)
            state, pre = any_target.prefill(ids, reuse=False)
            out = any_target.verify(state, tree)
            outs.append((pre.logits, out.logits, out.hidden))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_gpt2_style_models_rows_do_not_depend_on_the_other_rows(dtype):
    """GPT-2's linear layers are transformers' ``Conv1D`` (weight [in, out]), not ``nn.Linear``:
    they take the invariant kernel too, so a row's logits and hidden state are the same bits
    alone, along a chain and beside 63 siblings (in float32 BLAS moved them by ~3e-7 between a
    1- and a 4-row forward). A random model from its config: no download."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    from decoding.target import TargetModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256))
    target = TargetModel(model.to(dtype).eval(), None)
    assert target.invariant, target.invariant_note
    convs = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert convs and all("_sense_packed" in m.__dict__ for m in convs)
    state, out = target.prefill([(37 * i + 11) % 512 for i in range(60)])
    tok = int(out.logits[-1].argmax())
    alone = _verify_and_drop(target, state, TokenTree.root_only(tok))
    for others in (1, 3, 15, 63):
        chain = _verify_and_drop(target, state, TokenTree.chain(tok, [(7 * i + 3) % 512 for i in range(others)]))
        star = _verify_and_drop(target, state, TokenTree((tok, *((5 * i + 1) % 512 for i in range(others))),
                                                         (-1,) + (0,) * others))
        for got in (chain, star):
            assert torch.equal(got.logits[0], alone.logits[0]), others
            assert torch.equal(got.hidden[0], alone.hidden[0]), others
    invariant.uninstall(model)
    assert not any("_sense_packed" in m.__dict__ or "forward" in m.__dict__ for m in convs)


def _gemma2(dtype):
    """A random Gemma 2 (soft-capped attention scores and logits, a window of 16 tokens in every
    other layer) and a copy of it on transformers' eager attention. Its queries and keys are
    scaled up 8x so that the scores reach the cap (2.0): at the initial weights' scale they stay
    far below it, where cap * tanh(s / cap) rounds to s, and no test would see the cap dropped."""
    import copy

    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=16,
                       attn_logit_softcapping=2.0, final_logit_softcapping=10.0, query_pre_attn_scalar=32)
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    model = model.to(dtype)
    eager = Gemma2ForCausalLM(copy.deepcopy(cfg)).to(dtype).eval()     # a config of its own: the
    eager.load_state_dict(model.state_dict())                           # target's install sets model's
    return model, eager


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_soft_capped_sliding_window_model_runs_invariantly(dtype, monkeypatch):
    """Gemma 2 soft-caps its attention scores (cap * tanh(s / cap)) and its logits, and attends
    over a sliding window in every other layer. The invariant attention caps the scores itself,
    so such a model runs invariantly: a row's logits and hidden state are the same bits alone,
    along a chain, beside 15 siblings and as its own one-token step, past the window; they are
    Gemma 2's (close to transformers' eager forward, which the model falls back to after
    uninstall); and greedy decoding with drafts equals autoregressive decoding. A random model
    from its config, a window of 16 tokens under a 60-token context: no download."""
    from decoding import lean_forward
    from decoding.drafters import PromptLookupDrafter
    from decoding.engine import generate
    from decoding.target import TargetModel

    monkeypatch.setenv(lean_forward.ENV, "0")       # transformers' forward (Gemma's lean one: test_lean_forward)
    model, eager = _gemma2(dtype)
    target = TargetModel(model, None)
    assert target.invariant, target.invariant_note
    assert eager.config._attn_implementation == "eager"      # the reference: transformers' own attention
    prompt = [(37 * i + 11) % 512 for i in range(40)]
    state, out = target.prefill(prompt)
    tok = int(out.logits[-1].argmax())
    alone = _verify_and_drop(target, state, TokenTree.root_only(tok))
    draft = [(7 * i + 3) % 512 for i in range(15)]
    chain = _verify_and_drop(target, state, TokenTree.chain(tok, draft))
    star = _verify_and_drop(target, state, TokenTree((tok, *((5 * i + 1) % 512 for i in range(15))), (-1,) + (0,) * 15))
    for got in (chain, star):
        assert torch.equal(got.logits[0], alone.logits[0])
        assert torch.equal(got.hidden[0], alone.hidden[0])
    with torch.no_grad():
        ref = eager(torch.tensor([prompt + [tok] + draft])).logits[0, len(prompt):].float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(chain.logits.float(), ref, atol=tol), (chain.logits.float() - ref).abs().max()
    for i, t in enumerate([tok, *draft]):
        step = target.verify(state, TokenTree.root_only(t))
        target.commit(state, [0])
        assert torch.equal(step.logits[0], chain.logits[i]), f"node {i}"
    ar = generate(target, prompt, budget=0)
    pld = generate(target, prompt, drafter=PromptLookupDrafter(), budget=8)
    assert pld.token_ids == ar.token_ids and pld.stats.accepted > 0
    invariant.uninstall(model)
    assert model.config._attn_implementation == "eager"      # SDPA would refuse the soft-capping


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_long_soft_capped_prefill_runs_the_models_own_eager_attention(dtype, monkeypatch):
    """A prompt of more than MAX_ROWS rows runs past the invariant attention (a prefill needs no
    invariance); SDPA cannot soft-cap, so a Gemma 2 prefill that long takes the eager attention
    of the model's own modeling file, cap included: its logits are transformers' eager forward's
    (a forward that dropped the cap is far from them), and decoding after it with drafts equals
    decoding without. A random model from its config, 100 prompt tokens, a window of 16."""
    import copy

    import transformers.models.gemma2.modeling_gemma2 as gemma2

    from decoding import lean_forward
    from decoding.drafters import PromptLookupDrafter
    from decoding.engine import generate
    from decoding.target import TargetModel

    monkeypatch.setenv(lean_forward.ENV, "0")       # transformers' forward (Gemma's lean one: test_lean_forward)
    model, eager = _gemma2(dtype)
    uncapped = copy.deepcopy(eager)
    for layer in uncapped.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    target = TargetModel(model, None)
    assert target.invariant, target.invariant_note
    prompt = [(37 * i + 11) % 512 for i in range(100)]
    assert len(prompt) > invariant.MAX_ROWS
    calls = []
    own = gemma2.eager_attention_forward
    monkeypatch.setattr(gemma2, "eager_attention_forward", lambda *a, **k: (calls.append(a[1].shape[2]), own(*a, **k))[1])
    _, out = target.prefill(prompt, all_logits=True)
    assert calls and set(calls) == {len(prompt)}      # every layer's prefill, on the model's own eager attention
    with torch.no_grad():
        ref = eager(torch.tensor([prompt])).logits[0].float()
        off = uncapped(torch.tensor([prompt])).logits[0].float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(out.logits.float(), ref, atol=tol), (out.logits.float() - ref).abs().max()
    assert (off - ref).abs().max() > 4 * tol             # the cap matters here: a forward without it would fail
    ar = generate(target, prompt, budget=0)
    pld = generate(target, prompt, drafter=PromptLookupDrafter(), budget=8)
    assert pld.token_ids == ar.token_ids and pld.stats.accepted > 0
    invariant.uninstall(model)


def test_a_model_with_its_own_attention_code_says_it_is_not_invariant():
    """BLOOM computes attention in its own code (not through transformers' AttentionInterface),
    so the invariant attention cannot replace it: the target says so (and a forced invariant
    forward is refused) instead of claiming an invariance its float32 rows do not have."""
    from transformers import BloomConfig, BloomForCausalLM

    from decoding.errors import InvalidRequestError
    from decoding.target import TargetModel

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4)).eval()
    target = TargetModel(model, None)
    assert not target.invariant and "AttentionInterface" in target.invariant_note
    with pytest.raises(InvalidRequestError, match="AttentionInterface"):
        TargetModel(BloomForCausalLM(BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4)).eval(), None,
                    invariant_forward=True)


def test_bfloat16_linears_take_the_avx512_bf16_kernel_where_the_cpu_has_it():
    """On a CPU with AVX512-BF16 the bfloat16 linears run on vdpbf16ps (pair-packed weights,
    twice the products per instruction); elsewhere on the widened-FMA kernel. Either way the rows
    are independent (the test above) and float32 keeps its kernel."""
    from decoding.measured import cpu_isa

    has = {"avx512f", "avx512_bf16"} <= set(cpu_isa())
    assert invariant.bf16_pairs() == has
    assert ("avx512bf16-dp" in invariant.kernel_isa()) == has
    w = torch.randn(40, 13)
    assert invariant.pack_panels(w).shape == (3, 13, 16)
    assert invariant.pack_panels(w.to(torch.bfloat16)).shape == ((3, 7, 16, 2) if has else (3, 13, 16))


def _bf16_kernels() -> list[str]:
    return ["dp", "amx"] if invariant.amx_available() else ["dp"] if invariant.bf16_pairs() else []


@pytest.mark.parametrize("kernel", ["dp", "amx"])
def test_each_bfloat16_kernel_gives_a_row_the_same_bits_whatever_the_rows_beside_it(kernel):
    """Both pair-packed bfloat16 kernels (vdpbf16ps vectors in blocks of 1-8 rows; AMX tiles of
    up to 16 rows, so 17 and 40 rows take a partial tile): a row's outputs are bitwise the same alone or among 2-63
    other rows, and within bfloat16 rounding of the float64 product. The process runs one of
    them (invariant.bf16_kernel); this checks the other too, where the CPU has it."""
    if kernel not in _bf16_kernels():
        pytest.skip(f"no {kernel} kernel on this CPU")
    g = torch.Generator().manual_seed(7)
    for n, k in ((200, 576), (96, 1536), (40, 64)):
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        packed = invariant.pack_panels(w)
        x = torch.randn(64, k, generator=g).to(torch.bfloat16)

        def run(rows: torch.Tensor) -> torch.Tensor:
            out = torch.empty(rows.shape[0], n, dtype=torch.float32)
            return invariant.linear_into(packed, rows.contiguous(), n, 2, out, logits=False, kernel=kernel)

        full = run(x)
        for rows in (1, 3, 5, 6, 8, 9, 13, 16, 17, 40):        # every block size of both kernels
            assert torch.equal(run(x[:rows]), full[:rows]), (kernel, n, k, rows)
        assert torch.equal(run(x[5:6]), full[5:6])
        ref = x.double() @ w.double().T
        assert torch.allclose(full.double(), ref, rtol=1e-4, atol=1e-3 * k ** 0.5)


def test_the_process_bfloat16_kernel_is_chosen_once_and_can_be_forced(tmp_path):
    """bf16_kernel(): "amx" or "dp", the same for the whole process; SENSE_BF16_KERNEL forces
    one (an unknown name, or amx without AMX, is a one-line error)."""
    import subprocess
    import sys

    code = "from decoding import invariant as i; print(i.bf16_kernel(), i.kernel_isa())"
    env = {**os.environ, "SENSE_CACHE_DIR": str(tmp_path)}
    for forced in _bf16_kernels():
        out = subprocess.run([sys.executable, "-c", code], env=env | {"SENSE_BF16_KERNEL": forced},
                             capture_output=True, text=True, check=True).stdout.split()
        assert out[0] == forced and out[1].endswith("+amx") == (forced == "amx")
    bad = subprocess.run([sys.executable, "-c", code], env=env | {"SENSE_BF16_KERNEL": "mkl"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "SENSE_BF16_KERNEL must be one of dp, amx" in bad.stderr
    assert invariant.bf16_kernel() in (_bf16_kernels() or ["dp"])


def test_the_large_row_kernel_is_measured_per_size_of_prefill(tmp_path, monkeypatch):
    """Prefills of up to 256 rows take the kernel measured at 128 rows, longer ones the kernel
    measured at 512: each measured once (cold weights, both kernels timed) and remembered on disk."""
    monkeypatch.setenv("SENSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_large", {})
    measured = []
    real = tuning._time_large_rows

    def timed(dtype, threads, rows):
        measured.append(rows)
        value = real(dtype, threads, rows, repeats=1)
        assert set(value) == {"ours_ms", "torch_ms"} and all(v > 0 for v in value.values())
        return value

    monkeypatch.setattr(tuning, "_time_large_rows", timed)
    for rows in (65, 200, 256, 257, 1000):
        assert invariant.large_rows_kernel(torch.bfloat16, 2, rows) in ("ours", "torch")
    assert measured == [128, 512]
    monkeypatch.setattr(tuning, "_large", {})          # a new process: read back from the disk
    assert invariant.large_rows_kernel(torch.bfloat16, 2, 100) in ("ours", "torch") and measured == [128, 512]
    assert len(list((tmp_path / "measured").glob("large_linear-*.json"))) == 2


def test_a_decisive_gap_ends_the_large_row_timing_early():
    """Two timings of each kernel decide when every one of the slower's is over DECISIVE times
    every one of the faster's, whichever kernel is the slower; one timing, or overlap, does not."""
    assert invariant.decisive({"ours": [1.0, 1.1], "torch": [7.5, 8.1]})
    assert invariant.decisive({"ours": [9.0, 8.0, 8.5], "torch": [1.2, 1.0, 1.1]})
    assert not invariant.decisive({"ours": [1.0], "torch": [9.0]})
    assert not invariant.decisive({"ours": [1.0, 1.3], "torch": [1.9, 2.0]})       # 1.3 x 1.5 > 1.9
    assert not invariant.decisive({"ours": [1.0, 1.1], "torch": [1.05, 1.2]})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefetching_changes_no_bits_is_measured_once_and_can_be_forced(tmp_path, monkeypatch, dtype):
    """How the linears prefetch their weights (off, into L2, into L1, non-temporal; for 2 rows,
    3-4 and more) is chosen by measurement, the fastest mode per range, once per machine and
    dtype (remembered on disk), and SENSE_PREFETCH forces it; in every mode a row's bits are the
    same."""
    lib = invariant.library()
    bf16 = int(dtype == torch.bfloat16)
    ranges = list(invariant.PREFETCH_ROWS)
    before = {i: lib.sense_prefetch(bf16, i) for i in range(len(ranges))}
    g = torch.Generator().manual_seed(5)
    packed = invariant.pack_panels(torch.randn(200, 96, generator=g).to(dtype))
    x = torch.randn(9, 96, generator=g).to(dtype)
    run = lambda rows: invariant.linear_into(packed, x[:rows], 200, 2, torch.empty(rows, 200))   # noqa: E731
    try:
        for rows, i in ((2, 0), (3, 1), (9, 2)):
            outs = []
            for mode in range(len(invariant.PREFETCH_MODES)):
                lib.sense_set_prefetch(bf16, i, mode)
                assert lib.sense_prefetch(bf16, i) == mode
                outs.append(run(rows))
            assert all(torch.equal(outs[0], o) for o in outs[1:]), rows
        lib.sense_set_prefetch(bf16, 1, 9)                  # not a mode: ignored
        assert lib.sense_prefetch(bf16, 1) == len(invariant.PREFETCH_MODES) - 1

        monkeypatch.setenv("SENSE_CACHE_DIR", str(tmp_path))
        monkeypatch.delenv(invariant.PREFETCH_ENV, raising=False)
        monkeypatch.setattr(tuning, "_prefetch_tuned", set())
        # Any load counts as quiet here: the suite's background must not retry this (stand-in)
        # timing; the quiet rule itself is tested in test_measured.py.
        monkeypatch.setattr(measured_mod, "QUIET_LIMIT", 1.0)
        measured, real = [], tuning._time_prefetch

        def timed(dt, threads):
            measured.append(dt)     # each range's fastest: off for two rows, L1, non-temporal
            return {"two": {"off": 1.0, "l2": 2.0, "l1": 3.0, "nta": 4.0},
                    "few": {"off": 4.0, "l2": 2.0, "l1": 1.0, "nta": 3.0},
                    "many": {"off": 4.0, "l2": 2.0, "l1": 3.0, "nta": 1.0}}

        monkeypatch.setattr(tuning, "_time_prefetch", timed)
        chosen = {"two": "off", "few": "l1", "many": "nta"}
        assert invariant.tune_prefetch(dtype, 2) == chosen and measured == [dtype]
        assert [lib.sense_prefetch(bf16, i) for i in range(3)] == [0, 2, 3]
        run(9)                                              # a multi-row linear: already tuned
        assert invariant.tune_prefetch(dtype, 2) == chosen and measured == [dtype]
        monkeypatch.setattr(tuning, "_prefetch_tuned", set())          # a new process: from disk
        assert invariant.tune_prefetch(dtype, 2) == chosen and measured == [dtype]
        assert len(list((tmp_path / "measured").glob("prefetch-*.json"))) == 1
        for forced, mode in (("1", "l2"), ("off", "off"), ("nta", "nta")):
            monkeypatch.setattr(tuning, "_prefetch_tuned", set())
            monkeypatch.setenv(invariant.PREFETCH_ENV, forced)
            assert invariant.tune_prefetch(dtype, 2) == dict.fromkeys(ranges, mode) and measured == [dtype]
        value = real(dtype, 2, repeats=1)                   # the measurement itself: every mode timed
        assert set(value) == set(ranges)
        assert all(set(v) == set(invariant.PREFETCH_MODES) and min(v.values()) > 0 for v in value.values())
    finally:
        for i, mode in before.items():
            lib.sense_set_prefetch(bf16, i, mode)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_linear_epilogue_is_the_torch_op_it_replaces(dtype):
    """The kernels write their output themselves (bias, rounding to bfloat16, residual add,
    bfloat16-rounded logits): each mode bitwise as the torch ops on the plain product, for whole
    panels of 16 outputs and a partial last one, NaN included."""
    g = torch.Generator().manual_seed(3)
    for n, k in ((64, 96), (40, 64)):
        w = torch.randn(n, k, generator=g).to(dtype)
        packed = invariant.pack_panels(w)
        x = torch.randn(9, k, generator=g).to(dtype)
        x[4, 7] = float("nan")
        bias = torch.randn(n, generator=g)
        plain = invariant.linear_into(packed, x, n, 2, torch.empty(9, n))       # float32, no bias
        assert plain[4].isnan().all() and not plain[3].isnan().any()

        def same(got, want):
            """Bitwise, NaN for NaN (torch's own NaN payloads differ between its scalar and vector
            conversions to bfloat16: 0x7fc0 and 0xffff)."""
            bits = torch.int16 if want.dtype == torch.bfloat16 else torch.int32
            nan = want.isnan()
            assert got.dtype == want.dtype and torch.equal(got.isnan(), nan), (n, k)
            assert torch.equal(got[~nan].view(bits), want[~nan].view(bits)), (n, k)

        same(invariant.linear_into(packed, x, n, 2, torch.empty(9, n), bias=bias), plain + bias)
        same(invariant.linear_into(packed, x, n, 2, torch.empty(9, n), logits=True),
             plain.to(dtype).float())
        res = torch.randn(9, n, generator=g).to(dtype)
        if dtype == torch.bfloat16:
            same(invariant.linear_into(packed, x, n, 2, torch.empty(9, n, dtype=dtype), bias=bias),
                 (plain + bias).to(dtype))
            same(invariant.linear_into(packed, x, n, 2, res.clone(), residual=res.clone()), res + plain.to(dtype))
        else:
            out = res.clone()
            same(invariant.linear_into(packed, x, n, 2, out, residual=out), res + plain)
