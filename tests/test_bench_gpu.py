"""bench/gpu/run.sh stays ready for a GPU machine: the script parses, its module imports and
takes its arguments (the GPU run itself happens only where a CUDA device is lent)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import bench.gpu.measure as measure

REPO = Path(__file__).resolve().parents[1]


def test_run_script_parses():
    res = subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu" / "run.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_measure_module_takes_its_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        measure.main(["--help"])
    assert exc.value.code == 0 and "--id-questions" in capsys.readouterr().out


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path, monkeypatch, capsys):
    """The whole check at toy sizes on this machine's CPU: every stage the GPU run will take
    (verify cost, self-distillation, the ID store, the three methods, FAISS search, the report)."""
    import json

    import bench.common

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path / "results")   # never touch committed results
    assert measure.main(["--device", "cpu", "--questions", "1", "--id-questions", "8", "--max-new-tokens", "12",
                         "--random-keys", "2000", "--workdir", str(tmp_path / "work")]) == 0
    rows = json.loads((tmp_path / "results" / "gpu.json").read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert {"verify_cost", "ar", "sense_strict", "sense_soft", "faiss_search"} <= methods
    assert next(r for r in rows if r["method"] == "sense_strict")["identical"] == "1/1"
