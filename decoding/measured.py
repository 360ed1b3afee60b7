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
import time
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


QUIET_LIMIT = 0.10          # others may take at most this share of a timing's cores (see contention)
QUIET_ATTEMPTS = 2          # timings tried before a busy machine's is kept as provisional
QUIET_PROBE_S = 0.25        # how long a reader of a provisional timing watches the machine
QUIET_TRIES = 3             # measurements of a timing (by any processes) after which the least disturbed is final


def remembered(kind: str, key: dict, compute: Callable[[], dict], *, quiet: bool = False) -> tuple[dict, bool]:
    """``compute()``'s result for `key`, from the cache if measured before; returns (value, cached).

    Processes sharing the cache agree: the first to need a value measures it under a file lock
    while the others wait, then read what it stored. Two processes measuring at once (a build's
    Ray workers starting together) would each keep their own answer, and a choice made from a
    close measurement (which kernel is faster) could then differ between them: the same entries
    computed with other rounding.

    `quiet`: `compute` is a timing that only prices (a cost curve; not a choice that changes bits,
    which processes must share whatever it measured), and a timing taken while other processes used
    the cores it runs on is wrong for as long as it is remembered: a serving replica that measured
    its verify cost curve while its sibling deployments loaded read 16-token verifications at 4.6
    decode steps (2.7 quiet) and drafted small trees ever after. So the share of the timing's own
    cores that other processes and the hypervisor took during it is read from ``/proc/stat``
    (:func:`contention`) and stored with it; above ``QUIET_LIMIT`` the timing is taken again after
    a pause, and if the contention stays the less disturbed one is stored as provisional: used by
    whoever finds the machine busy too (a test driver polling beside its servers), measured again
    by the first process that finds it quiet (watched for ``QUIET_PROBE_S``), which replaces it
    if less disturbed; after ``QUIET_TRIES`` measurements the least disturbed is final (a replica
    on every core of a node whose Ray daemons always take some of it would otherwise measure again
    at every start: 50 s of the batch cost model on two threads of the 2-core AVX2 EPYC).
    A timing on fewer threads than the machine has cores is not disturbed by others running on the
    cores it leaves free (a one-thread serving replica beside Ray's own daemons, which use 10-25%
    of a 2-core machine: judged by the whole machine's share, as this was before, every replica
    start measured again, 20-90 s of the batch cost model, and stored provisional again)."""
    text = json.dumps(key, sort_keys=True, default=str)
    key = json.loads(text)              # as it reads back from the file
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    path = cache_root() / "measured" / f"{kind}-{digest}.json"
    stored = _read_entry(path, key)
    if stored is not None and not (quiet and _provisional(stored) and _quiet_now()):
        return stored["value"], True
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")
    except OSError:                     # a read-only cache: measure here, remember nothing
        return (_quietly(compute)[0] if quiet else compute()), False
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        again = _read_entry(path, key)  # measured by another process while this one waited
        if again is not None and (again != stored or not quiet or not _provisional(again)):
            return again["value"], True
        value, busy = _quietly(compute) if quiet else (compute(), None)
        cached = again is not None and busy > _disturbed(again)
        if cached:                          # busier than the provisional one after all: keep that
            value, busy = again["value"], _disturbed(again)
        disturbance = {} if busy is None else {"contention": round(busy, 3),
                                               "tries": (again.get("tries", 1) + 1) if again is not None else 1}
        fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"key": key, "value": value} | disturbance, f, indent=1)
            os.replace(tmp, path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)    # a full disk only costs a re-measure next time
    return value, cached


def _disturbed(entry: dict) -> float:
    """The contention stored with a timing (an entry of an older cache: the machine's share
    others used, which is at most the contention it caused)."""
    return entry.get("contention", entry.get("others_busy", 0.0))


def _provisional(entry: dict) -> bool:
    return _disturbed(entry) > QUIET_LIMIT and entry.get("tries", 1) < QUIET_TRIES


def _quiet_now() -> bool:
    start = cpu_snapshot()
    time.sleep(QUIET_PROBE_S)
    return contention(start) <= QUIET_LIMIT


def _quietly(compute: Callable[[], dict]) -> tuple[dict, float]:
    """(value, others' share of the machine during it) of the less disturbed of up to
    QUIET_ATTEMPTS runs of `compute`, stopping at the first under QUIET_LIMIT; the pause before
    a retry is as long as the run before it."""
    best: tuple[dict, float] | None = None
    for attempt in range(QUIET_ATTEMPTS):
        start = cpu_snapshot()
        value = compute()
        busy = contention(start)
        if best is None or busy < best[1]:
            best = (value, busy)
        if busy <= QUIET_LIMIT:
            break
        if attempt + 1 < QUIET_ATTEMPTS:
            time.sleep(min(30.0, time.monotonic() - start[0]))
    return best


def cpu_snapshot() -> tuple[float, float | None, float, float | None]:
    """(monotonic seconds, CPU seconds the whole machine has been busy including steal, CPU
    seconds this process has used, CPU seconds the hypervisor stole); the machine's parts are
    None where ``/proc/stat`` is missing."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
        hz = os.sysconf("SC_CLK_TCK")
        machine_busy, steal = (sum(ticks) - ticks[3] - ticks[4]) / hz, ticks[7] / hz
    except (OSError, ValueError, IndexError):
        machine_busy = steal = None
    t = os.times()
    return time.monotonic(), machine_busy, t.user + t.system, steal


def others_busy(since: tuple) -> float:
    """The share of this machine's CPU capacity (0..1) that other processes and the hypervisor
    used since `since` (:func:`cpu_snapshot`); 0 where it cannot be read: the contention of a
    timing on every core."""
    cores = os.cpu_count() or 1
    return contention_between(since, cpu_snapshot(), cores, cores)


def contention(since: tuple, threads: int | None = None) -> float:
    """The share (0..1) of a timing's own cores that others took since `since`
    (:func:`cpu_snapshot`), for a timing on `threads` threads (default: torch's): the
    hypervisor's steal, which takes every core alike, as its share of the machine; other
    processes only beyond the cores the timing leaves free (``cores - threads``), since the
    kernel runs them there first. On as many threads as cores, this is :func:`others_busy`."""
    return contention_between(since, cpu_snapshot(), threads or torch.get_num_threads(), os.cpu_count() or 1)


def contention_between(since: tuple, now: tuple, threads: int, cores: int) -> float:
    """:func:`contention` from two snapshots, for `threads` threads on `cores` cores."""
    wall = now[0] - since[0]
    if since[1] is None or now[1] is None or wall <= 0:
        return 0.0
    threads = max(1, min(cores, threads))
    # /proc/stat counts in clock ticks (10 ms): over a wall shorter than a few ticks one tick reads
    # as many times the machine; a share is at most all of it.
    steal = max(0.0, (now[3] - since[3]) / wall)                            # cores' worth
    others = max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / wall - steal
    return min(1.0, steal / cores + max(0.0, others - (cores - threads)) / threads)


def _read_entry(path: Path, key: dict) -> dict | None:
    """The stored entry ({"key", "value"[, "contention"]}) for `key`, or None."""
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key and "value" in stored:
            return stored
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return None
