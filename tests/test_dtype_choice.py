"""dtype "auto": the faster dtype by measurement, remembered per machine; overrides; datastores
that do not depend on the dtype the model was loaded in."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from decoding.dtype_choice import check_dtype, choose_dtype, explicit, fastest
from decoding.errors import ModelLoadError
from decoding.fingerprint import model_fingerprint
from decoding.target import TargetModel
from tests.conftest import tiny_llama


def test_fastest_takes_the_faster_pair_of_measurements():
    timings = {"float32": {"decode": 30.0, "verify16": 60.0}, "bfloat16": {"decode": 20.0, "verify16": 25.0}}
    assert fastest(timings) == "bfloat16"
    timings["bfloat16"]["verify16"] = 80.0
    assert fastest(timings) == "float32"
    # The AVX2 CPU: bfloat16's decode step 29% faster, its long verification 4%: 17% faster
    # together (by the sum of milliseconds only 10.0%, a near-tie).
    timings = {"float32": {"decode": 17.96, "verify16": 56.74}, "bfloat16": {"decode": 12.83, "verify16": 54.42}}
    assert fastest(timings) == "bfloat16"


def test_a_near_tie_keeps_the_precise_dtype():
    """bfloat16 5% faster: float32 stays (a coin flip between machines otherwise); 15%: bfloat16."""
    timings = {"float32": {"decode": 40.0, "verify16": 60.0}, "bfloat16": {"decode": 38.0, "verify16": 57.0}}
    assert fastest(timings) == "float32"
    timings["bfloat16"] = {"decode": 34.0, "verify16": 51.0}
    assert fastest(timings) == "bfloat16"
    assert fastest(timings, margin=0.2) == "float32"


def test_check_dtype():
    assert check_dtype("bf16") == "bfloat16" and check_dtype("AUTO") == "auto"
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        check_dtype("int8")


def test_choice_is_measured_once_and_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("SENSE_CACHE_DIR", str(tmp_path))
    measured = []

    def make(model):
        measured.append(next(model.parameters()).dtype)
        return TargetModel(model, None)

    model, choice = choose_dtype(tiny_llama(vocab=32), "cpu", make)
    assert measured == [torch.float32, torch.bfloat16] and not choice.cached
    assert set(choice.timings_ms) == {"float32", "bfloat16"}
    assert choice.dtype == fastest(choice.timings_ms)
    assert next(model.parameters()).dtype == getattr(torch, choice.dtype)
    assert choice.dtype in choice.reason and "measured now" in choice.reason
    # A second load on this machine reads the result instead of measuring.
    model2, again = choose_dtype(tiny_llama(vocab=32), "cpu", make)
    assert len(measured) == 2 and again.cached and again.dtype == choice.dtype
    assert next(model2.parameters()).dtype == getattr(torch, choice.dtype)
    # Another model (another config) is measured afresh.
    choose_dtype(tiny_llama(vocab=48), "cpu", make)
    assert len(measured) == 4
    stored = [json.loads(p.read_text()) for p in (tmp_path / "measured").glob("dtype-*.json")]
    assert len(stored) == 2 and all("isa" in s["key"]["machine"] for s in stored)


def test_a_remembered_choice_is_applied(tmp_path, monkeypatch):
    """What is remembered decides: a file saying bfloat16 is faster loads the model in bfloat16."""
    monkeypatch.setenv("SENSE_CACHE_DIR", str(tmp_path))
    _, choice = choose_dtype(tiny_llama(vocab=32), "cpu", lambda m: TargetModel(m, None))
    (path,) = (tmp_path / "measured").glob("dtype-*.json")
    stored = json.loads(path.read_text())
    loser = "float32" if choice.dtype == "bfloat16" else "bfloat16"
    stored["value"][loser] = {"decode": 0.001, "verify16": 0.001}
    path.write_text(json.dumps(stored))
    model, again = choose_dtype(tiny_llama(vocab=32), "cpu", lambda m: TargetModel(m, None))
    assert again.cached and again.dtype == loser and next(model.parameters()).dtype == getattr(torch, loser)


def test_an_explicit_dtype_wins(target):
    bf16 = TargetModel.load(dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.dtype_choice.requested == "bfloat16"
    assert target.dtype_choice.requested == "float32" and target.dtype == torch.float32


def test_fingerprint_does_not_depend_on_the_load_dtype(target, dense_store_dir):
    """A datastore built in float32 loads with the model in bfloat16 (the same weights)."""
    from index.dense_format import read_manifest
    from index.dense_store import DenseStore

    bf16 = TargetModel(copy.deepcopy(target.model).to(torch.bfloat16), target.tokenizer)
    assert model_fingerprint(bf16) == model_fingerprint(target)
    DenseStore.load(dense_store_dir, expect=model_fingerprint(bf16))
    assert read_manifest(dense_store_dir).key_dtype == "float32"      # what the keys were computed in
    other = TargetModel(tiny_llama(vocab=32), target.tokenizer)
    assert model_fingerprint(other).weights_hash != model_fingerprint(target).weights_hash


def test_processes_measuring_at_once_all_keep_the_first_measurement(tmp_path):
    """Four processes ask for the same remembered value at the same moment (a build's workers
    starting together); the measurement gives each a different answer. All of them must use
    the one value stored: one process measures, the others wait and read it."""
    import os
    import subprocess
    import sys

    code = ("import os, time, json; from decoding.measured import remembered; "
            "v, cached = remembered('race', {'k': 1}, lambda: (time.sleep(0.5), {'pid': os.getpid()})[1]); "
            "print(json.dumps([v['pid'], cached]))")
    env = {**os.environ, "SENSE_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert len({pid for pid, _ in outs}) == 1, outs
    assert sorted(cached for _, cached in outs) == [False, True, True, True]


def test_float16_asked_for_on_cpu_says_it_is_the_slow_dtype_there():
    assert "slower than float32 and bfloat16" in explicit("float16", "cpu").reason
    assert explicit("float16", "cuda").reason == "float16 (asked for)"
    assert explicit("bfloat16", "cpu").reason == "bfloat16 (asked for)"
