"""Running a module as its own process, as a user runs it, to see what it imported."""

from __future__ import annotations

import subprocess
import sys


def run_reporting_imports(module: str, *args: str, heavy=("torch", "transformers", "ray")) -> subprocess.CompletedProcess:
    """`python -m module args`, whose stderr ends with a line naming which of `heavy` it imported
    (a ``SystemExit("message")`` prints its message before it, as the interpreter would)."""
    code = ("import runpy, sys\n"
            f"sys.argv = [{module!r}] + sys.argv[1:]\n"
            "try:\n"
            f"    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
            "except SystemExit as exc:\n"
            "    if exc.code is None or isinstance(exc.code, int):\n"
            "        raise\n"
            "    print(exc.code, file=sys.stderr)\n"
            "    raise SystemExit(1) from None\n"
            "finally:\n"
            f"    print('imported:', [m for m in {list(heavy)!r} if m in sys.modules], file=sys.stderr)\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
