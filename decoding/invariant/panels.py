"""The invariant linear kernel's weight layout and its call: each output element one fixed chain
of FMAs over the input dimension, whatever the row count (``sense_linear_*``).

Which bfloat16 kernel and prefetch a process runs are measured choices
(:mod:`decoding.invariant.tuning`); :func:`decoding.invariant.linear.linear_into` makes them and
calls :func:`run_linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from decoding.invariant.build import PANEL, amx_available, bf16_pairs, library


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/16), K, 16], zero-padded: each block of 16 outputs contiguous in memory,
    the order the kernel streams it (one pass over the weights per 6 input rows); in bfloat16 the
    16 of each k interleaved (outputs 0, 8, 1, 9, ..., 7, 15: each 32-bit lane one output of
    either half, which widens to float32 in one instruction). bfloat16 on a
    CPU with AVX512-BF16: [ceil(N/16), ceil(K/2), 16, 2], the pairs of k of each output together
    (K padded with a zero column when odd), the layout of the ``vdpbf16ps`` kernel (one pass over
    the weights per 4 input rows)."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    if weight.dtype == torch.bfloat16 and bf16_pairs():
        k2 = -(-k // 2)
        padded = torch.zeros(panels * PANEL, 2 * k2, dtype=weight.dtype)
        padded[:n, :k] = weight.detach()
        return padded.view(panels, PANEL, k2, 2).permute(0, 2, 1, 3).contiguous()
    padded = torch.zeros(panels * PANEL, k, dtype=weight.dtype)
    padded[:n] = weight.detach()
    if weight.dtype == torch.bfloat16:
        # the widened-FMA kernel's bfloat16: each 16 interleaved, output i then output 8 + i, so
        # that one 32-bit lane holds one output of each half (v_load_bf16_half widens either
        # half in one instruction)
        return padded.view(panels, 2, PANEL // 2, k).permute(0, 3, 2, 1).reshape(panels, k, PANEL)
    return padded.view(panels, PANEL, k).transpose(1, 2).contiguous()


# Where a linear's float32 accumulators go (the epilogue in invariant.c): each mode is the same
# arithmetic as the torch ops it replaces, so fusing them changes no bit.
EPI_F32, EPI_BF16, EPI_BF16_RESIDUAL, EPI_F32_RESIDUAL, EPI_F32_VIA_BF16 = range(5)


def run_linear(packed: torch.Tensor, x: torch.Tensor, n_out: int, threads: int, out: torch.Tensor,
               residual: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               logits: bool = False, kernel: str | None = None) -> torch.Tensor:
    """:func:`decoding.invariant.linear.linear_into` with the kernel given (``"dp"`` or ``"amx"``
    for pair-packed bfloat16 weights) and the prefetch as set: the call itself, no choice made."""
    bf16 = out.dtype == torch.bfloat16
    if logits:
        mode = EPI_F32_VIA_BF16 if x.dtype == torch.bfloat16 else EPI_F32
    elif residual is not None:
        mode = EPI_BF16_RESIDUAL if bf16 else EPI_F32_RESIDUAL
    else:
        mode = EPI_BF16 if bf16 else EPI_F32
    y = out if mode in (EPI_F32, EPI_F32_VIA_BF16) else None
    lib = library()
    rows, k = x.shape
    ptr = lambda t: None if t is None else t.data_ptr()     # noqa: E731
    args = (ptr(y), ptr(out), ptr(residual), ptr(bias), mode)
    if packed.dim() == 4:           # pair-packed bfloat16 (pack_panels): x in bfloat16 too
        k2 = packed.shape[1]
        xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
        if 2 * k2 != k:
            xb = F.pad(xb, (0, 2 * k2 - k))
        if not xb.is_contiguous():
            xb = xb.contiguous()
        if kernel not in ("dp", "amx"):
            raise ValueError(f"pair-packed bfloat16 weights run on the dp or amx kernel, not {kernel!r}")
        if kernel == "amx" and not amx_available():
            raise ValueError("no AMX tile kernel on this CPU or build")
        # AMX tiles take 32 k at a time: a weight with K not a multiple of 32 stays on "dp" (per
        # weight, so still the same kernel for every row count).
        fn = lib.sense_linear_bf16amx if k2 % 16 == 0 and kernel == "amx" else lib.sense_linear_bf16dp
        fn(xb.data_ptr(), packed.data_ptr(), 2 * PANEL * k2, *args, rows, 2 * k2, n_out, threads)
        return out
    xf = x.to(torch.float32).contiguous()
    fn = lib.sense_linear_f32 if packed.dtype == torch.float32 else lib.sense_linear_bf16
    fn(xf.data_ptr(), packed.data_ptr(), PANEL * k, *args, rows, k, n_out, threads)
    return out
