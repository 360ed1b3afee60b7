"""Linears on the invariant kernel: :func:`linear_into` (the lean forward's call) and
:class:`PackedWeight` (a module's weight with its packed copy, what a routed ``nn.Linear`` runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from decoding.invariant.build import MAX_ROWS, library
from decoding.invariant.panels import pack_panels, run_linear
from decoding.invariant.tuning import bf16_kernel, ensure_prefetch, large_rows_kernel


def linear_into(packed: torch.Tensor, x: torch.Tensor, n_out: int, threads: int, out: torch.Tensor,
                residual: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                logits: bool = False, kernel: str | None = None) -> torch.Tensor:
    """x [R, K] @ the packed weight's [n_out, K]^T, with pair-packed bfloat16 weights x taken in
    bfloat16 (exact for a bfloat16 model's activations):
    ``out = (residual +) (x @ W^T + bias)`` rounded to out's dtype as torch would round each op,
    written by the kernel itself (no float32 intermediate, no separate add). `out` [R, n_out]
    contiguous, float32 or bfloat16; `residual` like `out` (may be `out`: updated in place);
    `bias` float32; `logits`: out float32 holding the bfloat16-rounded values (a bfloat16
    model's logits, widened). `kernel` ("dp" or "amx") overrides :func:`bf16_kernel` for
    pair-packed weights (to compare the two; a forward must keep the process's choice)."""
    if x.shape[0] > 1:
        ensure_prefetch(packed.dtype, threads)
    if packed.dim() == 4:
        kernel = kernel or bf16_kernel()
    return run_linear(packed, x, n_out, threads, out, residual, bias, logits, kernel)


class PackedWeight:
    """A linear weight [N, K] and its panel-packed copy, repacked if the weight changes (a new
    tensor or dtype, an in-place update of the parameter; writes through ``.data`` bypass the
    version counter and are not seen). The copy costs the weight's memory once more; the original stays
    for forwards of more than MAX_ROWS rows (prefill) where BLAS measured faster (large_rows_kernel).
    Reading the [N, K] layout directly (lanes over the input, one fixed sum tree per output) would
    save the copy but measured 6-14% slower at one row and 20-50% slower at 8-64 rows (README)."""

    def __init__(self, weight: torch.Tensor, source: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.source = weight if source is None else source      # the module's parameter it reads
        self._key: tuple | None = None
        self._packed: torch.Tensor | None = None

    def packed(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w.dtype, w._version)
        if key != self._key:
            self._packed, self._key = pack_panels(w), key
        return self._packed

    def adopt(self, packed: torch.Tensor) -> None:
        """Use `packed` (the same panels, e.g. a view into a fused weight) as the packed copy."""
        current = self.packed()
        if packed.shape != current.shape or packed.dtype != current.dtype:
            raise ValueError(f"packed panels {tuple(packed.shape)} do not match {tuple(current.shape)}")
        self._packed = packed

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` with every output element one fixed chain of FMAs over
        the input dimension (on AVX512-BF16, of bfloat16 pair products), accumulated in float32
        and rounded once to x's dtype."""
        lib = library()
        w = self.weight
        n_out, k = w.shape
        rows = x.numel() // k
        if (lib is None or rows == 0 or w.dtype not in (torch.float32, torch.bfloat16)
                or x.dtype not in (torch.float32, torch.bfloat16)
                or (rows > MAX_ROWS and large_rows_kernel(w.dtype, torch.get_num_threads(), rows) == "torch")):
            return F.linear(x, w, bias)
        out = torch.empty(rows, n_out, dtype=x.dtype)
        linear_into(self.packed(), x.reshape(rows, k), n_out, torch.get_num_threads(), out,
                    bias=None if bias is None else bias.to(torch.float32).contiguous())
        return out.reshape(*x.shape[:-1], n_out)


def _conv1d_types() -> tuple[type, ...]:
    """transformers' ``Conv1D`` (GPT-2 and its kin): a linear layer whose weight is stored
    [in, out] and applied as ``x @ weight + bias``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:         # a transformers without it: no such layers to route
        return ()
    return (Conv1D,)


def module_packed(linear: torch.nn.Module) -> PackedWeight:
    """The packed weight a routed ``nn.Linear`` (or ``Conv1D``, through its transpose) runs on
    (made on first use)."""
    packed = linear.__dict__.get("_sense_packed")
    if packed is None or packed.source is not linear.weight:
        w = linear.weight
        packed = linear.__dict__["_sense_packed"] = PackedWeight(w.t() if isinstance(linear, _conv1d_types()) else w,
                                                                 source=w)
    return packed


def _linear_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module_packed(self)(x, self.bias)
