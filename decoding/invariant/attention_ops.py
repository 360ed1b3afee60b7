"""The invariant attention: each query row over exactly its visible keys, listed in key order
(``sense_attention_*``), as a transformers attention function (:func:`attention_forward`) and
for the lean forward's requests (:class:`Requests`, :func:`attention_multi`); and a prompt's
blocked causal prefill attention on AVX512-BF16 (:func:`prefill_attention`), which needs no
invariance.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import torch

from decoding.invariant.build import MAX_ROWS, bf16_pairs, library

ATTENTION = "sense_invariant"


class _Visibility:
    """CSR lists of the keys each query row sees, computed once per forward (all layers share
    the mask object) and kept with a reference to that object so its identity stays unique."""

    def __init__(self) -> None:
        self.key: object = None
        self.value: tuple | None = None

    def get(self, mask: torch.Tensor | None, b: int, t: int, length: int, window: int | None):
        key = (b, t, length, window) if mask is None else mask
        if self.key is key or (mask is None and self.key == key):
            return self.value
        if mask is None:
            pos = torch.arange(length - t, length)[:, None]
            cols = torch.arange(length)[None, :]
            allowed = cols <= pos
            if window:
                allowed &= cols > pos - window
            allowed = allowed.expand(b, t, length)
        else:
            m = mask[:, 0] if mask.dim() == 4 else mask
            if m.dtype != torch.bool and bool(((m != 0) & (m > torch.finfo(m.dtype).min / 2)).any()):
                # Not a visibility mask but an additive bias (ALiBi folds its position biases
                # into the mask): the kernel takes visibility only. None: SDPA runs it.
                self.key, self.value = key, None
                return None
            allowed = m if m.dtype == torch.bool else m == 0
            allowed = allowed.expand(b, t, length)
        self.key, self.value = key, _csr(allowed.reshape(b * t, length))
        return self.value


def _csr(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, L] bool -> (rowptr [rows + 1], key indices) int32, the kernel's visibility lists."""
    counts = allowed.sum(-1, dtype=torch.int32)
    rowptr = torch.zeros(allowed.shape[0] + 1, dtype=torch.int32)
    torch.cumsum(counts, 0, out=rowptr[1:])
    return rowptr, allowed.nonzero()[:, 1].to(torch.int32).contiguous()


def visible_csr(start: int, t: int, ancestors: torch.Tensor | None, window: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Visibility lists for T query rows after `start` cached positions: every row sees the cached
    prefix and then itself and its ancestors (`ancestors` [T, T] bool of a tree: row i, column j
    when j is i or an ancestor of i), or, with None, every earlier row (a causal chain). With a
    `window`, a row at position p (start + its depth) sees only keys at positions above p - window."""
    return visible_csr_batch([start], [t], [ancestors], window)


def visible_csr_batch(starts: list[int], sizes: list[int], ancestors: list[torch.Tensor | None],
                      window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`visible_csr` of several requests' rows, one request's after another's, as one CSR
    list (each row's positions in its own request's cache). A chain's rows (every one-row
    request of a loaded batch) are built for the whole batch at once: at 16 in flight, one
    list per request had cost 0.23 ms a step."""
    counts, trees, firsts = [], {}, []
    for j, (start, t, anc) in enumerate(zip(starts, sizes, ancestors)):
        if anc is None:             # row i sees positions 0 .. start + i (the last `window` of them)
            ends = np.arange(start + 1, start + t + 1, dtype=np.int64)
            first = np.maximum(ends - window, 0) if window else 0
            if window:
                firsts.append(first)
            counts.append(ends - first)
        else:
            allowed = torch.cat([torch.ones(t, start, dtype=torch.bool), anc], dim=1)
            if window:              # by position: cached j at j, tree node a at start + its depth
                depth = anc.sum(-1) - 1
                key_pos = torch.cat([torch.arange(start), start + depth])
                allowed &= key_pos[None, :] > (start + depth)[:, None] - window
                firsts.append(np.zeros(t, dtype=np.int64))     # (its list is set below)
            counts.append(allowed.sum(-1).numpy().astype(np.int64))
            trees[j] = allowed.nonzero()[:, 1].numpy()
    counts = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    rowptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=rowptr[1:])
    # A chain row's list is first, first + 1, ..., first + count - 1 (first 0 but for a window).
    idx = np.arange(rowptr[-1], dtype=np.int64) - np.repeat(rowptr[:-1], counts)
    if window and firsts:
        idx += np.repeat(np.concatenate(firsts), counts)
    row = 0
    for j, t in enumerate(sizes):
        if j in trees:
            idx[rowptr[row]:rowptr[row + t]] = trees[j]
        row += t
    return torch.from_numpy(rowptr.astype(np.int32)), torch.from_numpy(idx.astype(np.int32))


_visibility = threading.local()


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs):
    """A transformers attention function (registered as ``sense_invariant``): query [B, H, T, D],
    key/value [B, G, L, D] (the whole cache of this layer) -> ([B, T, H, D], None)."""
    lib = library()
    b, h, t, d = query.shape
    g, length = key.shape[1], key.shape[2]

    softcap = kwargs.get("softcap")

    def sdpa():
        # SDPA refuses soft-capping (Gemma 2's): the eager attention of the model's own modeling file
        own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if softcap is not None and own is not None:
            return own(module, query, key, value, _additive_mask(attention_mask, t, length, query),
                       dropout=dropout, scaling=scaling, **kwargs)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)

    mask_ok = attention_mask is None or attention_mask.shape[-1] == length
    if (lib is None or t > MAX_ROWS or d % 8 or h % g or not mask_ok
            or query.device.type != "cpu" or key.dtype not in (torch.float32, torch.bfloat16)
            or (dropout and module.training)):
        return sdpa()
    cache = getattr(_visibility, "cache", None)
    if cache is None:
        cache = _visibility.cache = _Visibility()
    visible = cache.get(attention_mask, b, t, length, kwargs.get("sliding_window"))
    if visible is None:         # the mask carries a bias (see _Visibility.get)
        return sdpa()
    rowptr, idx = visible
    scale = float(scaling if scaling is not None else d ** -0.5)
    return attention(query.transpose(1, 2), key, value, rowptr, idx, scale, softcap or 0.0), None


def _additive_mask(mask: torch.Tensor | None, t: int, length: int, query: torch.Tensor) -> torch.Tensor:
    """The mask an eager attention adds to its scores (0 where a key is visible, the dtype's
    lowest elsewhere) from the one this attention's mask function (``sdpa_mask``) made: a boolean
    mask (True: visible), or None where the mask is causal and SDPA would be told so
    (``is_causal``): query row i, the cache's last t rows, sees keys 0 .. length - t + i. An
    eager attention given None would let every row see every key."""
    if mask is None:
        mask = torch.ones(t, length, dtype=torch.bool, device=query.device).tril(length - t)[None, None]
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~mask, torch.finfo(query.dtype).min)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rowptr: torch.Tensor,
              idx: torch.Tensor, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """query [B, T, H, D], key/value [B, G, L, D] (any strides with contiguous rows), each query
    row over the keys its CSR list (rowptr, idx) names -> [B, T, H, D] in the query's dtype.
    `softcap` > 0: each score s becomes softcap * tanh(s / softcap) before the softmax (Gemma 2's
    attention logit soft-capping, as its eager attention computes it)."""
    b, t, h, d = query.shape
    # A bfloat16 query stays bfloat16 (the lean forward's queries are, and the bfloat16 route of a
    # machine with AVX512-BF16 takes its pairs as they are); any other dtype goes in as float32.
    q = query.contiguous() if query.dtype == torch.bfloat16 else query.to(torch.float32).contiguous()
    out = torch.empty(b, t, h, d, dtype=q.dtype)
    _attention(q, h * d, key, value, rowptr, idx, scale, out, h * d, b, t, h, d, softcap)
    return out.to(query.dtype)


def _attention(q, ldq, key, value, rowptr, idx, scale, out, ldo, b, t, h, d, softcap: float = 0.0) -> None:
    g = key.shape[1]
    k, v = key, value
    if k.stride(-1) != 1 or k.stride(-2) != d or v.stride() != k.stride():
        k, v = k.contiguous(), v.contiguous()
    lib = library()
    fn = lib.sense_attention_f32 if k.dtype == torch.float32 else lib.sense_attention_bf16
    fn(q.data_ptr(), ldq, k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
       rowptr.data_ptr(), idx.data_ptr(), out.data_ptr(), ldo, int(q.dtype == torch.bfloat16), b, t, h, g, d,
       scale, float(softcap), torch.get_num_threads())


class Requests:
    """Several requests' rows of one forward, for the ``*_multi`` kernels: per request its cache
    buffer (``[2, L, 1, G, capacity, D]``: decoding.lean_forward.KVCache) and first position, its
    rows' bounds, and every row's visible positions in its own cache (one CSR list)."""

    def __init__(self, buffers: list[torch.Tensor], starts: list[int], sizes: list[int],
                 visible: tuple[torch.Tensor, torch.Tensor]) -> None:
        """`visible`: every row's visible positions, request after request (:func:`visible_csr_batch`)."""
        self.n = len(buffers)
        self.layers = buffers[0].shape[1]
        self.bufs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
        self.caps = torch.tensor([b.shape[4] for b in buffers], dtype=torch.int64)
        self.starts = torch.tensor(starts, dtype=torch.int64)
        self.bounds = torch.zeros(self.n + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(sizes, dtype=torch.int32), 0, out=self.bounds[1:])
        self.rows = int(self.bounds[-1])
        self.req = torch.repeat_interleave(torch.arange(self.n, dtype=torch.int32), torch.tensor(sizes))
        self.rowptr, self.idx = visible


def attention_multi(q: torch.Tensor, reqs: Requests, layer: int, scale: float, out: torch.Tensor, heads: int,
                    groups: int, head_dim: int, cache_dtype: torch.dtype, softcap: float = 0.0) -> None:
    """Attention of every request of `reqs` in one call: q [rows, >= heads * D] (the queries in its
    first heads * D columns, the model's dtype) -> out [rows, heads * D], each row over the
    visible positions of its own request's cache (layer `layer`), the arithmetic of
    :func:`attention` per row (`softcap` as there)."""
    lib = library()
    fn = lib.sense_attention_f32_multi if cache_dtype == torch.float32 else lib.sense_attention_bf16_multi
    fn(q.data_ptr(), q.stride(0), reqs.bufs.data_ptr(), reqs.caps.data_ptr(), reqs.req.data_ptr(),
       reqs.rowptr.data_ptr(), reqs.idx.data_ptr(), out.data_ptr(), out.stride(0), int(q.dtype == torch.bfloat16),
       reqs.rows, heads, groups, head_dim, reqs.layers, layer, scale, softcap, torch.get_num_threads())


def prefill_attention_ok(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether :func:`prefill_attention` runs here: bfloat16, a head size that is a multiple of 32
    and a CPU with AVX512-BF16 (elsewhere a prompt's prefill attends through torch's SDPA)."""
    return dtype == torch.bfloat16 and head_dim % 32 == 0 and bf16_pairs()


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, scale: float,
                      out: torch.Tensor) -> None:
    """Causal attention of a prompt's prefill from position 0: q [T, >= heads * D] (queries in its
    first heads * D columns), its keys and values already in the cache buffers [1, G, capacity, D]
    at positions 0 .. T-1 -> out [T, heads * D]; blocked on vdpbf16ps (sense_prefill_attention_bf16dp:
    the probabilities rounded to bfloat16 for the product with V, as flash attention takes them).
    Only where :func:`prefill_attention_ok`."""
    t = q.shape[0]
    groups, d = k_cache.shape[1], k_cache.shape[-1]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(2) == d and q.stride(1) == out.stride(1) == 1
    library().sense_prefill_attention_bf16dp(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                                             k_cache.stride(1), out.data_ptr(), out.stride(0), t, heads, groups, d,
                                             scale, torch.get_num_threads())
