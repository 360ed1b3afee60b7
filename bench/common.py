"""Shared benchmark plumbing: machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

# Where results go: bench/results/, or SENSE_BENCH_RESULTS (e.g. bench/results/avx2 for a run on
# another machine kind, beside the reference machine's).
RESULTS = Path(os.environ.get("SENSE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine_info() -> dict:
    import torch
    import transformers

    from decoding import invariant
    from decoding.measured import cpu_name, isa_summary

    cpu, isa, family_model = cpu_name(), isa_summary(), None
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first_cpu.splitlines())}
        family_model = f"family {info.get('cpu family')} model {info.get('model')}"
    except OSError:
        pass
    if isa:
        # "AMD EPYC" alone names several generations: the vector ISA tells them apart (AVX-512
        # machines run this model's float32 forward about 2-3x faster than AVX2-only ones here).
        cpu = f"{cpu} ({isa})"
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    info = {"cpu": cpu, "cpu_family_model": family_model, "cores": os.cpu_count(), "memory_gib": mem_gib,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "device": "cpu", "kernels": invariant.kernel_id()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def fast_target():
    """The embedded model in the dtype ``auto`` picks (measured, remembered per machine), with its
    dtype's name and the machine record a result carries (``machine_info`` plus the dtype and why)."""
    from decoding.cli import _quiet_libraries
    from decoding.target import TargetModel

    _quiet_libraries()
    target = TargetModel.load()
    dtype = str(target.dtype).removeprefix("torch.")
    return target, dtype, {**machine_info(), "dtype": dtype, "dtype_choice": target.dtype_choice.reason}


def write_results(name: str, machine: dict, rows: list[dict], markdown: str, extra: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine, "rows": rows, **(extra or {})}
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    (RESULTS / f"{name}.md").write_text(markdown)
    return path


def forget_prompts(target) -> None:
    """Empty `target`'s prefix cache (decoding/prefix_cache.py) before a timed run: a benchmark
    asks the same prompts of every method, and a later run would find each whole prompt kept,
    where a user's new question finds the chat template only."""
    cache = getattr(target, "prefix_cache", None)
    if cache is not None:
        cache.clear()


def method_order(methods, i: int) -> list:
    """The order to run `methods` in for the i-th item (question, or question + repeat): rotated
    by i // 2 and reversed on odd i. Over the items every method takes every position (no method
    always runs first, on a cold cache, or last, after the others' allocations), and in every
    pair of items (2k, 2k + 1) each pair of methods runs once in each order."""
    methods = list(methods)
    if not methods:
        return methods
    r = (i // 2) % len(methods)
    order = methods[r:] + methods[:r]
    return order[::-1] if i % 2 else order


DENSE_CHOICES_HELP = ("SENSE's dense datastore: 'id' (default: the GSM8K ID store, the model's own answers to "
                      "the first 400 GSM8K train questions, built once into bench/out), 'default' (the first "
                      "--dense-docs human-written GSM8K train answers), or a datastore directory")


class StallGuard:
    """Runs a timed measurement again when the machine took its CPU away meanwhile.

    A shared VM stalls now and then for seconds (the hypervisor's steal, a pause, another
    process): a 0.9 s generation read 9 s once, and a benchmark that times each question once
    pools that into a method's tokens/s as if the method were 10x slower there. A run counts as
    disturbed when other processes and the hypervisor used more than `others_limit` of the
    machine during it (``decoding.measured.others_busy``), or when this process got less than
    `share_drop` of the CPU share its undisturbed runs had (median of the clean runs so far, from
    the 5th on: a paused VM counts no one's ticks, but this process's CPU time stops too). Such
    a run is measured again, up to `attempts` times; the least disturbed is kept. A run's outputs
    do not change (greedy decoding), only its timing; ``reruns`` and ``kept_disturbed`` count."""

    def __init__(self, attempts: int = 3, others_limit: float = 0.25, share_drop: float = 0.5) -> None:
        self.attempts, self.others_limit, self.share_drop = attempts, others_limit, share_drop
        self.shares: list[float] = []       # this process's CPU share in the clean runs
        self.reruns = 0
        self.kept_disturbed = 0

    def disturbance(self, share: float, others: float) -> float:
        """How disturbed a run was: 0 when clean, else the larger of the two excesses."""
        typical = median(self.shares[-50:]) if len(self.shares) >= 5 else None
        lost = max(0.0, 1.0 - share / (self.share_drop * typical)) if typical else 0.0
        return max(lost, max(0.0, others - self.others_limit))

    def run(self, measure, checkpoint=None):
        """`measure()` (a fresh run each call), measured again while disturbed; its value.
        `checkpoint()`, if given, is called before the first attempt and returns a function that
        undoes what an attempt changed (a run teaches the shared budget estimates its times): it
        is called before each attempt after the first, so a disturbed run teaches nothing."""
        from decoding.measured import cpu_snapshot, others_busy

        best = None
        rewind = checkpoint() if checkpoint is not None else None
        for attempt in range(self.attempts):
            if attempt and rewind is not None:
                rewind()
            start = cpu_snapshot()
            value = measure()
            others = others_busy(start)
            end = cpu_snapshot()
            share = (end[2] - start[2]) / max(end[0] - start[0], 1e-9)
            d = self.disturbance(share, others)
            if best is None or d < best[0]:
                best = (d, value)
            if d == 0:
                self.shares.append(share)
                break
            if attempt + 1 < self.attempts:
                self.reruns += 1
        if best[0] > 0:
            self.kept_disturbed += 1
        return best[1]
