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
