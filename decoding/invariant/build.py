"""Building and loading the invariant kernels (``decoding/kernels/invariant.c``).

The C file is compiled once per machine and build options (``-O3 -march=native``, or
:func:`march`; OpenMP on torch's runtime) into ``$SENSE_CACHE_DIR/kernels/`` and loaded with
ctypes; no compiler means no invariant mode (:func:`unavailable_reason` says why) and the stock
kernels. What the build can run (AVX512-BF16 pairs, AMX tiles) is asked of it here.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from decoding.measured import cpu_isa
from decoding.model_loader import cache_root

PANEL = 16                  # output columns per block of the linear kernel
MAX_ROWS = 64               # forwards up to this many rows (decode steps, verifications) are invariant
SOURCE = Path(__file__).resolve().parents[1] / "kernels" / "invariant.c"

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


def _source_hash() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:8]


def bf16_pairs() -> bool:
    """Whether bfloat16 linears run on the AVX512-BF16 kernel (``vdpbf16ps``, pair-packed weights)."""
    lib = library()
    return bool(lib is not None and lib.sense_has_bf16dp())


_amx_ok: bool | None = None


def amx_available() -> bool:
    """Whether the AMX tile kernel is built (``-march=native`` on a CPU with AMX-BF16) and Linux
    granted this process the tile state."""
    global _amx_ok
    if _amx_ok is None:
        lib = library()
        _amx_ok = bool(lib is not None and lib.sense_has_amx() and lib.sense_has_bf16dp() and lib.sense_amx_init())
    return _amx_ok
