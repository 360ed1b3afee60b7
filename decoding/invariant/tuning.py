"""The invariant linears' measured choices, each made once per machine and remembered on disk
(:func:`decoding.measured.remembered`): which bfloat16 kernel a process runs (:func:`bf16_kernel`),
how the kernels prefetch (:func:`tune_prefetch`), and which kernel runs a prompt's many-row
linears (:func:`large_rows_kernel`). None changes a bit of an invariant forward's result but
the bfloat16 kernel, which is chosen once per process, before its first linear.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import torch
import torch.nn.functional as F

from decoding.invariant.build import _source_hash, amx_available, library
from decoding.invariant.panels import pack_panels, run_linear
from decoding.measured import machine, remembered

_bf16_kernel: str | None = None
BF16_KERNELS = ("dp", "amx")


def bf16_kernel() -> str:
    """Which kernel runs this process's pair-packed bfloat16 linears: ``"dp"`` (``vdpbf16ps``,
    16 outputs a vector) or ``"amx"`` (``tdpbf16ps`` tiles). The two round differently, so one
    is chosen per process, before the first linear, for every row count (a decode step and a
    verification must run the same one). ``SENSE_BF16_KERNEL`` forces one; otherwise "amx" when
    at least 10% faster on a one-row decode step plus a 16-row verification of model-sized
    weights out of cache, measured once per machine and kernel source and remembered on disk
    (processes sharing the cache share the answer). Without AMX: "dp"."""
    global _bf16_kernel
    if _bf16_kernel is None:
        forced = os.environ.get("SENSE_BF16_KERNEL", "").strip().lower()
        if forced and forced not in BF16_KERNELS:
            raise ValueError(f"SENSE_BF16_KERNEL must be one of {', '.join(BF16_KERNELS)}, got {forced!r}")
        if forced == "amx" and not amx_available():
            raise ValueError("SENSE_BF16_KERNEL=amx, but this CPU or build has no AMX tile kernel")
        if forced:
            _bf16_kernel = forced
        elif not amx_available():
            _bf16_kernel = "dp"
        else:
            key = {"machine": machine("cpu"), "kernels": _source_hash(), "threads": torch.get_num_threads()}
            value, _ = remembered("bf16_kernel", key, _time_bf16_kernels)
            # AMX only when clearly faster: a near tie would be a coin flip between machines of
            # one kind (their datastores then rounded differently).
            _bf16_kernel = "amx" if value["amx_ms"] < 0.9 * value["dp_ms"] else "dp"
    return _bf16_kernel


def _time_bf16_kernels(repeats: int = 7) -> dict:
    """Milliseconds of a one-row plus a 16-row pass over 96 MiB of bfloat16 weights (more than a
    cache holds, as a model's are), per kernel: medians of `repeats`, kernels alternating."""
    g = torch.Generator().manual_seed(0)
    weights = [pack_panels(torch.randn(1536, 576, generator=g).to(torch.bfloat16)) for _ in range(56)]
    xs = [torch.randn(r, 576, generator=g).to(torch.bfloat16) for r in (1, 16)]
    outs = [torch.empty(x.shape[0], 1536, dtype=torch.bfloat16) for x in xs]
    threads = torch.get_num_threads()
    times: dict[str, list[float]] = {k: [] for k in BF16_KERNELS}
    for rep in range(repeats + 1):
        for kind in BF16_KERNELS:
            took = _passes(weights, xs, outs, threads, kind)
            if rep:
                times[kind].append(took)
    return {f"{k}_ms": round(statistics.median(v) * 1e3, 3) for k, v in times.items()}


def _passes(packs: list[torch.Tensor], xs: list[torch.Tensor], outs: list[torch.Tensor], threads: int,
            kernel: str | None) -> float:
    """Seconds of every input block of `xs` through every packed 576 -> 1536 weight of `packs`."""
    t0 = time.perf_counter()
    for x, out in zip(xs, outs):
        for p in packs:
            run_linear(p, x, 1536, threads, out, kernel=kernel)
    return time.perf_counter() - t0


def kernel_id() -> str:
    """Names the kernels a measurement was made with: ``invariant-<source hash>-<isa>`` or ``none``."""
    lib = library()
    if lib is None:
        return "none"
    return f"invariant-{_source_hash()}-{kernel_isa()}"


def kernel_isa() -> str:
    """The instruction sets the kernels run on (``+amx`` when bfloat16 linears take the tile kernel)."""
    lib = library()
    if lib is None:
        return "none"
    return lib.sense_kernel_isa().decode() + ("+amx" if bf16_kernel() == "amx" else "")


_prefetch_tuned: set[tuple] = set()
_prefetch_lock = threading.Lock()
PREFETCH_ENV = "SENSE_PREFETCH"


PREFETCH_ROWS = {"two": (2,), "few": (3, 4), "many": (8, 16)}   # the row counts each range is timed at (5 on: "many")
PREFETCH_MODES = ("off", "l2", "l1", "nta")     # the kernels' modes, in their order (PF_OFF, ...)


def tune_prefetch(dtype: torch.dtype, threads: int) -> dict[str, str]:
    """How the linears of `dtype` weights prefetch their next group of panels while their later
    row blocks compute (decoding/kernels/invariant.c), for 2 rows ("two"), 3-4 ("few") and more
    ("many"): not at all, into L2, into L1 or non-temporal (:data:`PREFETCH_MODES`), whichever
    measured fastest on this machine (on the Zen 4 EPYC into L2 paid 20-30% at 5-17 rows; on the
    Zen 5 EPYC L1 or non-temporal beat L2 by 10-13% at 3-17 rows and none was best at 2; on the
    AVX2 EPYC prefetching cost up to 20% at 2 rows), from passes over model-sized weights in each
    mode (:func:`_time_prefetch`), measured once per machine, kernels, dtype and thread count and
    remembered on disk; set in the kernels for this process. ``SENSE_PREFETCH`` forces every
    range: a mode's name, or ``0`` (off) / ``1`` (into L2). Prefetches change no arithmetic: the
    bits are the same in every mode."""
    lib = library()
    if lib is None:
        return {}
    bf16 = int(dtype == torch.bfloat16)
    with _prefetch_lock:
        if (dtype, threads) not in _prefetch_tuned:
            _prefetch_tuned.add((dtype, threads))   # first: the measurement below runs linears itself
            forced = os.environ.get(PREFETCH_ENV, "").strip().lower()
            forced = {"0": "off", "1": "l2", "on": "l2", "true": "l2", "yes": "l2", "false": "off",
                      "no": "off"}.get(forced, forced)
            if forced in PREFETCH_MODES:
                modes = {kind: forced for kind in PREFETCH_ROWS}
            else:
                key = {"machine": machine("cpu"), "kernels": kernel_id(), "dtype": str(dtype), "threads": threads}
                value, _ = remembered("prefetch", key, lambda: _time_prefetch(dtype, threads), quiet=True)
                modes = {kind: min(PREFETCH_MODES, key=lambda m: value[kind][m]) for kind in PREFETCH_ROWS}
            for i, kind in enumerate(PREFETCH_ROWS):
                lib.sense_set_prefetch(bf16, i, PREFETCH_MODES.index(modes[kind]))
        return {kind: PREFETCH_MODES[lib.sense_prefetch(bf16, i)] for i, kind in enumerate(PREFETCH_ROWS)}


def ensure_prefetch(dtype: torch.dtype, threads: int) -> None:
    """:func:`tune_prefetch` unless done already in this process (the check of every many-row linear)."""
    if (dtype, threads) not in _prefetch_tuned:
        tune_prefetch(dtype, threads)


def _time_prefetch(dtype: torch.dtype, threads: int, repeats: int = 5) -> dict:
    """ms of passes through 85 MB of 576 -> 1536 weights (beyond a CPU's last-level cache, as a
    model's are) at each range's row counts (PREFETCH_ROWS) in every mode, the modes' order
    rotated each repeat, medians of `repeats`: {"two": {"off": ms, "l2": ms, ...}, ...}."""
    lib = library()
    bf16 = int(dtype == torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    packs = [pack_panels(torch.randn(1536, 576, generator=g).to(dtype)) for _ in range(48 if bf16 else 24)]
    kernel = bf16_kernel() if packs[0].dim() == 4 else None
    result = {}
    for i, (kind, rows) in enumerate(PREFETCH_ROWS.items()):
        xs = [torch.randn(r, 576, generator=g).to(dtype) for r in rows]
        outs = [torch.empty(x.shape[0], 1536, dtype=dtype) for x in xs]
        times: dict[int, list[float]] = {m: [] for m in range(len(PREFETCH_MODES))}
        for rep in range(repeats + 1):
            for j in range(len(PREFETCH_MODES)):
                mode = (j + rep) % len(PREFETCH_MODES)
                lib.sense_set_prefetch(bf16, i, mode)
                took = _passes(packs, xs, outs, threads, kernel)
                if rep:
                    times[mode].append(took)
        result[kind] = {name: round(statistics.median(times[m]) * 1e3, 3) for m, name in enumerate(PREFETCH_MODES)}
    return result


_large: dict[tuple, str] = {}
LARGE_ROWS = (128, 512)     # the row counts the two kernels are timed at: prompts up to 256 tokens by the first


def large_rows_kernel(dtype: torch.dtype, threads: int, rows: int) -> str:
    """"ours" or "torch": which kernel runs a linear of `rows` (more than MAX_ROWS) rows in `dtype`
    on `threads` threads, whichever was faster at 128 rows (for up to 256 rows) or 512 (beyond)
    (:func:`_time_large_rows`), measured once per machine, kernels, dtype, thread count and row
    count and remembered on disk. (On the AVX512-BF16 VM ours was faster at 128 rows, the two
    even at 512: a prefill of 80 tokens 74 ms on ours, 104 on torch's; of 1,000, 1,003 and 963.)"""
    size = LARGE_ROWS[0] if rows <= 2 * LARGE_ROWS[0] else LARGE_ROWS[1]
    memo = _large.get((dtype, threads, size))
    if memo is None:
        key = {"machine": machine("cpu"), "kernels": kernel_id(), "dtype": str(dtype), "threads": threads,
               "rows": size}
        value, _ = remembered("large_linear", key, lambda: _time_large_rows(dtype, threads, size))
        memo = _large[(dtype, threads, size)] = "ours" if value["ours_ms"] < value["torch_ms"] else "torch"
    return memo


DECISIVE = 1.5      # a kernel this many times slower than the other in every timing so far has lost


def decisive(times: dict[str, list[float]], least: int = 2) -> bool:
    """Whether `least` or more timings of each kernel already decide: every one of the slower
    kernel's is over DECISIVE times every one of the faster's. (On the AVX2 EPYC torch's bfloat16
    linear, which MKL emulates there, ran 7-8x slower than ours: the four repeats after the second
    took 12 of a 512-row measurement's 21 s and told nothing new.)"""
    if min(len(v) for v in times.values()) < least:
        return False
    lo, hi = sorted(times.values(), key=max)
    return max(lo) * DECISIVE < min(hi)


def _time_large_rows(dtype: torch.dtype, threads: int, rows: int, repeats: int = 6) -> dict:
    """ms of `rows` x 576 -> 1536 through 85 MB of different weights in turn (beyond a CPU's
    last-level cache, as a prefill streams the model's), on each kernel,
    alternating, median of `repeats`, or of fewer once they are :func:`decisive`. Timed on one
    weight alone (in cache) the two were within 5% at 128 rows on the AVX512-BF16 VM; cold, as in
    a prefill, ours was 17% faster (the model's 80-token prefill 74 against 104 ms)."""
    g = torch.Generator().manual_seed(0)
    weights = 48 if dtype.itemsize == 2 else 24
    ws = [torch.randn(1536, 576, generator=g).to(dtype) for _ in range(weights)]
    packs = [pack_panels(w) for w in ws]
    x = torch.randn(rows, 576, generator=g).to(dtype)
    out = torch.empty(rows, 1536, dtype=dtype)
    kernel = bf16_kernel() if packs[0].dim() == 4 else None
    tune_prefetch(dtype, threads)           # as a prompt's linears run

    def ours():
        for p in packs:
            run_linear(p, x, 1536, threads, out, kernel=kernel)

    def theirs():
        for w in ws:
            F.linear(x, w)

    times: dict[str, list[float]] = {"ours": [], "torch": []}
    with torch.inference_mode():
        for rep in range(repeats + 1):
            for name, f in (("ours", ours), ("torch", theirs))[::1 if rep % 2 else -1]:
                t0 = time.perf_counter()
                f()
                if rep:
                    times[name].append(time.perf_counter() - t0)
            if decisive(times):
                break
    return {f"{k}_ms": round(statistics.median(v) * 1e3 / weights, 4) for k, v in times.items()}
