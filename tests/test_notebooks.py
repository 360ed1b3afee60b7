"""Every notebook under notebooks/ is committed with its outputs and runs from top to bottom.

Notebooks are found automatically (``notebooks/**/*.ipynb``, checkpoints excluded). Each one
runs on a fresh ``python3`` kernel with nbclient, from the notebook's own folder, and any
cell error fails the test. The committed file is never overwritten.

A notebook may set its own per-cell timeout (seconds) in its metadata, for cells that start
clusters or build datastores::

    "metadata": {"sense": {"timeout": 900}}

The default is ``DEFAULT_CELL_TIMEOUT``. Running them is slow (a real model on the CPU), so
that test is marked ``slow``; the check on committed outputs is fast. The kernel gets
``SENSE_NOTEBOOK_SMOKE=1``: a notebook may read it to run the same cells on a smaller sample
(the committed outputs come from a full run).
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
DEFAULT_CELL_TIMEOUT = 600
KERNEL = "python3"
SMOKE_ENV = "SENSE_NOTEBOOK_SMOKE"


def notebook_paths() -> list[Path]:
    return sorted(p for p in NOTEBOOKS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def cell_timeout(nb) -> int:
    """Per-cell timeout: the notebook's ``metadata.sense.timeout``, else the default."""
    value = nb.metadata.get("sense", {}).get("timeout", DEFAULT_CELL_TIMEOUT)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"metadata.sense.timeout must be a positive integer (seconds per cell), got {value!r}")
    return value


def _ids(paths):
    return [str(p.relative_to(NOTEBOOKS)) for p in paths]


PATHS = notebook_paths()


def test_notebooks_are_found():
    assert PATHS, f"no notebooks under {NOTEBOOKS}"
    assert NOTEBOOKS / "analysis.ipynb" in PATHS


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_committed_with_outputs(path):
    """Valid nbformat, every code cell executed in order, outputs kept, no error outputs."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cell_timeout(nb)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert code, f"{path.name} has no code cells"
    counts = [c.get("execution_count") for c in code]
    assert all(isinstance(n, int) for n in counts), f"{path.name}: code cells not executed: {counts}"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), \
        f"{path.name}: cells executed out of order: {counts}"
    assert any(c.outputs for c in code), f"{path.name} was committed without outputs"
    errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, f"{path.name} was committed with an error output: {errors[0].get('ename')}"
    if any("plt." in c.source or "matplotlib" in c.source for c in code):
        images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
        assert images, f"{path.name} plots but has no embedded images"


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_executes_without_errors(path, monkeypatch):
    """Run a copy top to bottom on a fresh kernel; a cell error or timeout fails the test."""
    from nbclient import NotebookClient

    monkeypatch.setenv(SMOKE_ENV, "1")          # inherited by the kernel

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=cell_timeout(nb), kernel_name=KERNEL, allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()            # raises CellExecutionError (or a timeout error) on failure
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert all(isinstance(c.get("execution_count"), int) for c in code)
