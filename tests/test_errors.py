"""Bad input gives a clear error naming the problem, in the API and on the command line."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from decoding.config import SamplingParams
from decoding.engine import encode_prompt, generate
from decoding.errors import ContextLengthError, InvalidRequestError
from support.module_run import run_reporting_imports


@pytest.mark.parametrize("kwargs,needle", [
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"seed": "x"}, "seed"),
    ({"stop": ("",)}, "stop"),
])
def test_invalid_sampling_parameters(kwargs, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        SamplingParams(**kwargs)


def test_empty_prompt(target):
    with pytest.raises(InvalidRequestError, match="empty"):
        encode_prompt(target, "   ")
    with pytest.raises(InvalidRequestError, match="empty"):
        generate(target, [])


def test_prompt_longer_than_context(target):
    ids = [100] * (target.context_window + 5)
    with pytest.raises(ContextLengthError, match=f"{target.context_window}"):
        generate(target, ids)


def test_generation_is_clamped_to_the_context_window():
    from decoding.drafters import PromptLookupDrafter
    from decoding.target import TargetModel
    from tests.conftest import tiny_llama

    tiny = TargetModel(tiny_llama(), None)          # a 64-token context window
    ids = [1, 2, 3] * 20
    for drafter in (None, PromptLookupDrafter()):
        result = generate(tiny, ids, params=SamplingParams(max_new_tokens=50, ignore_eos=True), drafter=drafter,
                          budget=64)
        assert len(ids) + len(result.token_ids) <= tiny.context_window
        assert result.finish_reason == "length"


def test_token_ids_outside_vocabulary(target):
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        generate(target, [1, target.vocab_size + 7])


def test_unknown_method():
    from decoding.methods import make_drafter

    with pytest.raises(InvalidRequestError, match="unknown method 'magic'"):
        make_drafter("magic")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decoding.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["generate", "--method", "magic", "hi"], "unknown method 'magic'"),
    (["generate", "--temperature", "-2", "hi"], "temperature"),
    (["generate", "--max-new-tokens", "0", "hi"], "max_new_tokens"),
    (["generate", "   "], "empty"),
    (["generate", "--datastore", "/nonexistent/store", "--method", "rest", "hi"], "/nonexistent/store"),
    (["generate", "--dense-store", "/nonexistent/dense", "--method", "dense", "hi"], "/nonexistent/dense"),
    (["generate", "--soft", "--soft-window", "0", "hi"], "window"),
    (["generate", "--frequency-penalty", "3", "hi"], "frequency_penalty"),
    (["generate", "--logit-bias", "12=500", "hi"], "logit_bias"),
    (["generate", "--logit-bias", "twelve", "hi"], "TOKEN_ID=BIAS"),
])
def test_cli_errors_are_one_clear_line(args, needle):
    proc = run_reporting_imports("decoding.cli", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert needle in lines[-2] and "Traceback" not in proc.stderr, proc.stderr    # (argparse's usage above)
    assert not os.path.exists("/nonexistent"), "a missing datastore path must not be created"
    # Answered before the model loads, and before torch is even imported (seconds on a CPU).
    assert lines[-1] == "imported: []", "bad input must fail before torch and transformers are imported"


@pytest.mark.slow
def test_cli_generate_and_stop_string():
    proc = run_cli("generate", "--method", "pld", "--max-new-tokens", "12", "--json",
                   "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    import json

    out = json.loads(proc.stdout)
    assert out["stats"]["new_tokens"] >= 1 and out["text"]
    assert out["stats"]["steps"] >= 1 and out["stats"]["mat"] >= 1.0
    # A predicted output (here the answer itself): the same text, in fewer steps.
    proc = run_cli("generate", "--method", "ar", "--max-new-tokens", "12", "--json", "--prediction", out["text"],
                   "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    predicted = json.loads(proc.stdout)
    assert predicted["text"] == out["text"] and predicted["stats"]["method"] == "ar+prediction"
    assert predicted["stats"]["steps"] < out["stats"]["new_tokens"]


def test_a_device_the_machine_lacks_is_one_line_before_anything_loads(capsys):
    import torch

    from decoding.cli import main
    from decoding.errors import ModelLoadError
    from decoding.model_loader import check_device

    with pytest.raises(ModelLoadError, match="not a device torch knows"):
        check_device("gpu")
    assert check_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ModelLoadError, match="finds no CUDA device here"):
            check_device(device)
    assert main(["generate", "--device", "cuda", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sense: error: device 'cuda'"), err


def test_cli_builds_of_nothing_are_one_line_and_write_nothing(tmp_path, capsys):
    """A --field no record has, a corpus with fewer positions than the key dimension, a dimension
    above the model's hidden size: each build ends in one line (exit 2), no store written."""
    import json

    from decoding.cli import main

    corpus, short = tmp_path / "c.jsonl", tmp_path / "short.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": f"text {i} " * 20}) for i in range(3)) + "\n")
    short.write_text(json.dumps({"text": "hi there"}) + "\n")
    cases = [(["build-sparse", "--field", "text", str(corpus)], "no record has a non-empty 'text' field (3 read)"),
             (["build-dense", "--field", "text", str(corpus)], "no record has a non-empty 'text' field (3 read)"),
             (["build-dense", "--field", "text", str(short)], "fewer than the key dimension 64"),
             (["build-dense", "--field", "body", "--dim", "100000", str(corpus)], "does not fit the model's hidden size")]
    for args, needle in cases:
        out = tmp_path / "out"
        assert main([args[0], "--out", str(out), *args[1:]]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("sense: error:") and needle in err[-1], (args, err)
        assert "Traceback" not in "\n".join(err) and not out.exists(), args


@pytest.mark.slow
def test_cli_builds_datastores_a_generation_drafts_from(tmp_path):
    """`sense build-sparse` and `sense build-dense` over a JSONL file (a record without the field
    and an empty one skipped, counted and named), then `sense generate` drafting from each store."""
    import json

    rows = [{"text": f"Question {i}: what is {i} plus {i}? Answer: {i} plus {i} is {2 * i}."} for i in range(6)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in [*rows, {"other": "no text"}, {"text": "   "}]) + "\n")
    sparse, dense = tmp_path / "sparse", tmp_path / "dense"
    proc = run_cli("build-sparse", "--out", str(sparse), str(corpus))
    assert proc.returncode == 0, proc.stderr
    assert "6 documents" in proc.stdout and "2 records skipped (no non-empty 'text' field)" in proc.stdout
    proc = run_cli("build-dense", "--dim", "16", "--out", str(dense), str(corpus))
    assert proc.returncode == 0, proc.stderr
    assert "6 documents" in proc.stdout and "2 records skipped (no non-empty 'text' field)" in proc.stdout
    for method, store in (("rest", "--sparse-store"), ("sense", "--dense-store")):
        proc = run_cli("generate", "--method", method, store, str(sparse if method == "rest" else dense),
                       "--max-new-tokens", "16", "--json", "Question 3: what is 3 plus 3?")
        assert proc.returncode == 0, proc.stderr
        stats = json.loads(proc.stdout)["stats"]
        assert stats["method"] == method and stats["new_tokens"] >= 1 and stats["steps"] >= 1
