"""Measurements of this machine kept on disk, so a later load does not measure again.

A measurement (which dtype is faster, the verify cost curve) holds for one machine, one model,
one device and one thread count; its file name is a hash of exactly those, so a different CPU
(an AVX2-only kind beside an AVX-512/BF16 one), another torch build or another thread count
measures afresh. Files live under ``$SENSE_CACHE_DIR/measured/`` (default
``~/.cache/sense/measured``) and are written atomically; delete one to measure again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from decoding.model_loader import cache_root

# The CPU features that decide which kernels torch can use for float32 / bfloat16 / float16.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve",
              "bf16")


def cpu_isa() -> list[str]:
    """The ISA extensions of this CPU that matter for matmul kernels (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return [platform.machine()]
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return [f for f in _ISA_FLAGS if f in have]
    return [platform.machine()]


def isa_summary(flags: list[str] | None = None) -> str:
    """The widest vector ISA among `flags` (default: this CPU's): "avx512 + bf16", "avx2", ..."""
    f = set(cpu_isa() if flags is None else flags)
    if "avx512f" in f:
        return "avx512" + (" + bf16" if "avx512_bf16" in f else "") + (" + amx" if "amx_tile" in f else "")
    for name in ("avx2", "asimd", "sve"):
        if name in f:
            return name
    return "other"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str = "cpu") -> dict:
    """What a measurement depends on besides the model: CPU/GPU kind, torch build, threads."""
    device = torch.device(device)
    d = {"cpu": cpu_name(), "isa": cpu_isa(), "torch": torch.__version__, "threads": torch.get_num_threads(),
         "device": device.type}
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    return d


def remembered(kind: str, key: dict, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """``compute()``'s result for `key`, from the cache if measured before; returns (value, cached).

    Processes sharing the cache agree: the first to need a value measures it under a file lock
    while the others wait, then read what it stored. Two processes measuring at once (a build's
    Ray workers starting together) would each keep their own answer, and a choice made from a
    close measurement (which kernel is faster) could then differ between them: the same entries
    computed with other rounding."""
    text = json.dumps(key, sort_keys=True, default=str)
    key = json.loads(text)              # as it reads back from the file
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    path = cache_root() / "measured" / f"{kind}-{digest}.json"
    stored = _read(path, key)
    if stored is not None:
        return stored, True
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")
    except OSError:                     # a read-only cache: measure here, remember nothing
        return compute(), False
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stored = _read(path, key)       # measured by another process while this one waited
        if stored is not None:
            return stored, True
        value = compute()
        fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"key": key, "value": value}, f, indent=1)
            os.replace(tmp, path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)    # a full disk only costs a re-measure next time
    return value, False


def _read(path: Path, key: dict) -> dict | None:
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["value"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return None
