"""The elementwise steps of a Llama-family layer on C code (decoding/lean_forward.py): RMSNorms
(Llama's and Gemma's), the rotary embedding with the cache write, the SiLU and GELU-tanh gates,
soft-capped logits. Each row's result is a fixed sequence of its own inputs.
"""

from __future__ import annotations

import torch

from decoding.invariant.attention_ops import Requests
from decoding.invariant.build import library


def offset_norm(norm: torch.nn.Module) -> bool:
    """Whether `norm` is a Gemma-style RMSNorm (``x * inv * (1 + w)`` in float32, rounded once;
    its epsilon ``eps``) rather than a Llama-style one (``w * round(x * inv)``, ``variance_epsilon``)."""
    return not hasattr(norm, "variance_epsilon") and hasattr(norm, "eps") and "Gemma" in type(norm).__name__


def _norm_kernel(norm: torch.nn.Module, name: str) -> tuple:
    """(the kernel `name` or its Gemma-style twin ``name`` + ``_offset``, the norm's epsilon)."""
    if offset_norm(norm):
        return getattr(library(), name.replace("rmsnorm", "rmsnorm_offset")), float(norm.eps)
    return getattr(library(), name), float(norm.variance_epsilon)


def rmsnorm(x: torch.Tensor, norm: torch.nn.Module, out: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` of a LlamaRMSNorm-style module (or a Gemma one: :func:`offset_norm`) into out
    ([R, H] contiguous, x's dtype); its sum of squares in a fixed order (sense_rmsnorm)."""
    rows, hidden = x.shape
    fn, eps = _norm_kernel(norm, "sense_rmsnorm")
    fn(x.data_ptr(), norm.weight.data_ptr(), out.data_ptr(), rows, hidden, eps, int(x.dtype == torch.bfloat16),
       torch.get_num_threads())
    return out


def rmsnorm_heads(qkv: torch.Tensor, norm: torch.nn.Module, first: int, n: int, head_dim: int) -> None:
    """``norm`` (a per-head RMSNorm, Qwen3's or Gemma 3's q_norm or k_norm) in place on heads first
    .. first + n - 1 of each row of the fused q|k|v projection [T, (heads + 2 groups) D]: each
    head's D elements as :func:`rmsnorm` norms a row of D (the same bits)."""
    fn, eps = _norm_kernel(norm, "sense_rmsnorm_heads")
    fn(qkv.data_ptr(), qkv.stride(0), qkv.shape[0], first, n, head_dim, norm.weight.data_ptr(), eps,
       int(qkv.dtype == torch.bfloat16), torch.get_num_threads())


def rope_kv(qkv: torch.Tensor, heads: int, groups: int, cos: torch.Tensor, sin: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor, start: int) -> None:
    """One request's rows of the fused q|k|v projection [T, (heads + 2 groups) D]: the rotary
    embedding on q and k in place (bitwise transformers' apply_rotary_pos_emb), then k and v
    into the cache buffers [1, G, capacity, D] at positions start, start + 1, ..."""
    d = k_cache.shape[-1]
    library().sense_rope_kv(qkv.data_ptr(), qkv.stride(0), qkv.shape[0], heads, groups, d, cos.data_ptr(),
                            sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(1), start,
                            int(qkv.dtype == torch.bfloat16))


def rope_kv_multi(qkv: torch.Tensor, heads: int, groups: int, cos: torch.Tensor, sin: torch.Tensor,
                  reqs: Requests, layer: int) -> None:
    """:func:`rope_kv` of every request of `reqs` in one call (layer `layer` of their caches)."""
    d = cos.shape[-1]
    library().sense_rope_kv_multi(qkv.data_ptr(), qkv.stride(0), heads, groups, d, cos.data_ptr(), sin.data_ptr(),
                                  reqs.bufs.data_ptr(), reqs.caps.data_ptr(), reqs.starts.data_ptr(),
                                  reqs.bounds.data_ptr(), reqs.n, reqs.layers, layer,
                                  int(qkv.dtype == torch.bfloat16), torch.get_num_threads())


def silu_mul(gu: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the fused gate|up projection [R, 2I] into out [R, I]."""
    rows, inter = out.shape
    library().sense_silu_mul(gu.data_ptr(), out.data_ptr(), rows, inter, int(gu.dtype == torch.bfloat16),
                             torch.get_num_threads())
    return out


def soft_cap_rows(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` in place on float32 logits [rows, V] (Gemma 2's final logit
    soft-capping), row by row: a [T, 256000] tensor's elementwise ops split across threads
    mid-row, and a row's bits would depend on the rows beside it."""
    for row in logits:
        row.copy_(torch.tanh(row / cap) * cap)
    return logits


def gelu_tanh_mul(gu: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``gelu(gate, approximate="tanh") * up`` (Gemma's MLP) of the fused gate|up projection [R, 2I]
    into out [R, I]."""
    rows, inter = out.shape
    library().sense_gelu_tanh_mul(gu.data_ptr(), out.data_ptr(), rows, inter, int(gu.dtype == torch.bfloat16),
                                  torch.get_num_threads())
    return out
