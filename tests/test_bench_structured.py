"""bench.structured end to end on two questions (a smoke run: it runs, its constrained answers are
identical across methods, its rows and table are written), and its JSON check."""

import json

import bench.structured as structured
from bench import common


def test_the_json_check_takes_the_schemas_objects_only():
    assert structured.valid('{"reasoning": "5 + 7", "answer": 12}')
    assert structured.valid('{"reasoning": "", "answer": 1.5}')
    assert not structured.valid('{"reasoning": "x", "answer": true}')
    assert not structured.valid('{"reasoning": "x", "answer": 1, "more": 2}')
    assert not structured.valid('{"reasoning": "x", "answer": ')
    assert not structured.valid('[1, 2]')
    assert structured.valid_call('{"name": "submit_answer", "arguments": {"answer": 3, "unit": "kg"}}')
    assert not structured.valid_call('{"name": "submit_answer", "arguments": {"answer": 3}}')
    assert not structured.valid_call('[]')


def test_the_structured_benchmark_runs_and_writes_its_rows(monkeypatch, tmp_path, dense_store_dir):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    # the tests' small dense store (built once for the session), not the benchmark's ID store
    assert structured.main(["--questions", "2", "--repeats", "1", "--max-new-tokens", "24",
                            "--dense", str(dense_store_dir)]) == 0
    out = json.loads((tmp_path / "structured.json").read_text())
    rows = {(r["method"], r["dataset"], r["vs"]): r for r in out["rows"]}
    assert set(rows) == {("pld", "gsm8k_call", "ar"), ("sense", "gsm8k_call", "ar"),
                         ("pld", "gsm8k_json", "ar"), ("sense", "gsm8k_json", "ar"), ("pld", "gsm8k_text", "ar"),
                         ("sense", "gsm8k_text", "ar"), ("ar", "gsm8k_json", "ar_text"),
                         ("pld", "gsm8k_json", "pld_text"), ("sense", "gsm8k_json", "sense_text")}
    assert all(r["identical"] == "2/2" for k, r in rows.items() if k[2] == "ar")
    assert all(r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 for r in rows.values())
    assert out["json_answers_valid"] <= out["json_answers_ended"] <= 2 and out["calls_valid"] <= 2
    assert "| sense | json | ar |" in (tmp_path / "structured.md").read_text()
