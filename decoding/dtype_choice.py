"""``dtype="auto"``: run the target in whichever dtype is faster on this machine, by measurement.

Which dtype wins depends on the machine, not the model family: on a CPU with AVX512-BF16 a
bfloat16 verification of 16 tokens costs about what one float32 decode step does; on an AVX2-only
CPU both dtypes run the same float32-accumulating FMA kernels, so bfloat16 only halves the weight
bytes: its decode step, which streams the weights, is ~30% faster, its 16-token verification,
which is arithmetic, about even. So we measure: for each candidate (float32 and bfloat16 on CPU;
bfloat16 and float16 on CUDA) one plain decode step and one 16-token verification, at a short
context, and take the dtype with the smaller geometric mean of the two times relative to the
first candidate's (the two shapes speculative decoding spends its time in, each counted by its
speed-up: a sum of milliseconds would let the verification, which takes 3-4 decode steps on the
AVX2 CPU, outweigh the decode step that every method runs most). The candidates are listed most
precise first, and a less precise one must be at least ``MARGIN`` faster to be taken: a near-tie
keeps the precise dtype instead of flipping between machines and loads with the measurement
noise. The result is remembered per machine, model and device (:mod:`decoding.measured`), so
later loads only read a file.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from decoding.cost import measure_verify_cost
from decoding.errors import ModelLoadError
from decoding.measured import machine, remembered

CANDIDATES = {"cpu": ("float32", "bfloat16"), "cuda": ("bfloat16", "float16")}
EXPLICIT = ("float32", "bfloat16", "float16")
VERIFY_TOKENS = 16
MARGIN = 0.10                       # a less precise dtype must be 10% faster to be taken


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str                      # what the model runs in
    requested: str                  # "auto" or the explicit dtype asked for
    reason: str                     # one line for progress output, stats and /health
    timings_ms: dict = field(default_factory=dict)   # {dtype: {"decode": ms, "verify16": ms}}
    cached: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def explicit(dtype: str, device_type: str = "cpu") -> DtypeChoice:
    """The choice of a dtype asked for by name; its reason warns where it is the slow one."""
    reason = f"{dtype} (asked for)"
    if dtype == "float16" and device_type == "cpu":
        # No float16 kernels of ours on CPU: torch's generic ones, not batch-invariant. `ar` on the
        # embedded model, Zen 4 EPYC: float16 30.7 tok/s, float32 50.6, bfloat16 93.4.
        reason += ("; on CPU float16 runs torch's generic kernels, slower than float32 and bfloat16 "
                   "(auto takes the faster of those)")
    return DtypeChoice(dtype=dtype, requested=dtype, reason=reason)


def check_dtype(dtype: str) -> str:
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(str(dtype).lower(), str(dtype).lower())
    if dtype != "auto" and dtype not in EXPLICIT:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, {', '.join(EXPLICIT)}")
    return dtype


def step_costs_ms(target, *, context_len: int = 64, repeats: int = 5) -> dict:
    """Median milliseconds of a decode step and of a 16-token verification for `target`."""
    context_len = max(1, min(context_len, target.context_window - VERIFY_TOKENS - 2))
    s = measure_verify_cost(target, (VERIFY_TOKENS,), context_len=context_len, repeats=repeats, warmup=2)
    return {"decode": round(s[0] * 1e3, 3), "verify16": round(s[VERIFY_TOKENS] * 1e3, 3)}


def fastest(timings_ms: dict, margin: float = MARGIN) -> str:
    """The dtype whose decode step and 16-token verification are fastest together: the smallest
    geometric mean of the two times relative to the first dtype's. `timings_ms` is ordered most
    precise first, and a later dtype must beat the earlier choice by `margin`."""
    first = next(iter(timings_ms.values()))
    cost = {d: (t["decode"] / first["decode"] * t["verify16"] / first["verify16"]) ** 0.5
            for d, t in timings_ms.items()}
    best = next(iter(cost))
    for d in cost:
        if cost[d] < cost[best] * (1 - margin):
            best = d
    return best


def model_key(hf_model) -> dict:
    """Identifies the model for the cache: its name or path, its config, its size."""
    cfg = hf_model.config.to_dict()
    for volatile in ("torch_dtype", "dtype", "_name_or_path", "transformers_version"):
        cfg.pop(volatile, None)
    return {"name": str(getattr(hf_model.config, "_name_or_path", "")),
            "config": cfg, "params": int(sum(p.numel() for p in hf_model.parameters()))}


def choose_dtype(hf_model, device: torch.device | str, make_target: Callable,
                 kernels: str = "torch") -> tuple[object, DtypeChoice]:
    """Measure the candidate dtypes of `device` (or read the remembered result) for `hf_model`
    (loaded in the first candidate) and return (model in the chosen dtype, choice).

    `make_target(hf_model)` wraps a Hugging Face model into a ``TargetModel`` for measuring.
    The losing copies are dropped before returning.
    """
    device = torch.device(device)
    candidates = CANDIDATES.get(device.type, ("float32",))
    key = {"machine": machine(device), "model": model_key(hf_model), "candidates": list(candidates),
           "kernels": kernels}
    models = {candidates[0]: hf_model}

    def measure() -> dict:
        for dtype in candidates[1:]:    # copies first: wrapping a model may patch its modules
            models[dtype] = copy.deepcopy(hf_model).to(getattr(torch, dtype))
        return {dtype: step_costs_ms(make_target(models[dtype])) for dtype in candidates}

    timings, cached = remembered("dtype", key, measure)
    best = fastest(timings)
    model = models.get(best)
    if model is None:
        model = hf_model.to(getattr(torch, best))
    others = ", ".join(f"{d} {t['decode']:.1f}+{t['verify16']:.1f} ms" for d, t in timings.items())
    reason = (f"{best} (auto: decode step + {VERIFY_TOKENS}-token verification: {others}"
              f"{', remembered' if cached else ', measured now'}; --dtype overrides)")
    return model, DtypeChoice(dtype=best, requested="auto", reason=reason, timings_ms=timings, cached=cached)
