"""Routing a transformers model through the invariant kernels: its linears and its attention
(:func:`install`), where :func:`supports` says it can run so.
"""

from __future__ import annotations

import torch

from decoding.cpu_kernels import restore_linears, route_linears
from decoding.invariant.attention_ops import ATTENTION, attention_forward
from decoding.invariant.build import turned_off, unavailable_reason
from decoding.invariant.linear import _conv1d_types, _linear_forward, module_packed
from decoding.invariant.tuning import tune_prefetch


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def supports(model: torch.nn.Module) -> str | None:
    """None if `model` can run invariantly here, else why not (one line)."""
    if turned_off():
        return "turned off (SENSE_INVARIANT=0)"
    p = next(model.parameters())
    if p.device.type != "cpu":
        return f"the invariant kernels are CPU kernels; the model is on {p.device.type}"
    if p.dtype not in (torch.float32, torch.bfloat16):
        return f"no invariant kernels for {p.dtype}"
    if getattr(model.config, "alibi", False) or getattr(model.config, "position_embedding_type", None) == "alibi":
        return "ALiBi position biases are not supported by the invariant attention"
    if not _takes_attention_functions(model):
        return (f"{type(model).__name__} computes attention in its own code, not through transformers' "
                f"AttentionInterface, so it cannot run on the invariant attention")
    reason = unavailable_reason()
    if reason:
        return f"the invariant kernels could not be built: {reason}"
    return None


def _takes_attention_functions(model: torch.nn.Module) -> bool:
    """Whether `model`'s attention goes through transformers' AttentionInterface, so that
    :func:`install` can route it (transformers' own check, which ``set_attn_implementation``
    applies; BLOOM and GPT-Neo, for two, keep their own attention code)."""
    can = getattr(type(model), "_can_set_attn_implementation", None)
    return True if can is None else bool(can())


def install(model: torch.nn.Module) -> int:
    """Route `model`'s linears and attention through the invariant kernels (in place); returns the
    number of linears. The caller checks :func:`supports` first."""
    _register()
    previous = model.config._attn_implementation
    if previous != ATTENTION:
        model._sense_attn_before = previous         # what uninstall restores (Gemma 2's eager, say)
    model.set_attn_implementation(ATTENTION)
    p = next(model.parameters())
    tune_prefetch(p.dtype, torch.get_num_threads())       # now, not in the first request's forward
    return install_linears(model)


def install_linears(model: torch.nn.Module) -> int:
    """Route every linear layer under `model` through the invariant linear kernel, packed now
    rather than in the first request: each ``nn.Linear``, and each ``Conv1D`` (GPT-2's layers,
    which BLAS otherwise blocks differently by row count: a row's float32 logits moved by ~3e-7
    between a 1- and a 4-row forward)."""
    def prepare(sub: torch.nn.Module) -> None:
        module_packed(sub).packed()

    return route_linears(model, _linear_forward, prepare=prepare, kinds=(torch.nn.Linear, *_conv1d_types()))


def uninstall(model: torch.nn.Module) -> None:
    restore_linears(model, ("_sense_packed",), kinds=(torch.nn.Linear, *_conv1d_types()))
    model.set_attn_implementation(getattr(model, "_sense_attn_before", None) or "sdpa")
