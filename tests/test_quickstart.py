"""The README's main job (`make demo` -> python -m pipelines.quickstart, then python -m
serving.quickstart), on a small slice: the
Ray Data pipeline, the index build, Ray Serve and two HTTP requests, end to end, run once as a
user runs it. That a rerun reuses the datastore and the index is checked on the same work
directory by steps 1 and 2 alone, in process (what a second whole run would add is the same
serving path again)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.net import free_port

REPO = Path(__file__).resolve().parents[1]
DOCS = 12
DISTILL = 24            # the default path: the model's own answers (self-distillation), short ones
STORE = f"datastore-{DOCS}-id{DISTILL}"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quickstart")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    build = [sys.executable, "-m", "pipelines.quickstart", "--docs", str(DOCS), "--distill-tokens", str(DISTILL),
             "--workdir", str(workdir)]
    serve = [sys.executable, "-m", "serving.quickstart", "--max-tokens", "32", "--repeats", "1",
             "--workdir", str(workdir), "--port", str(free_port())]
    out = err = ""
    for cmd in (build, serve):
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
        out, err = out + res.stdout, err + res.stderr
    return workdir, out, err


def test_quickstart_end_to_end(quickstart_run):
    workdir, out, err = quickstart_run
    for step in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert f"[quickstart {step}]" in err                      # progress throughout
    assert "=== plain decoding (ar) ===" in out and "=== SENSE ===" in out
    assert "identical answers: True" in out                      # strict SENSE is lossless over HTTP too
    assert "Traceback" not in out + err and " failed. " not in out + err, (out + err)[-2000:]   # a clean end
    sense = re.search(r"sense: (\d+) tokens in [\d.]+s .*MAT (\d+\.\d+), acceptance \d+%, (\d+) steps", out)
    assert sense, out
    tokens, mat, steps = int(sense.group(1)), float(sense.group(2)), int(sense.group(3))
    # Drafts were accepted (a GSM8K question against a GSM8K store): fewer verify steps than
    # tokens, and the MAT the server reports agrees with the tokens and steps it reports apart
    # (the first token comes from the prefill, each step commits its accepted drafts + one).
    assert steps < tokens - 1 and mat > 1.0
    assert mat == pytest.approx((tokens - 1) / steps, abs=0.01)
    assert re.search(r"speedup over plain decoding: \d+\.\d+x", out)
    assert (workdir / STORE / "manifest.json").is_file()
    assert "the model's own answers to 12 GSM8K train questions" in err


def test_a_rerun_reuses_the_datastore_and_the_index(quickstart_run, ray_cluster, capfd):
    """Steps 1 and 2 again on the same work directory: the build resumes with every unit done
    (nothing recomputed) and the index is reused, same version, untouched."""
    from pipelines.quickstart import build_datastore_step, build_index_step

    workdir, _, _ = quickstart_run
    shards = {p: p.stat().st_mtime_ns for p in (workdir / STORE / "shards").iterdir()}
    index_files = {p: p.stat().st_mtime_ns for p in (workdir / f"index-{STORE}").rglob("*") if p.is_file()}
    capfd.readouterr()
    datastore = build_datastore_step(workdir, DOCS, DISTILL)
    index = build_index_step(datastore, workdir)
    err = capfd.readouterr().err
    assert "resuming" in err and "reusing the index" in err, err[-2000:]
    assert index == workdir / f"index-{STORE}"
    assert {p: p.stat().st_mtime_ns for p in (workdir / STORE / "shards").iterdir()} == shards
    assert {p: p.stat().st_mtime_ns for p in index.rglob("*") if p.is_file()} == index_files
