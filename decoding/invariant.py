"""A batch-invariant target forward on CPU: a row's logits and hidden state do not depend on how
many other rows share the forward.

Strict speculative decoding promises output identical, token for token, to this engine's own
autoregressive decoding. A verification runs T tree nodes in one forward; an autoregressive step
runs one. With BLAS kernels the two round differently (MKL blocks a reduction differently for 1,
4 or 16 rows; SDPA reduces over n+1 keys in a step and n+T masked keys in a verification), so a
near-tied argmax can flip: measured in ``bench/results/invariance.md``, up to 4e-5 in float32 and
0.25 in bfloat16 on the same token's logits. This module designs that out:

- **Linears** (every ``nn.Linear`` of the decoder and the LM head) run through
  ``sense_linear_*`` in ``decoding/kernels/invariant.c``: each output element is one fixed chain
  of 8-lane FMAs over the input dimension and one fixed horizontal sum, whatever the row count.
- On a CPU with **AMX** the bfloat16 linears may run on tiles instead (``sense_linear_bf16amx``:
  ``tdpbf16ps``, the same pair-packed weights, a one-row step a one-row tile): each output is the
  tile instruction's fixed sequence over its own row, so rows stay independent, but the bits are
  not the vector kernel's; a process runs one of the two for every row count (:func:`bf16_kernel`,
  the faster on a decode step plus a 16-row verification, measured). On the Xeon with AMX where
  this was written, a 16-row pass over model-sized weights took 0.35x the vector kernel's time
  and a one-row pass about the same (memory-bound), so verifying a 16-token tree costs about 1.5
  decode steps instead of 3.
- **Attention** runs through ``sense_attention_*``: each query row attends over exactly its
  visible keys, listed in key order (a tree node's prefix and ancestors are the keys the same
  token sees in an autoregressive step, in the same order), with fixed-order dot products, a
  max, one vector exp routine and fixed-order sums.
- Everything else in a Llama-style block (embedding, RMSNorm, rotary, SiLU) is row-wise
  elementwise or a per-row reduction in torch already; ``tests/test_invariance.py`` checks the
  whole target bitwise. The lean forward (decoding/lean_forward.py) runs those steps on C code of
  its own too (:func:`rmsnorm`, :func:`rope_kv`, :func:`silu_mul`, and the linears' epilogues
  that round and add the residual as they store, :func:`linear_into`): one call each instead of a
  dozen torch ops, whose dispatch was a third of a one-row decode step.

Forwards of more than :data:`MAX_ROWS` rows (prompt prefill) need no invariance (both decoding
modes share the same prefill): their attention is a blocked causal kernel on AVX512-BF16 in
bfloat16 (:func:`prefill_attention`, in the lean forward) or torch's SDPA, and their linears run on
whichever kernel measured faster on this machine at about their row count (:func:`large_rows_kernel`,
remembered per machine). On the AVX2 machine ours won, narrowly in float32 (3.3 vs 3.6 ms at 256 rows; 3.1 vs
6.1 in a noisier run) and 7x in bfloat16, which MKL emulates there; a CPU with native bfloat16
matrix units may well choose torch.

Each call uses ``torch.get_num_threads()`` threads (passed explicitly: OpenMP's own default is
per calling thread, and serving calls from worker threads). The C file is compiled once per machine (``-O3 -march=native``, or :func:`march`; OpenMP on torch's runtime) into
``$SENSE_CACHE_DIR/kernels/`` and loaded with ctypes; no compiler means no invariant mode
(:func:`unavailable_reason` says why) and the stock kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from decoding.cpu_kernels import restore_linears, route_linears
from decoding.measured import cpu_isa, machine, remembered
from decoding.model_loader import cache_root

PANEL = 16                  # output columns per block of the linear kernel
MAX_ROWS = 64               # forwards up to this many rows (decode steps, verifications) are invariant
ATTENTION = "sense_invariant"
SOURCE = Path(__file__).with_name("kernels") / "invariant.c"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


MARCH_ENV = "SENSE_KERNEL_MARCH"     # the build's -march (default native; x86-64-v3: the AVX2 code)


def march() -> str:
    """The ``-march`` the kernels are built for: this CPU's (``native``), or ``$SENSE_KERNEL_MARCH``
    (``x86-64-v3`` builds the AVX2 code and ``x86-64`` the portable one on any x86 CPU: how the
    tests check the code paths of machines other than the one they run on)."""
    value = os.environ.get(MARCH_ENV, "").strip() or "native"
    if not value.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"{MARCH_ENV} must be a -march name such as native or x86-64-v3, got {value!r}")
    return value


def _compile(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        cmd = [cc, "-O3", f"-march={march()}", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC",
               str(SOURCE), "-o", str(so), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip().splitlines()[-1:]}")
        os.replace(so, out)     # atomic: a concurrent loader sees the old file or the whole new one


def _library_path() -> Path:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(cpu_isa()).encode())
    h.update(os.environ.get("CC", "").encode())
    if march() != "native":
        h.update(march().encode())
    return cache_root() / "kernels" / f"invariant-{h.hexdigest()[:16]}.so"


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None if they cannot be built here."""
    global _lib, _error
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None or _error is not None:
            return _lib
        try:
            path = _library_path()
            if not path.exists():
                _compile(path)
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError, ValueError) as e:
            _error = str(e)
            return None
        p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
        for name in ("sense_linear_f32", "sense_linear_bf16", "sense_linear_bf16dp", "sense_linear_bf16amx"):
            getattr(lib, name).argtypes = [p, p, i64, p, p, p, p, i, i, i, i, i]
            getattr(lib, name).restype = None
        for name in ("sense_attention_f32", "sense_attention_bf16"):
            getattr(lib, name).argtypes = [p, i64, p, p, i64, i64, i64, p, p, p, i64, i, i, i, i, i, i, f, f, i]
            getattr(lib, name).restype = None
        for name in ("sense_attention_f32_multi", "sense_attention_bf16_multi"):
            getattr(lib, name).argtypes = [p, i64, p, p, p, p, p, p, i64, i, i, i, i, i, i, i, f, f, i]
            getattr(lib, name).restype = None
        lib.sense_prefill_attention_bf16dp.argtypes = [p, i64, p, p, i64, p, i64, i, i, i, i, f, i]
        lib.sense_prefill_attention_bf16dp.restype = None
        lib.sense_rope_kv_multi.argtypes = [p, i64, i, i, i, p, p, p, p, p, p, i, i, i, i, i]
        lib.sense_rope_kv_multi.restype = None
        lib.sense_rmsnorm.argtypes = [p, p, p, i, i, f, i, i]
        lib.sense_rmsnorm_heads.argtypes = [p, i64, i, i, i, i, p, f, i, i]
        lib.sense_rope_kv.argtypes = [p, i64, i, i, i, i, p, p, p, p, i64, i64, i]
        lib.sense_silu_mul.argtypes = [p, p, i, i, i, i]
        lib.sense_gelu_tanh_mul.argtypes = [p, p, i, i, i, i]
        lib.sense_rmsnorm_offset.argtypes = [p, p, p, i, i, f, i, i]
        lib.sense_rmsnorm_offset_heads.argtypes = [p, i64, i, i, i, i, p, f, i, i]
        for name in ("sense_rmsnorm", "sense_rmsnorm_heads", "sense_rope_kv", "sense_silu_mul", "sense_gelu_tanh_mul",
                     "sense_rmsnorm_offset", "sense_rmsnorm_offset_heads"):
            getattr(lib, name).restype = None
        lib.sense_set_prefetch.argtypes = [i, i, i]         # (bf16, rows range, mode)
        lib.sense_set_prefetch.restype = None
        lib.sense_prefetch.argtypes = [i, i]
        lib.sense_prefetch.restype = ctypes.c_int
        lib.sense_decoder_layers.argtypes = [p, p, p, p, p, p, p, p, p, i, i, i, i, i, i, i, i, p, p, p, p, p, p, i,
                                             p, p, p, f, i, p, i]
        lib.sense_decoder_layers.restype = None
        lib.sense_has_bf16dp.restype = ctypes.c_int
        lib.sense_has_amx.restype = ctypes.c_int
        lib.sense_amx_init.restype = ctypes.c_int
        lib.sense_kernel_isa.restype = ctypes.c_char_p
        _lib = lib
        return _lib


def unavailable_reason() -> str | None:
    library()
    return _error


def turned_off() -> bool:
    return os.environ.get("SENSE_INVARIANT", "1").lower() in ("0", "off", "false", "no")


def kernel_id() -> str:
    """Names the kernels a measurement was made with: ``invariant-<source hash>-<isa>`` or ``none``."""
    lib = library()
    if lib is None:
        return "none"
    return f"invariant-{_source_hash()}-{kernel_isa()}"


def _source_hash() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:8]


def kernel_isa() -> str:
    """The instruction sets the kernels run on (``+amx`` when bfloat16 linears take the tile kernel)."""
    lib = library()
    if lib is None:
        return "none"
    return lib.sense_kernel_isa().decode() + ("+amx" if bf16_kernel() == "amx" else "")


# -- linear -----------------------------------------------------------------------------------

def bf16_pairs() -> bool:
    """Whether bfloat16 linears run on the AVX512-BF16 kernel (``vdpbf16ps``, pair-packed weights)."""
    lib = library()
    return bool(lib is not None and lib.sense_has_bf16dp())


_amx_ok: bool | None = None
_bf16_kernel: str | None = None
BF16_KERNELS = ("dp", "amx")


def amx_available() -> bool:
    """Whether the AMX tile kernel is built (``-march=native`` on a CPU with AMX-BF16) and Linux
    granted this process the tile state."""
    global _amx_ok
    if _amx_ok is None:
        lib = library()
        _amx_ok = bool(lib is not None and lib.sense_has_amx() and lib.sense_has_bf16dp() and lib.sense_amx_init())
    return _amx_ok


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
    import statistics
    import time

    g = torch.Generator().manual_seed(0)
    weights = [pack_panels(torch.randn(1536, 576, generator=g).to(torch.bfloat16)) for _ in range(56)]
    xs = [torch.randn(r, 576, generator=g).to(torch.bfloat16) for r in (1, 16)]
    outs = [torch.empty(x.shape[0], 1536, dtype=torch.bfloat16) for x in xs]
    threads = torch.get_num_threads()
    times: dict[str, list[float]] = {k: [] for k in BF16_KERNELS}
    for rep in range(repeats + 1):
        for kind in BF16_KERNELS:
            t0 = time.perf_counter()
            for x, out in zip(xs, outs):
                for w in weights:
                    linear_into(w, x, 1536, threads, out, kernel=kind)
            if rep:
                times[kind].append(time.perf_counter() - t0)
    return {f"{k}_ms": round(statistics.median(v) * 1e3, 3) for k, v in times.items()}


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


# Where a linear's float32 accumulators go (the epilogue in invariant.c): each mode is the same
# arithmetic as the torch ops it replaces, so fusing them changes no bit.
EPI_F32, EPI_BF16, EPI_BF16_RESIDUAL, EPI_F32_RESIDUAL, EPI_F32_VIA_BF16 = range(5)


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
    bf16 = out.dtype == torch.bfloat16
    if logits:
        mode = EPI_F32_VIA_BF16 if x.dtype == torch.bfloat16 else EPI_F32
    elif residual is not None:
        mode = EPI_BF16_RESIDUAL if bf16 else EPI_F32_RESIDUAL
    else:
        mode = EPI_BF16 if bf16 else EPI_F32
    y = out if mode in (EPI_F32, EPI_F32_VIA_BF16) else None
    _run_linear(packed, x, n_out, threads, y, out, residual, bias, mode, kernel)
    return out


def _run_linear(packed, x, n_out, threads, y, out, residual, bias, mode, kernel=None) -> None:
    lib = library()
    rows, k = x.shape
    if rows > 1 and (packed.dtype, threads) not in _prefetch_tuned:
        tune_prefetch(packed.dtype, threads)
    ptr = lambda t: None if t is None else t.data_ptr()     # noqa: E731
    args = (ptr(y), ptr(out), ptr(residual), ptr(bias), mode)
    if packed.dim() == 4:           # pair-packed bfloat16 (pack_panels): x in bfloat16 too
        k2 = packed.shape[1]
        xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
        if 2 * k2 != k:
            xb = F.pad(xb, (0, 2 * k2 - k))
        if not xb.is_contiguous():
            xb = xb.contiguous()
        kernel = kernel or bf16_kernel()
        if kernel == "amx" and not amx_available():
            raise ValueError("no AMX tile kernel on this CPU or build")
        # AMX tiles take 32 k at a time: a weight with K not a multiple of 32 stays on "dp" (per
        # weight, so still the same kernel for every row count).
        fn = lib.sense_linear_bf16amx if k2 % 16 == 0 and kernel == "amx" else lib.sense_linear_bf16dp
        fn(xb.data_ptr(), packed.data_ptr(), 2 * PANEL * k2, *args, rows, 2 * k2, n_out, threads)
        return
    xf = x.to(torch.float32).contiguous()
    fn = lib.sense_linear_f32 if packed.dtype == torch.float32 else lib.sense_linear_bf16
    fn(xf.data_ptr(), packed.data_ptr(), PANEL * k, *args, rows, k, n_out, threads)


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


def _time_prefetch(dtype: torch.dtype, threads: int, repeats: int = 5) -> dict:
    """ms of passes through 85 MB of 576 -> 1536 weights (beyond a CPU's last-level cache, as a
    model's are) at each range's row counts (PREFETCH_ROWS) in every mode, the modes' order
    rotated each repeat, medians of `repeats`: {"two": {"off": ms, "l2": ms, ...}, ...}."""
    import statistics
    import time

    lib = library()
    bf16 = int(dtype == torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    packs = [pack_panels(torch.randn(1536, 576, generator=g).to(dtype)) for _ in range(48 if bf16 else 24)]
    result = {}
    for i, (kind, rows) in enumerate(PREFETCH_ROWS.items()):
        xs = [torch.randn(r, 576, generator=g).to(dtype) for r in rows]
        outs = [torch.empty(x.shape[0], 1536, dtype=dtype) for x in xs]
        times: dict[int, list[float]] = {m: [] for m in range(len(PREFETCH_MODES))}
        for rep in range(repeats + 1):
            for j in range(len(PREFETCH_MODES)):
                mode = (j + rep) % len(PREFETCH_MODES)
                lib.sense_set_prefetch(bf16, i, mode)
                t0 = time.perf_counter()
                for x, out in zip(xs, outs):
                    for p in packs:
                        linear_into(p, x, 1536, threads, out)
                if rep:
                    times[mode].append(time.perf_counter() - t0)
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
    import statistics
    import time

    g = torch.Generator().manual_seed(0)
    weights = 48 if dtype.itemsize == 2 else 24
    ws = [torch.randn(1536, 576, generator=g).to(dtype) for _ in range(weights)]
    packs = [pack_panels(w) for w in ws]
    x = torch.randn(rows, 576, generator=g).to(dtype)
    out = torch.empty(rows, 1536, dtype=dtype)

    def ours():
        for p in packs:
            linear_into(p, x, 1536, threads, out)

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


# -- attention --------------------------------------------------------------------------------

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


# -- the elementwise steps of a Llama-family layer (decoding/lean_forward.py) ------------------

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


def rope_kv_multi(qkv: torch.Tensor, heads: int, groups: int, cos: torch.Tensor, sin: torch.Tensor,
                  reqs: Requests, layer: int) -> None:
    """:func:`rope_kv` of every request of `reqs` in one call (layer `layer` of their caches)."""
    d = cos.shape[-1]
    library().sense_rope_kv_multi(qkv.data_ptr(), qkv.stride(0), heads, groups, d, cos.data_ptr(), sin.data_ptr(),
                                  reqs.bufs.data_ptr(), reqs.caps.data_ptr(), reqs.starts.data_ptr(),
                                  reqs.bounds.data_ptr(), reqs.n, reqs.layers, layer,
                                  int(qkv.dtype == torch.bfloat16), torch.get_num_threads())


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
