"""Faster small-batch matrix products for float32 CPU inference.

Verifying a draft runs the model on a handful of tokens (M = 2..8 rows). MKL's sgemm picks a
poor path for such shapes on some CPUs (measured on this project's AMD EPYC machines: the
49152x576 LM head costs 2-3x more at M=2..4 than at M=1, and every layer's linears ~1.7x at
M=2), while the transposed product W @ x^T streams the weights once. That makes a 2-4 token
verification cost about as much as one decode step, which is what speculative decoding needs.

These are exact re-orderings of the same product (results differ only by float rounding).
The cut-offs come from bench measurements on the target machine (see bench/results/engine.md).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

LAYER_MAX_ROWS = 4     # W @ x^T for 2..LAYER_MAX_ROWS rows in decoder linears
HEAD_MAX_ROWS = 8      # W @ x^T for 2..HEAD_MAX_ROWS rows in the LM head


def _small_batch_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if 2 <= rows <= LAYER_MAX_ROWS:
        out = torch.matmul(self.weight, x.reshape(rows, -1).t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1)
    return F.linear(x, self.weight, self.bias)


def route_linears(module: torch.nn.Module, forward, *, select=None, prepare=None,
                  kinds: tuple[type, ...] = (torch.nn.Linear,)) -> int:
    """Bind `forward` as the forward of every layer of `kinds` (``nn.Linear``) under `module`
    that `select(sub)` accepts (all by default), after `prepare(sub)`; returns the count. The
    modules change in place; :func:`restore_linears` undoes it."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, kinds) and (select is None or select(sub)):
            if prepare is not None:
                prepare(sub)
            sub.forward = types.MethodType(forward, sub)
            count += 1
    return count


def restore_linears(module: torch.nn.Module, attrs: tuple[str, ...] = (),
                    kinds: tuple[type, ...] = (torch.nn.Linear,)) -> None:
    """Give every layer of `kinds` under `module` its class's forward back, and drop `attrs`."""
    for sub in module.modules():
        if isinstance(sub, kinds):
            for name in ("forward", *attrs):
                sub.__dict__.pop(name, None)


def install_small_batch_linear(module: torch.nn.Module) -> int:
    """Route every float32 nn.Linear under `module` through the small-batch path; returns the count.

    This changes the modules in place (the model then serves ``generate()`` through it too);
    :func:`uninstall_small_batch_linear` restores them.
    """
    return route_linears(module, _small_batch_linear, select=lambda sub: sub.weight.dtype == torch.float32)


def uninstall_small_batch_linear(module: torch.nn.Module) -> None:
    restore_linears(module)


class SmallBatchHead:
    """An LM head [V, H] tuned for 1..8 rows: x @ W^T-contiguous for one row, W @ x^T for a few."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach()
        self.weight_t = self.weight.t().contiguous()   # one extra copy of the head: +V*H floats

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        rows = h.shape[0]
        if rows == 1:
            return h @ self.weight_t
        if rows <= HEAD_MAX_ROWS:
            return torch.matmul(self.weight, h.t()).t()
        return F.linear(h, self.weight)


def wants_cpu_kernels(model: torch.nn.Module) -> bool:
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32
