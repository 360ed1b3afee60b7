"""How long the whole test suite takes (`make test`, what CI runs), and its slowest tests.

    python -m bench.tests                   # run the suite here (pytest -q --durations=0), record it
    python -m bench.tests --log run1.log --log run2.log    # record runs made by hand, e.g. from
                                            # fresh clones: `make setup && python -m pytest -q --durations=0`

Writes bench/results/tests.{json,md}: one row per run (wall seconds of pytest, tests, outcome,
the slowest tests with setup + call + teardown added up per test). The budget is 30 minutes on
the 2-core CPU machine CI uses.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from bench.common import machine_info, write_results

BUDGET_S = 30 * 60
REPO = Path(__file__).resolve().parents[1]
_DURATION = re.compile(r"^\s*([\d.]+)s (setup|call|teardown)\s+(\S+)")
_SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped)\b.*?) in ([\d.]+)s", re.M)


def parse_log(text: str) -> dict:
    """pytest's output with --durations: the per-test times and the closing summary line."""
    per_test: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        m = _DURATION.match(line)
        if m:
            per_test[m.group(3)] += float(m.group(1))
    summaries = _SUMMARY.findall(text)
    if not summaries:
        raise ValueError("no pytest summary line (\"N passed ... in S s\") in the log")
    outcome, seconds = summaries[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", outcome)}
    tests = sum(v for k, v in counts.items() if k in ("passed", "failed", "skipped"))
    slowest = sorted(per_test.items(), key=lambda kv: -kv[1])[:10]
    return {"method": "make_test", "seconds": round(float(seconds), 1), "tests": tests, "outcome": outcome,
            "within_budget": float(seconds) <= BUDGET_S, "slowest": [[n, round(s, 1)] for n, s in slowest]}


def run_suite(log: Path) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "--durations=0", "-p", "no:cacheprovider"]
    t0 = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False)
    print(f"suite ran {time.time() - t0:.0f} s; log {log}", file=sys.stderr)
    return log.read_text()


def render(rows: list[dict], machine: dict, note: str = "") -> str:
    lines = ["# Test suite time", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores. Budget: {BUDGET_S // 60} minutes of pytest time "
             "(`make test`, what CI runs).", "",
             *([note, ""] if note else []),
             "| run | pytest seconds | minutes | tests | outcome | within budget |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        label = f" ({r['label']})" if r.get("label") else ""
        lines.append(f"| {i}{label} | {r['seconds']:.0f} | {r['seconds'] / 60:.1f} | {r['tests']} | {r['outcome']} | "
                     f"{'yes' if r['within_budget'] else 'no'} |")
    lines += ["", f"Slowest tests of run {len(rows)} (setup + call + teardown):", "", "| test | seconds |",
              "|---|---|"]
    lines += [f"| `{n}` | {s:.0f} |" for n, s in rows[-1]["slowest"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tests", description=__doc__.split("\n\n")[0])
    p.add_argument("--log", action="append", type=Path, default=[],
                   help="record this pytest output (run with --durations=0) instead of running the suite")
    p.add_argument("--note", default="", help="how the runs were made (commit, what else ran), shown with them")
    p.add_argument("--append", action="store_true", help="keep the runs already in bench/results/tests.json")
    p.add_argument("--label", action="append", default=[], help="how each --log run was made, in order")
    a = p.parse_args(argv)
    try:
        texts = [f.read_text() for f in a.log] or [run_suite(REPO / "bench" / "out" / "tests.log")]
        rows = [parse_log(t) for t in texts]
        for r, label in zip(rows, a.label):
            r["label"] = label
        if a.append:
            import json

            rows = json.loads((REPO / "bench" / "results" / "tests.json").read_text())["rows"] + rows
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    machine = machine_info()
    write_results("tests", machine, rows, render(rows, machine, a.note), extra={"note": a.note} if a.note else None)
    for r in rows:
        print(f"{r['seconds']:.0f} s, {r['tests']} tests ({r['outcome']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
