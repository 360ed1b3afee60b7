"""The target's forward for Llama-family decoders, without transformers' per-call machinery.

A decode step of SmolLM2-135M on the invariant kernels spent about a third of its time outside
the linears and the attention: transformers' output capturing, mask construction, the
``DynamicCache``'s concatenations and some 40 module calls per layer. This module runs the same
arithmetic as ``LlamaDecoderLayer`` straight from the model's own weights:

- q, k and v are one linear and gate and up another, on panel-packed weights that are the
  concatenation of the modules' own packed panels (each output column is still its own FMA
  chain, so fusing changes no bit; the modules' packed copies become views into the fused ones,
  so no memory is added);
- the KV cache is one preallocated buffer for all layers, grown by doubling, written in place;
  committing a tree path gathers its entries to the front of the tentative region in one copy;
- every query row attends through the invariant attention kernel over exactly its visible keys
  (computed once per forward, not per layer); a prompt's prefill of more than
  ``invariant.MAX_ROWS`` rows from an empty cache needs no invariance (every decoding mode shares
  it) and attends through a blocked causal kernel on AVX512-BF16 in bfloat16
  (:func:`invariant.prefill_attention`: 1,000 tokens 3.6x faster than torch's SDPA, within the
  same error), elsewhere through torch's SDPA as the transformers path does;
- several requests share one forward (:meth:`LeanLlama.forward_batch`, continuous batching):
  the linears run over all their rows, each request attends to its own cache, and since every
  row runs on the invariant kernels a request's results do not depend on its batch.

All the layers of a forward then run in one C call (``sense_decoder_layers``: the same kernels in
the same order on the same buffers, so the same bits), not some ten Python calls and torch ops per
layer, between which the kernels' OpenMP threads also went back to sleep: on the 2-core AVX2 EPYC,
in one process alternating the two (two runs), a bfloat16 decode step 0.70-0.79x the time (15.5
-> 12.3 ms in the quieter run) and a 16-token verification 0.85-0.91x (float32: 0.93x both).

The steps between the linears run on C code too (decoding/invariant/elementwise.py): the RMSNorms, the
rotary embedding with the cache write, the SiLU gate, and the linears' epilogues that round to the
model's dtype and add the residual in place as they store. Together they replaced some 45 torch ops
per layer whose dispatch cost a third of a one-row decode step (bfloat16 on the AVX512-BF16 VM:
decode step 16.3 -> 12.9 ms, 16-token verification 32.6 -> 25.6 ms). The rotary embedding, the
roundings and the residual adds are bitwise torch's; the RMSNorm's sum of squares and the SiLU's
exp are fixed-order code of their own, so ``tests/test_lean_forward.py`` compares with the
transformers forward running those two on the same code (bitwise), and them with torch's (within
rounding). Only architectures whose decoder layer is exactly this arithmetic run here
(:func:`unsupported`): Llama, Mistral, Qwen2, Qwen3, whose attention norms each head of q and k
(``q_norm``, ``k_norm``) before the rotary embedding, on the same RMSNorm code, and Phi-3, whose
q|k|v and gate|up are one module each already. Gemma, Gemma 2 and Gemma 3 run here one kernel
call a step (``_gemma_layers``): their (1 + w) RMSNorm and GELU-tanh gate on C code of their own,
the norms of the attention's and the MLP's outputs before the residual adds (Gemma 2 and 3), a
list of visible keys per window for their mix of windowed and global layers, a rotary embedding
per layer type (Gemma 3), soft-capped scores and logits (Gemma 2). Any other model runs through
transformers.
"""

from __future__ import annotations

import inspect
import os

import torch
import torch.nn.functional as F

from decoding import invariant

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3")     # LlamaDecoderLayer's arithmetic (Qwen3: + head norms)
# Gemma's arithmetic: (1 + w) RMSNorms in float32, a GELU-tanh gate, scaled embeddings (in the
# embedding module); Gemma 2 and 3 also norm the attention's and the MLP's outputs before their
# residual adds, mix windowed and global layers, and (Gemma 2) soft-cap scores and logits.
GEMMA = ("gemma", "gemma2", "gemma3_text")
ENV = "SENSE_LEAN_FORWARD"                          # "0" runs the transformers forward instead
ONE_CALL_ENV = "SENSE_LEAN_ONE_CALL"                # "0" runs the layers one kernel call at a time
MIN_CAPACITY = 256


def unsupported(model) -> str | None:
    """None if `model` runs on this forward, else why not (one line)."""
    if os.environ.get(ENV, "1").lower() in ("0", "off", "false", "no"):
        return f"turned off ({ENV}=0)"
    cfg = model.config
    gemma = cfg.model_type in GEMMA
    if cfg.model_type not in ARCHITECTURES and not gemma:
        return f"{cfg.model_type} is not a Llama-style decoder"
    # A window narrower than the context (Mistral 7B v0.1's 4,096, Phi-3-mini-4k's 2,047) in every
    # layer: each row's visible keys stop at its window (sliding_window); in some layers only
    # (Gemma 2 and 3): a list of visible keys per window, each layer on its own.
    if sliding_window(cfg) == -1 and not gemma:
        return "sliding-window attention in some layers only"
    if gemma:
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
        if act != "gelu_pytorch_tanh":
            return f"a Gemma MLP activation of {act!r}, not gelu_pytorch_tanh"
        if getattr(cfg, "use_bidirectional_attention", False):
            return "bidirectional attention"
        if not all(invariant.offset_norm(n) for l in model.base_model.layers for n in _norms(l)):
            return "a norm that is not GemmaRMSNorm-style"
    elif getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        return "not a SiLU-gated MLP without bias"
    if (getattr(cfg, "partial_rotary_factor", None) or 1.0) != 1.0:
        return "a rotary embedding on part of each head"
    base = model.base_model
    head_dim = getattr(base.layers[0].self_attn, "head_dim", 0)
    if head_dim % 8:        # the attention and rotary kernels run whole 8-lane blocks of a head
        return f"a head size of {head_dim}, not a multiple of 8"
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        try:
            groups = (qkv_modules(attn), gate_up_modules(mlp))
        except AttributeError:
            groups = None
        if groups is None or hasattr(attn, "sinks") or hasattr(attn, "q_norm") != hasattr(attn, "k_norm"):
            return "a decoder layer this forward does not know"
        # (one epsilon: the one-call layers take one for both; Gemma's run a call a step)
        if hasattr(attn, "q_norm") and not (all(
                (invariant.offset_norm(n) if gemma else hasattr(n, "variance_epsilon"))
                and tuple(n.weight.shape) == (attn.head_dim,) and n.weight.is_contiguous()
                for n in (attn.q_norm, attn.k_norm))
                and (gemma or attn.q_norm.variance_epsilon == attn.k_norm.variance_epsilon)):
            return "q/k norms that are not per-head RMSNorms of one epsilon"
        if not gemma and not all(hasattr(n, "variance_epsilon") and n.weight.dim() == 1
                                 for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            return "a norm that is not LlamaRMSNorm-style"
        if attn.o_proj.bias is not None:
            return "an output projection with bias"
        for group in groups:
            if any(m.weight.shape[0] % invariant.PANEL for m in group):
                return "projection widths that are not a multiple of the kernel's panel"
    return None


def _norms(layer) -> list:
    """A decoder layer's RMSNorms (Gemma 2 and 3: four; the others: two; q/k norms apart)."""
    names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    return [getattr(layer, n) for n in names if hasattr(layer, n)]


def attention_windows(cfg) -> tuple[int, list[bool]] | None:
    """(the window, per layer whether it attends over the last `window` positions only, as
    transformers' kv > q - window) of a model with such layers, the window narrower than its
    context; None for a model without (or one as wide as the context, which hides nothing)."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is not None and "sliding_attention" in types:
        windowed = [t == "sliding_attention" for t in types]
    else:
        windowed = [bool(getattr(cfg, "use_sliding_window", False) or cfg.model_type in ("mistral", "phi3"))]
    if not any(windowed) or window is None or window >= getattr(cfg, "max_position_embeddings", float("inf")):
        return None
    return int(window), windowed


def sliding_window(cfg) -> int | None:
    """The attention window of a model whose every layer has one (:func:`attention_windows`); None
    where no layer has; -1 where some layers have and others not."""
    found = attention_windows(cfg)
    return None if found is None else found[0] if all(found[1]) else -1


def qkv_modules(attn) -> tuple:
    """The linears whose outputs side by side are q|k|v: q_proj, k_proj, v_proj, or Phi-3's one
    qkv_proj (AttributeError: neither)."""
    return (attn.qkv_proj,) if hasattr(attn, "qkv_proj") else (attn.q_proj, attn.k_proj, attn.v_proj)


def gate_up_modules(mlp) -> tuple:
    """The linears whose outputs side by side are gate|up: gate_proj, up_proj, or Phi-3's one
    gate_up_proj (AttributeError: neither)."""
    return (mlp.gate_up_proj,) if hasattr(mlp, "gate_up_proj") else (mlp.gate_proj, mlp.up_proj)


class FusedLinear:
    """Several linears of the same input as one: their packed panels concatenated (the modules'
    own packed weights become views of it). Returns the outputs side by side in x's dtype."""

    def __init__(self, modules) -> None:
        self.modules = list(modules)
        packs = [invariant.module_packed(m) for m in self.modules]
        self.packed = torch.cat([p.packed() for p in packs])
        start = 0
        for p in packs:
            end = start + p.packed().shape[0]
            p.adopt(self.packed[start:end])
            start = end
        self.n_out = sum(m.weight.shape[0] for m in self.modules)
        biases = [m.bias for m in self.modules]
        self.bias = None if all(b is None for b in biases) else torch.cat([
            b.detach().float() if b is not None else torch.zeros(m.weight.shape[0])
            for b, m in zip(biases, self.modules)])

    def __call__(self, x: torch.Tensor, out: torch.Tensor, large: bool = False) -> torch.Tensor:
        """x [rows, K] -> out [rows, n_out] (x's dtype); `large`: a large prefill, on whichever
        kernel measured faster (else always the invariant kernel, whatever the row count)."""
        if large and invariant.large_rows_kernel(x.dtype, torch.get_num_threads(), x.shape[0]) == "torch":
            return torch.cat([F.linear(x, m.weight, m.bias) for m in self.modules], dim=-1)
        return invariant.linear_into(self.packed, x, self.n_out, torch.get_num_threads(), out, bias=self.bias)


class KVCache:
    """One request's keys and values: one ``[2, layers, 1, G, capacity, D]`` buffer (``k[i]`` and
    ``v[i]`` are a layer's ``[1, G, capacity, D]`` views), of which the first ``length`` positions
    are filled. One buffer, so a commit gathers every layer's entries in one copy; grown by
    doubling; never shared."""

    def __init__(self, n_layers: int, groups: int, head_dim: int, dtype: torch.dtype, device) -> None:
        self.shape = (n_layers, groups, head_dim)
        self.dtype, self.device = dtype, device
        self.length = 0
        self.capacity = 0
        self.buf: torch.Tensor | None = None
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        cap = max(MIN_CAPACITY, 2 * self.capacity)
        while cap < total:
            cap *= 2
        n_layers, g, d = self.shape
        old, n = self.buf, self.length
        self.buf = torch.empty(2, n_layers, 1, g, cap, d, dtype=self.dtype, device=self.device)
        if old is not None and n:
            self.buf[..., :n, :] = old[..., :n, :]
        self.k = list(self.buf[0].unbind(0))
        self.v = list(self.buf[1].unbind(0))
        self.capacity = cap

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` positions (negative: drop that many from the end), as
        transformers' ``DynamicCache.crop``."""
        self.length = max(0, self.length + max_length if max_length < 0 else min(max_length, self.length))

    def gather(self, start: int, positions: torch.Tensor) -> None:
        """Copy the entries at `positions` to start, start+1, ... (a tree path to the front of the
        tentative region), every layer's keys and values at once."""
        self.buf[..., start:start + len(positions), :] = self.buf.index_select(4, positions)


class LeanLlama:
    """The forward of a Llama-family model (see the module docstring) on the invariant kernels."""

    def __init__(self, model) -> None:
        cfg = model.config
        self.base = model.base_model
        self.layers = list(self.base.layers[:cfg.num_hidden_layers])
        attn0 = self.layers[0].self_attn
        self.heads = cfg.num_attention_heads
        self.groups = cfg.num_key_value_heads
        self.head_dim = attn0.head_dim
        self.scaling = float(attn0.scaling)
        self.qkv = [FusedLinear(qkv_modules(l.self_attn)) for l in self.layers]
        self.gate_up = [FusedLinear(gate_up_modules(l.mlp)) for l in self.layers]
        self.intermediate = self.gate_up[0].n_out // 2
        self.o_proj = [invariant.module_packed(l.self_attn.o_proj) for l in self.layers]
        self.head = invariant.module_packed(model.get_output_embeddings())
        self.down = [invariant.module_packed(l.mlp.down_proj) for l in self.layers]
        # Qwen3: each head of q and k RMS-normed (weights [head_dim]) before the rotary embedding
        self.qk_norms = [(l.self_attn.q_norm, l.self_attn.k_norm) if hasattr(l.self_attn, "q_norm") else None
                         for l in self.layers]
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.fast_prefill = self.device.type == "cpu" and invariant.prefill_attention_ok(self.dtype, self.head_dim)
        found = attention_windows(cfg)
        # each layer's attention window (None: none); `window`: the one every layer has (None: none,
        # or windowed and global layers mixed, which only Gemma's forward runs)
        self.windows = [None] * len(self.layers) if found is None else [
            found[0] if (found[1][i] if len(found[1]) > 1 else found[1][0]) else None for i in range(len(self.layers))]
        self.window = self.windows[0] if len(set(self.windows)) == 1 else None
        self.gemma = cfg.model_type in GEMMA
        # Gemma 2 and 3: the attention's and the MLP's outputs normed before their residual adds
        self.sandwich = self.gemma and hasattr(self.layers[0], "pre_feedforward_layernorm")
        self.softcap = float(getattr(cfg, "attn_logit_softcapping", None) or 0.0) if self.gemma else 0.0
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None) if self.gemma else None
        # Gemma 3: a rotary embedding per layer type (local and global bases)
        takes_type = "layer_type" in inspect.signature(self.base.rotary_emb.forward).parameters
        self.rope_types = list(cfg.layer_types) if takes_type else None
        self.one_call = None if self.gemma else self._layer_table()   # the layers in one C call (None: one per step)

    def _layer_table(self):
        """(kind, weight addresses [L, 10], epsilons [L, 3]) for ``sense_decoder_layers``, which runs
        every layer's steps in C in the loop's order on the same buffers (the same bits); None where
        it cannot (pair-packed bfloat16 with an odd input width, which the Python side pads). The
        packed weights are the ones made at load, as the fused q|k|v and gate|up ones are."""
        if os.environ.get(ONE_CALL_ENV, "1").lower() in ("0", "off", "false", "no"):
            return None
        if self.dtype == torch.float32:
            kind = 0
        elif not invariant.bf16_pairs():
            kind = 1
        else:
            kind = 3 if invariant.bf16_kernel() == "amx" else 2
            if any(k % 2 for k in (self.qkv[0].modules[0].weight.shape[1], self.heads * self.head_dim,
                                   self.intermediate)):
                return None
        rows = []
        for i, layer in enumerate(self.layers):
            if not (layer.input_layernorm.weight.is_contiguous() and layer.post_attention_layernorm.weight.is_contiguous()):
                return None
            bias, qk = self.qkv[i].bias, self.qk_norms[i]
            rows.append([layer.input_layernorm.weight.data_ptr(), self.qkv[i].packed.data_ptr(),
                         0 if bias is None else bias.data_ptr(), self.o_proj[i].packed().data_ptr(),
                         layer.post_attention_layernorm.weight.data_ptr(), self.gate_up[i].packed.data_ptr(),
                         self.down[i].packed().data_ptr(), *((n.weight.data_ptr() for n in qk) if qk else (0, 0)), 0])
        eps = [[float(l.input_layernorm.variance_epsilon), float(l.post_attention_layernorm.variance_epsilon),
                float(qk[0].variance_epsilon) if qk else 0.0] for l, qk in zip(self.layers, self.qk_norms)]
        return kind, torch.tensor(rows, dtype=torch.int64), torch.tensor(eps, dtype=torch.float32)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers), self.groups, self.head_dim, self.dtype, self.device)

    def is_large_prefill(self, items) -> bool:
        """A lone prompt prefill of more than MAX_ROWS rows from an empty cache: the one forward
        that runs on the prefill attention (or SDPA) and the faster large-row linear instead of the
        invariant kernels."""
        cache, ids, _, ancestors = items[0]
        return (not self.gemma and len(items) == 1 and ids.shape[0] > invariant.MAX_ROWS and cache.length == 0
                and ancestors is None)

    def forward_batch(self, items, hidden_layer: int, *,
                      large: bool | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Several requests in one forward: `items` = [(cache, ids [T], positions [T], ancestors)],
        each run after its cache's entries (`ancestors` [T, T] bool of a tree; None: a causal
        chain), appending T entries to it. Returns per request (the final normed hidden states
        [T, H], the hidden states of `hidden_layer` [T, H] as transformers' ``output_hidden_states``
        numbers them, 0 being the embeddings). The linears run over all rows at once; each request's rows attend to
        its own cache only. A row's results do not depend on the other rows or requests: every
        row runs on the invariant kernels, but for a lone prefill of more than MAX_ROWS rows from
        an empty cache (the prefill attention or SDPA and the large-row linear: both decoding modes
        share the prefill), unless `large` is False (a prefix cache's prefills: see
        :mod:`decoding.prefix_cache`)."""
        sizes = [ids.shape[0] for _, ids, _, _ in items]
        large = self.is_large_prefill(items) if large is None else large and self.is_large_prefill(items)
        starts = [cache.length for cache, _, _, _ in items]
        for (cache, *_), start, t in zip(items, starts, sizes):
            cache.reserve(start + t)
        ids = torch.cat([i for _, i, _, _ in items]) if len(items) > 1 else items[0][1]
        positions = torch.cat([p for _, _, p, _ in items]) if len(items) > 1 else items[0][2]
        x = self.base.embed_tokens(ids)             # a new tensor: the residual stream, updated in place
        reqs = None if large else invariant.Requests(
            [cache.buf for cache, *_ in items], starts, sizes,
            invariant.visible_csr_batch(starts, sizes, [anc for *_, anc in items], self.window))
        bounds = [0]
        for t in sizes:
            bounds.append(bounds[-1] + t)
        layers = self._gemma_layers if self.gemma else self._llama_layers
        captured = layers(x, reqs, large, items, starts, bounds, positions, hidden_layer)
        for (cache, *_), start, t in zip(items, starts, sizes):
            cache.length = start + t
        last = invariant.rmsnorm(x, self.base.norm, torch.empty_like(x))
        if hidden_layer in (-1, len(self.layers)):
            captured = last
        return [(last[a:b], captured[a:b]) for a, b in zip(bounds, bounds[1:])]

    def _llama_layers(self, x, reqs, large, items, starts, bounds, positions, hidden_layer):
        """The layers of a Llama-family model, all in one C call (``one_call``) or a kernel call a
        step, a large prefill on SDPA (or the prefill attention) and the large-row linear; x, the
        residual stream, is updated in place. Returns the hidden states of `hidden_layer` where it
        is an inner layer (or 0, the embeddings), else None."""
        total = x.shape[0]
        cos, sin = self.base.rotary_emb(x[None], positions[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()        # [rows, D]
        captured = x.clone() if hidden_layer == 0 else None
        h_dim = self.heads * self.head_dim
        new = lambda width: torch.empty(total, width, dtype=x.dtype)       # noqa: E731
        h, attn = new(x.shape[1]), new(h_dim)
        qkv_buf, gu_buf, act = new(self.qkv[0].n_out), new(2 * self.intermediate), new(self.intermediate)
        if reqs is not None and self.one_call is not None:
            kind, table, eps = self.one_call
            hidden = x.shape[1]
            xf = torch.empty(total * max(hidden, h_dim, self.intermediate)) if kind == 1 else None
            after = hidden_layer if 0 < hidden_layer < len(self.layers) else 0
            if after:
                captured = torch.empty_like(x)
            ptr = lambda t: None if t is None else t.data_ptr()        # noqa: E731
            invariant.library().sense_decoder_layers(
                x.data_ptr(), h.data_ptr(), qkv_buf.data_ptr(), attn.data_ptr(), gu_buf.data_ptr(), act.data_ptr(),
                ptr(xf), table.data_ptr(), eps.data_ptr(), kind, total, len(self.layers), hidden, self.heads,
                self.groups, self.head_dim, self.intermediate, cos.data_ptr(), sin.data_ptr(), reqs.bufs.data_ptr(),
                reqs.caps.data_ptr(), reqs.starts.data_ptr(), reqs.bounds.data_ptr(), reqs.n, reqs.req.data_ptr(),
                reqs.rowptr.data_ptr(), reqs.idx.data_ptr(), self.scaling, after, ptr(captured),
                torch.get_num_threads())
        for i, layer in enumerate(self.layers if reqs is None or self.one_call is None else ()):
            invariant.rmsnorm(x, layer.input_layernorm, h)
            qkv = self.qkv[i](h, qkv_buf, large)
            if self.qk_norms[i] is not None:
                q_norm, k_norm = self.qk_norms[i]
                invariant.rmsnorm_heads(qkv, q_norm, 0, self.heads, self.head_dim)
                invariant.rmsnorm_heads(qkv, k_norm, self.heads, self.groups, self.head_dim)
            if reqs is not None:        # every request's rows in one call each (their own caches)
                invariant.rope_kv_multi(qkv, self.heads, self.groups, cos, sin, reqs, i)
                invariant.attention_multi(qkv, reqs, i, self.scaling, attn, self.heads, self.groups,
                                          self.head_dim, x.dtype)
            for j, (cache, _, _, _) in enumerate(items if large else ()):
                r0, r1, start = bounds[j], bounds[j + 1], starts[j]
                invariant.rope_kv(qkv[r0:r1], self.heads, self.groups, cos[r0:r1], sin[r0:r1], cache.k[i],
                                  cache.v[i], start)
                if self.fast_prefill and not (self.window and start + r1 - r0 > self.window):
                    invariant.prefill_attention(qkv[r0:r1], cache.k[i], cache.v[i], self.heads, self.scaling,
                                                attn[r0:r1])
                    continue
                keys, values = cache.k[i][:, :, :start + r1 - r0], cache.v[i][:, :, :start + r1 - r0]
                q = qkv[r0:r1, :h_dim].view(r1 - r0, self.heads, self.head_dim)
                attn[r0:r1] = self._sdpa(q, keys, values).reshape(r1 - r0, h_dim)
            _residual(self.o_proj[i], attn, x, large)
            invariant.rmsnorm(x, layer.post_attention_layernorm, h)
            gu = self.gate_up[i](h, gu_buf, large)
            _residual(self.down[i], invariant.silu_mul(gu, act), x, large)
            if hidden_layer == i + 1:
                captured = x.clone()
        return captured

    def _gemma_layers(self, x, reqs, large, items, starts, bounds, positions, hidden_layer):
        """The layers of a Gemma model on the invariant kernels (every forward, a prefill too: no
        large-row path, `large` is never set), each on its window's list of visible keys and its
        layer type's rotary embedding; Gemma 2 and 3 norm the attention's and the MLP's outputs
        before each residual add (``x + norm(y)``, torch's add: the same bits as transformers'
        ``residual + h``). Returns as :meth:`_llama_layers` does."""
        total = x.shape[0]
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        ancestors = [anc for *_, anc in items]
        by_window = {w: reqs if w == self.window else invariant.Requests(
            [cache.buf for cache, *_ in items], starts, sizes, invariant.visible_csr_batch(starts, sizes, ancestors, w))
            for w in set(self.windows)}
        rope = {}
        for kind in set(self.rope_types or [None]):
            cos, sin = (self.base.rotary_emb(x[None], positions[None], kind) if kind is not None
                        else self.base.rotary_emb(x[None], positions[None]))
            rope[kind] = (cos[0].contiguous(), sin[0].contiguous())
        captured = x.clone() if hidden_layer == 0 else None
        h_dim = self.heads * self.head_dim
        new = lambda width: torch.empty(total, width, dtype=x.dtype)       # noqa: E731
        h, y, attn = new(x.shape[1]), new(x.shape[1]), new(h_dim)
        qkv_buf, gu_buf, act = new(self.qkv[0].n_out), new(2 * self.intermediate), new(self.intermediate)
        threads = torch.get_num_threads()
        for i, layer in enumerate(self.layers):
            r = by_window[self.windows[i]]
            cos, sin = rope[self.rope_types[i] if self.rope_types else None]
            invariant.rmsnorm(x, layer.input_layernorm, h)
            qkv = self.qkv[i](h, qkv_buf)
            if self.qk_norms[i] is not None:
                q_norm, k_norm = self.qk_norms[i]
                invariant.rmsnorm_heads(qkv, q_norm, 0, self.heads, self.head_dim)
                invariant.rmsnorm_heads(qkv, k_norm, self.heads, self.groups, self.head_dim)
            invariant.rope_kv_multi(qkv, self.heads, self.groups, cos, sin, r, i)
            invariant.attention_multi(qkv, r, i, self.scaling, attn, self.heads, self.groups, self.head_dim,
                                      x.dtype, self.softcap)
            if self.sandwich:
                invariant.linear_into(self.o_proj[i].packed(), attn, x.shape[1], threads, y)
                x.add_(invariant.rmsnorm(y, layer.post_attention_layernorm, h))
                invariant.rmsnorm(x, layer.pre_feedforward_layernorm, h)
            else:
                _residual(self.o_proj[i], attn, x, False)
                invariant.rmsnorm(x, layer.post_attention_layernorm, h)
            gu = self.gate_up[i](h, gu_buf)
            invariant.gelu_tanh_mul(gu, act)
            if self.sandwich:
                invariant.linear_into(self.down[i].packed(), act, x.shape[1], threads, y)
                x.add_(invariant.rmsnorm(y, layer.post_feedforward_layernorm, h))
            else:
                _residual(self.down[i], act, x, False)
            if hidden_layer == i + 1:
                captured = x.clone()
        return captured

    def logits(self, h: torch.Tensor, large: bool = False) -> torch.Tensor:
        """The LM head over rows of final hidden states, float32 [rows, V]: on the invariant
        kernel whatever the row count (a large prefill: the faster kernel)."""
        if large:
            return self.head(h).float()
        if not h.shape[0]:          # no rows (a prefill piece before the last): the kernel needs one
            return torch.empty(0, self.head.weight.shape[0], dtype=torch.float32)
        # Rounded to the model's dtype first, as transformers' head (and the stock path) returns it.
        out = torch.empty(h.shape[0], self.head.weight.shape[0], dtype=torch.float32)
        invariant.linear_into(self.head.packed(), h.contiguous(), out.shape[1], torch.get_num_threads(), out,
                              logits=True)
        if self.final_softcap:      # Gemma 2: on the float32 logits, as the transformers path caps them
            invariant.soft_cap_rows(out, float(self.final_softcap))
        return out

    def _sdpa(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Causal attention of a prefill from an empty cache: q [T, heads, D] -> [T, heads, D]
        (each row within its window, where the model has one)."""
        t = q.shape[0]
        mask = None
        if self.window and t > self.window:
            i = torch.arange(t)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, is_causal=mask is None,
                                             attn_mask=mask, scale=self.scaling,
                                             enable_gqa=self.heads != self.groups)
        return out[0].transpose(0, 1)


def _residual(packed: invariant.PackedWeight, a: torch.Tensor, x: torch.Tensor, large: bool) -> None:
    """x += a @ W^T in place (rounded as torch's ``x + linear(a)``): the kernel adds the residual
    as it stores; a large prefill on whichever kernel measured faster."""
    if large and invariant.large_rows_kernel(a.dtype, torch.get_num_threads(), a.shape[0]) == "torch":
        x.add_(F.linear(a, packed.weight))
        return
    invariant.linear_into(packed.packed(), a, packed.weight.shape[0], torch.get_num_threads(), x, residual=x)
