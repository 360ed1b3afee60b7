"""bench.sense saves its progress after every question and the same command resumes there.

A real (tiny) run on the embedded model, results written to a temporary folder: run it, make the
saved progress forget the last question as a stop during it would, run the same command again.
The resumed run must keep the cost curve it started with and the figures of the question it had
finished, bit for bit, and measure the forgotten one again. The adaptive budget weighs measured
drafting time, so the re-measured question's steps may differ from the first run's; its strict
outputs may not (each equals ar's whatever the budget), nor anything derived from them.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

# what a strict row's outputs decide, whatever budgets were chosen
OUTPUT_FIGURES = ("new_tokens", "token_agreement_with_ar", "rouge_l_with_ar", "identical", "accuracy")


def _figures(payload: dict) -> dict:
    return {(r["method"], r["dataset"], r["datastore"]): {k: r.get(k) for k in OUTPUT_FIGURES}
            for r in payload["rows"] if "mat" in r and r["method"] != "sense_soft"}


def test_resumed_run_reproduces_the_uninterrupted_one(tmp_path, monkeypatch, capsys):
    import bench.common
    import bench.sense

    results = tmp_path / "results"
    monkeypatch.setattr(bench.common, "RESULTS", results)      # never touch the committed results
    work = tmp_path / "work"
    argv = ["--gsm8k", "2", "--spec-per-category", "0", "--dense-docs", "6", "--max-new-tokens", "12",
            "--wide-budget", "0", "--humaneval", "0", "--workdir", str(work)]
    assert bench.sense.main(argv) == 0
    first = json.loads((results / "sense.json").read_text())
    # every strict row counts its outputs identical to ar's, all of them (the run exited 0)
    strict = [r for r in first["rows"] if "mat" in r and r["method"] != "sense_soft"]
    assert strict and all(r["identical"] == "2/2" for r in strict), strict
    assert all("identical" not in r for r in first["rows"] if r["method"] == "sense_soft")
    progress = next(work.glob("progress_*.json"))
    saved = json.loads(progress.read_text())
    assert saved["datasets"]["gsm8k"]["questions"] == 2
    assert saved["cost_curve"] and saved["elapsed_s"] > 0

    # Forget the second question, as if the run had been stopped while doing it.
    kept = json.loads(json.dumps(saved["datasets"]["gsm8k"]["agg"]))
    gsm = saved["datasets"]["gsm8k"]
    gsm["questions"] = 1
    for part in ("agg", "wide"):
        for methods in gsm[part].values():
            for figures in methods.values():
                for name in figures:
                    figures[name] = figures[name][:1]
    # A different curve now would change the budgets chosen: the resumed run must not measure one.
    progress.write_text(json.dumps(saved))

    # --partial writes the results of what the progress holds, marked partial, measuring nothing.
    assert bench.sense.main([*argv, "--partial"]) == 0
    part = json.loads((results / "sense.json").read_text())
    assert part["partial"] == {"gsm8k": [1, 2]}
    assert {r["questions"] for r in part["rows"]} == {1}
    assert part["cost_curve"] == first["cost_curve"]
    assert "Partial results: the run was stopped after 1/2 gsm8k questions" in (results / "sense.md").read_text()
    assert json.loads(progress.read_text()) == saved
    capsys.readouterr()

    assert bench.sense.main(argv) == 0
    err = capsys.readouterr().err
    assert "resuming after 1/2 questions" in err
    assert "cost curve (of the run being resumed)" in err
    second = json.loads((results / "sense.json").read_text())
    assert second["cost_curve"] == first["cost_curve"]
    assert _figures(second) == _figures(first)
    assert {r["questions"] for r in second["rows"]} == {2}
    resumed = json.loads(progress.read_text())["datasets"]["gsm8k"]["agg"]
    for store, methods in kept.items():           # the finished question's figures, kept as measured
        for method, figures in methods.items():
            for name, values in figures.items():
                assert resumed[store][method][name][0] == values[0], (store, method, name)
                assert len(resumed[store][method][name]) == len(values)
    # the run time adds the sessions up
    assert json.loads(progress.read_text())["elapsed_s"] > saved["elapsed_s"]

    # Once the run is whole, --partial gives the same rows as the run itself and no partial mark.
    assert bench.sense.main([*argv, "--partial"]) == 0
    again = json.loads((results / "sense.json").read_text())
    assert "partial" not in again and again["rows"] == second["rows"]
    assert "Partial results" not in (results / "sense.md").read_text()


ARGV = ["--gsm8k", "2", "--spec-per-category", "0", "--dense-docs", "6", "--max-new-tokens", "12",
        "--wide-budget", "0", "--humaneval", "0"]


def test_progress_without_a_code_hash_is_refused(tmp_path, monkeypatch, capsys):
    """A progress file from before runs were keyed by code: which code measured it is unknown, so
    neither the run nor --partial takes it (one line, exit 2, --restart suggested), and it is kept."""
    import bench.common
    import bench.sense
    from bench.common import machine_info

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path / "results")
    argv = [*ARGV, "--workdir", str(tmp_path)]
    progress = bench.sense.progress_path(bench.sense.parse_args(argv))
    text = json.dumps({"machine": machine_info(), "cost_curve": {"1": 1.0},
                       "datasets": {"gsm8k": {"questions": 1, "agg": {}, "wide": {}}}, "elapsed_s": 1.0})
    progress.write_text(text)
    for extra in ([], ["--partial"]):
        assert bench.sense.main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "no code hash" in err[0], err
        assert "--restart" in err[0] and str(progress) in err[0]
    assert progress.read_text() == text
    assert not (tmp_path / "results").exists()


def test_a_strict_method_differing_from_ar_fails_the_run(tmp_path, monkeypatch, capsys):
    """pld's output made to differ from ar's on the question: the results are still written, with
    its row counting 0/1 identical, and the run exits 1 with one line naming the row."""
    import bench.common
    import bench.sense

    real = bench.sense.generate

    def generate(*args, **kwargs):
        r = real(*args, **kwargs)
        if kwargs["drafter"].name == "pld":
            r.token_ids = r.token_ids[:-1] + [r.token_ids[-1] + 1]
        return r

    results = tmp_path / "results"
    monkeypatch.setattr(bench.common, "RESULTS", results)
    monkeypatch.setattr(bench.sense, "generate", generate)
    argv = ["--gsm8k", "1", "--spec-per-category", "0", "--dense-docs", "6", "--max-new-tokens", "8",
            "--wide-budget", "0", "--humaneval", "0", "--workdir", str(tmp_path / "work")]
    assert bench.sense.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: strict rows not identical to ar (identical/questions): gsm8k/ood pld 0/1", err[-3:]
    rows = {r["method"]: r for r in json.loads((results / "sense.json").read_text())["rows"] if "mat" in r}
    assert rows["pld"]["identical"] == "0/1" and rows["ar"]["identical"] == "1/1"
    assert "Strict rows whose output differs from ar's: gsm8k/ood pld 0/1" in (results / "sense.md").read_text()


def test_humaneval_rows_measure_an_id_and_a_mismatched_store(tmp_path, monkeypatch):
    """HumanEval's rows: an ID store self-distilled from its even problems and, as "ood", the
    GSM8K ID store; every strict row identical to ar's, and the report says what the stores are."""
    import bench.common
    import bench.sense

    results = tmp_path / "results"
    monkeypatch.setattr(bench.common, "RESULTS", results)
    argv = ["--gsm8k", "1", "--spec-per-category", "0", "--dense-docs", "0", "--id-questions", "20",
            "--humaneval", "1", "--store-questions", "20", "--distill-max-tokens", "4", "--max-new-tokens", "8",
            "--wide-budget", "0", "--float32-questions", "0", "--workdir", str(tmp_path / "work")]
    assert bench.sense.main(argv) == 0
    rows = [r for r in json.loads((results / "sense.json").read_text())["rows"]
            if r["dataset"] == "humaneval_heldout" and "mat" in r]
    assert {r["datastore"] for r in rows} == {"id", "ood"}
    assert {r["method"] for r in rows} == set(bench.sense.METHODS)
    assert all(r["identical"] == "1/1" for r in rows if r["method"] != "sense_soft")
    assert "its id store is self-distilled from the first 20 of the even ones" in (results / "sense.md").read_text()
