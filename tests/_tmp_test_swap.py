"""Ad hoc: the strict tests of tests/test_sampling.py with a biased verifier swapped in (must FAIL)."""
import os, sys
sys.path.insert(0, "/work/main")
import pytest
import tests.test_sampling as T
from tests.test_sampling import *  # noqa: F401,F403  (fixtures and tests)
from decoding.sampling import make_generator

KIND = os.environ.get("BIASED", "per-path")

@pytest.fixture(autouse=True)
def swap(monkeypatch):
    monkeypatch.setattr(T, "StrictSamplingVerifier",
                        lambda p: T.BIASED_VERIFIERS[KIND](p, make_generator(p.seed)))
