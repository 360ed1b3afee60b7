"""The kernels' other builds: the AVX2 code and the portable code.

The C kernels are built with ``-march=native``, so a machine runs only its own CPU's code path:
CI's CPU (AVX-512 with BF16) never runs the AVX2 code that an AVX2-only machine runs, nor the
portable code that a CPU without AVX2 runs. ``SENSE_KERNEL_MARCH`` builds them here, and the
invariance tests run on each (in a process of their own: a process loads one build). In float32
all three builds also give the same bits: the AVX-512 kernels keep the AVX2 code's 8-lane chains,
and the portable code does each vector step lane by lane with the same correctly rounded
operations (its exp is the AVX2 code's routine, not libm's); a float32 datastore's keys and a
float32 answer do not depend on which of these machines computed them. Where a cross compiler and
qemu are installed, the portable code built for an ARM server writes the same float32 bytes too.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decoding import invariant
from decoding.measured import cpu_isa

ROOT = Path(__file__).resolve().parents[1]
BUILDS = {"x86-64-v3": "avx2-fma", "x86-64": "portable"}       # -march -> the code path it runs
# The invariance tests each build runs: kernels, then the whole target in both dtypes (the
# portable code is slow: fmaf is a libm call without FMA, so it runs the fewest).
SUBSET = {"x86-64-v3": "rows_are_independent or visible_keys or targets_run or other_rows or verified_chain or epilogue",
          "x86-64": "rows_are_independent or visible_keys or targets_run or verified_chain"}

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 builds")


def _env(march: str) -> dict:
    # Prefetching changes no bits (tests/test_invariance.py): forced off rather than measured on
    # code built for another CPU (41 s of the portable build's run from an empty cache).
    return {**os.environ, invariant.MARCH_ENV: march, invariant.PREFETCH_ENV: "off", "PYTHONPATH": str(ROOT)}


def _needs(march: str) -> None:
    if march == "x86-64-v3" and not {"avx2", "fma"} <= set(cpu_isa()):
        pytest.skip("this CPU has no AVX2+FMA to run the AVX2 build")
    if invariant.kernel_isa() == BUILDS[march]:
        # An AVX2-only CPU's native build is this code path: the whole suite runs it already.
        pytest.skip(f"this CPU's own build runs the {BUILDS[march]} code")


# In the build's process, after its invariance tests: one prompt in pieces of at most MAX_ROWS
# rows (the invariant prefill), then a tree, in float32.
_FORWARD = """
import sys, torch
from decoding import invariant
from decoding.target import TargetModel
from decoding.tree import TokenTree

def forward(t):
    ids = [(17 * i + 5) % t.vocab_size for i in range(100)]
    state, pre = t.prefill(ids[:60], reuse=False)
    mid = t.verify(state, TokenTree.chain(ids[60], ids[61:100]))
    t.commit(state, list(range(40)))
    out = t.verify(state, TokenTree((7, 300, 301, 302, 400), (-1, 0, 1, 0, 3)))
    return {"logits": [pre.logits, mid.logits, out.logits], "hidden": [pre.hidden, mid.hidden, out.hidden]}

if __name__ == "__main__":
    import pytest
    if pytest.main(["-q", "-p", "no:cacheprovider", "-x", sys.argv[2], "-k", sys.argv[3]]):
        sys.exit("the invariance tests failed")
    torch.save({"isa": invariant.kernel_isa(), **forward(TargetModel.load(dtype="float32"))}, sys.argv[1])
"""


@pytest.mark.parametrize("march", BUILDS)
def test_each_build_passes_the_invariance_tests_and_gives_float32_the_native_bits(march, target, tmp_path):
    _needs(march)
    script, path = tmp_path / "build_check.py", tmp_path / "forward.pt"
    script.write_text(_FORWARD)
    done = subprocess.run([sys.executable, str(script), str(path), str(ROOT / "tests" / "test_invariance.py"),
                           SUBSET[march]], cwd=ROOT, env=_env(march), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
    theirs = torch.load(path)
    assert theirs["isa"] == BUILDS[march]
    namespace: dict = {}
    exec(compile(_FORWARD, "build_check", "exec"), namespace)
    ours = namespace["forward"](target)
    for what in ("logits", "hidden"):
        for i, (a, b) in enumerate(zip(ours[what], theirs[what])):
            assert torch.equal(a, b), f"{what} of forward {i} differ by {(a - b).abs().max():.3g}"


def test_the_build_is_the_one_asked_for(monkeypatch):
    monkeypatch.setenv(invariant.MARCH_ENV, "x86-64-v3")
    assert invariant.march() == "x86-64-v3"
    monkeypatch.setenv(invariant.MARCH_ENV, "")
    assert invariant.march() == "native"
    monkeypatch.setenv(invariant.MARCH_ENV, "native; rm -rf /")
    with pytest.raises(ValueError, match="SENSE_KERNEL_MARCH"):
        invariant.march()


ARM_CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"


def _harness(cc: list[str], march: str, out: Path) -> Path:
    """tests/kernels/float32_kernels.c (linears of 1-5 rows, attention, RMSNorm, SiLU gate on
    fixed inputs) built by `cc` for `march`."""
    done = subprocess.run([*cc, "-O3", f"-march={march}", "-ffp-contract=off", "-fopenmp",
                           "-I", str(invariant.SOURCE.parent), str(ROOT / "tests" / "kernels" / "float32_kernels.c"),
                           "-o", str(out), "-lm"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.skipif(not (shutil.which(ARM_CC) and shutil.which(QEMU)),
                    reason=f"needs {ARM_CC} and {QEMU} (Debian: gcc-aarch64-linux-gnu, qemu-user)")
def test_an_arm_build_gives_float32_the_x86_bits(tmp_path):
    """The portable code on an ARM server (Graviton's kind: aarch64, built for plain armv8-a and
    for armv8.2-a with bfloat16), run under qemu, writes the same bytes as this CPU's build."""
    x86 = _harness([shutil.which("gcc") or "cc"], "native", tmp_path / "x86")
    subprocess.run([str(x86), str(tmp_path / "x86.bin")], check=True, capture_output=True)
    for march in ("armv8-a", "armv8.2-a+bf16"):
        arm = _harness([ARM_CC], march, tmp_path / f"arm-{march}")
        done = subprocess.run([QEMU, "-cpu", "max", "-L", "/usr/aarch64-linux-gnu", str(arm), str(tmp_path / "arm.bin")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.strip() == "portable", done.stderr[-2000:]
        assert (tmp_path / "arm.bin").read_bytes() == (tmp_path / "x86.bin").read_bytes(), march
