"""bench.prediction end to end on one problem (a smoke run: it runs, its answers with and without
the prediction are identical, its rows and table are written)."""

import json

import bench.prediction as prediction
from bench import common


def test_the_prediction_benchmark_runs_and_writes_its_rows(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert prediction.main(["--problems", "1", "--repeats", "1", "--max-new-tokens", "24"]) == 0
    rows = json.loads((tmp_path / "prediction.json").read_text())["rows"]
    assert {(r["dataset"], r["method"], r["vs"]) for r in rows} == {
        (f"humaneval_{t}", m, vs) for t in ("rename", "comment")
        for m, vs in (("ar+prediction", "ar"), ("pld+prediction", "pld"), ("pld+prediction", "ar"), ("pld", "ar"))}
    assert all(r["identical"] == "1/1" and r["tokens_per_s"] > 0 and r["mat"] >= 1.0 for r in rows)
    assert all(0.0 <= r["prediction_tokens_in_answers"] <= 1.0 for r in rows)
    assert "| rename | ar+prediction | ar |" in (tmp_path / "prediction.md").read_text()
