"""The README's main job (`make demo` -> python -m pipelines.quickstart), on a small slice: the
Ray Data pipeline, the index build, Ray Serve and two HTTP requests, end to end."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_quickstart_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "pipelines.quickstart", "--docs", "12", "--max-tokens", "32", "--repeats", "1",
           "--workdir", str(tmp_path), "--port", str(_free_port())]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    out, err = res.stdout, res.stderr
    for step in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert f"[quickstart {step}]" in err                      # progress throughout
    assert "=== plain decoding (ar) ===" in out and "=== SENSE ===" in out
    assert "identical answers: True" in out                      # strict SENSE is lossless over HTTP too
    mat = float(re.search(r"MAT (\d+\.\d+)", out).group(1))
    assert mat >= 1.0
    assert re.search(r"speedup over plain decoding: \d+\.\d+x", out)
    assert (tmp_path / "datastore-12" / "manifest.json").is_file()
    # A second run reuses the datastore and the index.
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "reusing the index" in res.stderr and "resuming" in res.stderr
