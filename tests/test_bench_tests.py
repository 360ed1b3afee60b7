"""bench.tests reads pytest's own output: per-test times added up over setup, call and teardown,
the closing line's counts and seconds, and a log without a closing line is refused."""

from __future__ import annotations

import pytest

from bench.tests import BUDGET_S, parse_log

LOG = """\
........F.                                                        [100%]
============================= slowest durations ==============================
120.50s setup    tests/test_a.py::test_one
30.25s call     tests/test_a.py::test_one
0.50s teardown tests/test_a.py::test_one
90.00s call     tests/test_b.py::test_two[x]
2.00s call     tests/test_b.py::test_three
=========================== short test summary info ============================
FAILED tests/test_b.py::test_four - assert 1 == 2
============= 1 failed, 8 passed, 1 skipped, 3 deselected in 1234.56s (0:20:34) =============
"""


def test_parse_log_adds_phases_and_reads_the_summary():
    row = parse_log(LOG)
    assert row["seconds"] == 1234.6 and row["tests"] == 10
    assert row["slowest"][0] == ["tests/test_a.py::test_one", 151.2]
    assert [n for n, _ in row["slowest"]] == ["tests/test_a.py::test_one", "tests/test_b.py::test_two[x]",
                                              "tests/test_b.py::test_three"]
    assert row["within_budget"] == (1234.56 <= BUDGET_S) and "1 failed" in row["outcome"]


def test_the_quiet_summary_line_is_read_too():
    """pytest -q closes with the bare line, no '=' around it."""
    row = parse_log(LOG.rsplit("\n", 2)[0] + "\n436 passed, 62 warnings in 3981.77s (1:06:21)\n")
    assert row["seconds"] == 3981.8 and row["tests"] == 436 and row["outcome"].startswith("436 passed")


def test_a_log_without_a_summary_is_refused():
    with pytest.raises(ValueError, match="summary"):
        parse_log(LOG.rsplit("\n", 2)[0])
