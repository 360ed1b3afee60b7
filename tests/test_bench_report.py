"""bench/sense.py's report: rendered from the result payload alone, targets judged from the rows."""

from __future__ import annotations

import pytest

from bench.sense import METHODS, render, step_costs


def _row(method, mat, tps, speedup, verify=8.0, total=10.0):
    return {"method": method, "dataset": "gsm8k", "datastore": "id", "questions": 3, "mat": mat,
            "acceptance_rate": 0.2, "speedup": speedup, "efficiency": speedup / mat, "tokens_per_s": tps,
            "speedup_per_question_median": speedup, "speedup_per_question_iqr": [speedup, speedup],
            "time_total_s": total, "time_split_s": {"time_draft": 0.5, "time_verify": verify, "time_commit": 0.5},
            "rouge_l_with_ar": 1.0, "token_agreement_with_ar": 1.0}


def _payload(strict_mat, soft_mat, strict_speedup):
    mats = {"ar": 1.0, "pld": 1.5, "rest": 1.25, "dresd": 1.3, "sense_strict": strict_mat, "sense_soft": soft_mat}
    speed = {"sense_strict": strict_speedup}
    rows = [_row(m, mats[m], 20.0 * speed.get(m, 1.1), speed.get(m, 1.1)) for m in METHODS]
    return {"benchmark": "sense", "machine": {"cpu": "x", "cores": 2, "torch": "t"}, "rows": rows,
            "args": {"gsm8k": 3, "max_new_tokens": 8}, "cost_curve": {"0": 1.0, "4": 1.5}}


def test_targets_met_and_missed_are_judged_from_the_rows():
    md = render(_payload(strict_mat=2.5, soft_mat=3.0, strict_speedup=1.2))
    line = next(x for x in md.splitlines() if x.startswith("- gsm8k, id store"))
    assert "SENSE-strict MAT / REST MAT 2.00 (target 2.0: met)" in line
    assert "SENSE-soft MAT 3.00 (target 4.0: missed by 25%)" in line
    assert "SENSE-strict speedup over ar 1.20 (target 1.8: missed by 33%)" in line
    md = render(_payload(strict_mat=2.6, soft_mat=4.2, strict_speedup=1.9))
    line = next(x for x in md.splitlines() if x.startswith("- gsm8k, id store"))
    assert line.count(": met") == 3 and "missed" not in line


def test_step_costs_split_ms_per_step_by_time_shares():
    c = step_costs(_row("sense_strict", mat=2.0, tps=40.0, speedup=1.0, verify=8.0, total=10.0))
    assert c["step"] == pytest.approx(50.0)  # 2 tokens per step at 40 tokens/s
    assert c["verify"] == pytest.approx(40.0) and c["draft"] == pytest.approx(2.5)
    assert c["other"] == pytest.approx(50.0 * 1.0 / 10.0)
    assert sum(c[k] for k in ("draft", "verify", "commit", "other")) == pytest.approx(c["step"])


def test_cpu_isa_names_the_widest_vector_extension():
    from decoding.measured import isa_summary as cpu_isa

    assert cpu_isa("fpu sse4_2 avx avx2 fma".split()) == "avx2"
    assert cpu_isa("avx2 avx512f avx512bw avx512_bf16".split()) == "avx512 + bf16"
    assert cpu_isa("avx2 avx512f amx_tile".split()) == "avx512 + amx"
    assert cpu_isa([]) == "other"


def test_wide_tree_rows_get_their_own_table_and_leave_the_targets_alone():
    payload = _payload(strict_mat=2.5, soft_mat=3.0, strict_speedup=1.2)
    wide = [dict(_row(m, mat, 10.0, 0.8), budget=32, questions=2)
            for m, mat in (("ar", 1.0), ("rest", 2.0), ("sense_strict", 3.6), ("sense_soft", 4.4))]
    payload["rows"] += wide
    md = render(payload)
    line = next(x for x in md.splitlines() if x.startswith("- gsm8k, id store"))
    assert "SENSE-soft MAT 3.00 (target 4.0: missed by 25%)" in line     # judged on the adaptive rows
    assert "## Wide trees: a fixed budget of 32 draft nodes (GSM8K, first 2 questions)" in md
    assert "| id | sense_soft | 4.40 | 2.20 |" in md
    assert "- id store, budget 32: SENSE-strict MAT / REST MAT 1.80 (target 2.0); SENSE-soft MAT 4.40" in md
    assert "gsm8k (2)" not in md                                          # not in the adaptive table


def test_progress_resumes_only_on_the_same_kind_of_machine_and_code(tmp_path):
    import json

    from bench.sense import UnkeyedProgress, load_progress

    machine = {"cpu": "AMD EPYC (avx2)", "cpu_family_model": "family 25 model 1", "cores": 2, "torch": "2.13.0",
               "memory_gib": 23.5}
    path = tmp_path / "progress_x.json"
    assert load_progress(path, machine, "c1") == {}                        # nothing saved
    saved = {"machine": machine, "code": "c1", "datasets": {"gsm8k": {"questions": 3}}}
    path.write_text(json.dumps(saved))
    assert load_progress(path, machine, "c1") == saved
    assert load_progress(path, {**machine, "memory_gib": 31.0}, "c1") == saved   # not a kind of machine
    assert load_progress(path, {**machine, "cpu": "AMD EPYC (avx512)"}, "c1") == {}
    assert load_progress(path, {**machine, "cores": 4}, "c1") == {}
    assert load_progress(path, machine, "c2") == {}                        # other algorithm code
    path.write_text(json.dumps({k: v for k, v in saved.items() if k != "code"}))
    with pytest.raises(UnkeyedProgress, match="no code hash.*--restart"):     # code unknown: refused
        load_progress(path, machine, "c1")
    assert load_progress(path, {**machine, "cores": 4}, "c1") == {}       # (another machine: over anyway)


def test_code_hash_covers_the_algorithm_sources(tmp_path):
    import shutil
    from pathlib import Path

    from bench.sense import code_hash

    root = Path(__file__).resolve().parents[1]
    for part in ("decoding", "index"):
        shutil.copytree(root / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "bench").mkdir()
    shutil.copy(root / "bench" / "sense.py", tmp_path / "bench" / "sense.py")
    assert code_hash(tmp_path) == code_hash()
    (tmp_path / "index" / "notes.txt").write_text("not code")
    assert code_hash(tmp_path) == code_hash()
    engine = tmp_path / "decoding" / "engine.py"
    engine.write_text(engine.read_text() + "\n# changed\n")
    assert code_hash(tmp_path) != code_hash()


def test_partial_without_saved_progress_is_a_clear_error(tmp_path, capsys):
    from bench.sense import main

    assert main(["--partial", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no saved progress of this command" in err and "run it first" in err
    assert "Traceback" not in err


def _agg(identical: dict) -> dict:
    """agg[method][figure] for `summarize`: two questions, `identical[method]` their verdicts."""
    from collections import defaultdict

    agg = defaultdict(lambda: defaultdict(list))
    for m in METHODS:
        a = agg[m]
        for k, v in (("new_tokens", 10), ("steps", 8), ("drafted", 4), ("accepted", 2), ("time_total", 1.0),
                     ("time_draft", 0.1), ("time_verify", 0.8), ("time_commit", 0.1), ("tps", 10.0),
                     ("agree", 1.0), ("rouge", 1.0)):
            a[k] += [v, v]
        if m in identical:
            a["identical"] += identical[m]
    return agg


def test_strict_rows_count_outputs_identical_to_ar_and_a_mismatch_fails_the_run(capsys):
    from bench.sense import SOFT, check_strict, summarize

    same = {m: [True, True] for m in METHODS if m not in SOFT}
    rows = summarize(_agg(same), "gsm8k", "ood", 2)
    by = {r["method"]: r for r in rows}
    assert all(by[m]["identical"] == "2/2" for m in same) and "identical" not in by["sense_soft"]
    assert check_strict(rows) == 0 and capsys.readouterr().err == ""
    md = render({**_payload(2.5, 3.0, 1.2), "rows": rows})
    assert "| identical to ar |" in md and "| ood | gsm8k (2) | pld |" in md
    assert next(x for x in md.splitlines() if "| ood | gsm8k (2) | pld |" in x).endswith("| 1.000 | 2/2 |  |")
    assert next(x for x in md.splitlines() if "| sense_soft |" in x).endswith("| 1.000 | — |  |")
    assert "differs from ar" not in md

    rows = summarize(_agg({**same, "rest": [True, False]}), "gsm8k", "ood", 2)
    wide = summarize(_agg({"ar": [True], "sense_strict": [False]}), "gsm8k", "ood", 1,
                     methods=("ar", "sense_strict"), budget=32)
    assert check_strict(rows + wide) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: strict rows not identical to ar (identical/questions): gsm8k/ood rest 1/2; "
                   "gsm8k/ood sense_strict (budget 32) 0/1"]
    md = render({**_payload(2.5, 3.0, 1.2), "rows": rows + wide})
    assert "**Strict rows whose output differs from ar's: gsm8k/ood rest 1/2, gsm8k/ood sense_strict " \
           "(budget 32) 0/1.**" in md


def test_report_of_a_payload_from_before_the_identical_count_shows_a_dash():
    payload = _payload(strict_mat=2.5, soft_mat=3.0, strict_speedup=1.2)   # rows without "identical"
    payload["rows"] += [dict(_row("rest", 2.0, 10.0, 0.8), budget=32, questions=2)]
    md = render(payload)
    table = [x for x in md.splitlines() if x.startswith(("| id | gsm8k (3) |", "| id | rest |"))]
    assert len(table) == len(METHODS) + 1                 # the adaptive rows and the wide-tree row
    assert all("| — |" in x for x in table), table
    assert "differs from ar" not in md


def test_method_order_rotates_and_alternates():
    from bench.common import method_order

    methods = ["a", "b", "c", "d"]
    orders = [method_order(methods, i) for i in range(2 * len(methods))]
    assert orders[0] == methods and orders[1] == methods[::-1] and orders[2] == ["b", "c", "d", "a"]
    for m in methods:                                   # every method in every position
        assert {o.index(m) for o in orders} == set(range(len(methods)))
    for i in range(0, len(orders), 2):                  # every pair runs once in each order
        assert orders[i] == orders[i + 1][::-1]
    assert method_order((), 3) == [] and sorted(method_order(methods, 7)) == methods


def test_spec_bench_categories_and_float32_rows_are_collected_and_reported():
    """collect_rows pools Spec-Bench's categories into "spec_bench_heldout" (judged against its target)
    and tags the float32 rows; the report gives each category a line and float32 its table."""
    from bench.sense import collect_rows

    def agg(tps):
        return {"id": {m: {**_agg({})[m], "tps": [tps, tps], "identical": [True, True]} for m in METHODS}}

    done = {f"spec_bench_heldout/{cat}": {"questions": 2, "agg": agg(10.0), "wide": {}} for cat in ("qa", "rag")}
    f32 = {"id": {m: _agg({})[m] for m in ("ar", "sense_strict")}}
    done["gsm8k"] = {"questions": 2, "agg": agg(10.0), "wide": {}, "float32": f32}
    rows = collect_rows(done, 0, "bfloat16")
    pooled = [r for r in rows if r["dataset"] == "spec_bench_heldout"]
    assert {r["method"] for r in pooled} == set(METHODS) and all(r["questions"] == 4 for r in pooled)
    assert all(r["dtype"] == "bfloat16" for r in rows if not r.get("float32_beside"))
    beside = [r for r in rows if r.get("float32_beside")]
    assert {(r["method"], r.get("vs")) for r in beside} == {("ar", None), ("sense_strict", None), ("ar", "ar_float32")}
    assert all(r["dtype"] == ("bfloat16" if r.get("vs") else "float32") for r in beside)
    md = render({**_payload(2.5, 3.0, 1.2), "rows": rows, "machine": {"cpu": "x", "cores": 2, "torch": "t",
                                                                       "dtype": "bfloat16"}})
    assert "| qa | 2 | " in md and "| rag | 2 | " in md and "| 8/8 |" in md
    assert "- spec_bench_heldout, id store: SENSE-strict speedup over ar 1.00 (target 1.5: missed by 33%)." in md
    assert "## float32 beside bfloat16" in md and "| sense_strict | float32 | 2 |" in md
    assert "bfloat16 ar over float32 ar on the same 2 questions: 1.00x." in md
    assert "| id | spec_bench_heldout/qa" not in md        # categories only in their own table


def test_spec_bench_halves_never_evaluate_a_store_question():
    from bench.analysis import spec_bench_halves
    from index.corpus import spec_bench

    store, evaluation = spec_bench_halves(spec_bench(), per_category=6)
    assert set(evaluation) == {"mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"}
    assert all(len(qs) == 6 and len(set(qs)) == 6 for qs in evaluation.values())
    assert len(store) == 240 and not set(store) & {q for qs in evaluation.values() for q in qs}
    # MT-Bench's sub-categories are sampled across its id range, not only its first block
    assert len({q for q in evaluation["mt_bench"]}) == 6 and evaluation["mt_bench"][0] != evaluation["mt_bench"][1]


def test_humaneval_halves_never_evaluate_a_store_problem():
    from bench.analysis import humaneval_halves
    from index.corpus import humaneval

    problems = humaneval()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    store, evaluation = humaneval_halves(problems, n=24)
    assert len(store) == 82 and len(evaluation) == 24 and len(set(evaluation)) == 24
    assert not set(store) & set(evaluation)
    # spread over the whole half: the last problems (the longest) are sampled too
    assert any(p["prompt"] in evaluation[-1] for p in problems[151::2])
    assert humaneval_halves(problems, n=0)[1] == [] and len(humaneval_halves(problems, n=500)[1]) == 82


def test_soft_quality_reports_gate_rates_and_a_paired_interval():
    import numpy as np

    from bench.soft_quality import _mean_interval, gate_rates

    rates = gate_rates({"mismatches": 200, "entropy_pass": 150, "soft_tokens": 50}, new_tokens=1000)
    assert rates["entropy_pass"] == {"per_mismatch": 0.75, "per_1000_tokens": 150.0}
    assert rates["soft_tokens"]["per_mismatch"] == 0.25 and rates["mismatches"]["per_1000_tokens"] == 200.0
    assert gate_rates({"soft_tokens": 3}, new_tokens=0)["soft_tokens"] == {"per_mismatch": None,
                                                                           "per_1000_tokens": None}
    d = np.random.default_rng(1).normal(-0.01, 0.05, 400)          # a small, real difference
    lo, hi = _mean_interval(d)
    assert lo < d.mean() < hi and hi < 0 and hi - lo < 0.02


def test_serving_load_report_shows_medians_and_ranges_from_the_committed_rows():
    """The served-load report renders from a payload alone (so a committed run re-renders), each
    ratio with the range of its repeats, and the batched decoder's rows per forward (nan in runs
    that did not record them)."""
    from bench.serving_load import render

    def row(m, c, vs, ratio, lo, hi):
        return {"method": m, "concurrency": c, "vs": vs, "ratio": ratio, "ratio_min": lo, "ratio_max": hi,
                "tokens_per_s": 30.0, "peer_tokens_per_s": 20.0, "ttft_p50_ms": 300, "ttft_p99_ms": 400,
                "latency_p50_s": 2.0, "latency_p99_s": 3.0, **({"rows_per_forward": 7.46} if m == "sense" else {})}

    rows = [row("ar", 1, "serialized", 1.5, 1.4, 1.6), row("ar", 1, "hf_static_batch", 1.1, 1.1, 1.1),
            row("sense", 1, "serialized", 1.2, 1.0, 1.3), row("sense", 1, "hf_static_batch", 1.3, 1.2, 1.4),
            {**row("sense", 1, "ar_batched", 0.9, 0.8, 1.1), "ratio_whole_run": 0.85},
            row("sense", 1, "engine", 1.02, 0.95, 1.04)]
    md = render({"machine": {"dtype": "bfloat16", "torch_threads": 2}, "rows": rows,
                 "args": {"max_tokens": 64, "min_requests": 8, "repeats": 3}})
    assert "| ar | 1 | 30.0 | 1.50x [1.40, 1.60] (20.0) | 1.10x (20.0) | - |" in md
    assert "| sense | 1 | 30.0 | 1.20x [1.00, 1.30] (20.0) | 1.30x [1.20, 1.40] (20.0) | 0.90x [0.80, 1.10] |" in md
    assert "served sense over the in-process engine, question by question in turns: 1.02x [0.95, 1.04]" in md
    assert "| 2.00 / 3.00 | 7.5 | 0.85x |" in md and "| 2.00 / 3.00 | nan | - |" in md
    assert "Tokens/s are counted while c requests were in flight and decoding" in md
    # The in-flight window's tokens: the chunks that arrived by its end.
    from bench.serving_load import tokens_before
    assert tokens_before([[(1.0, 3), (2.0, 2), (3.5, 4)], [(0.5, 1), (3.0, 5)]], 3.0) == 11
    ttft = {"method": "ttft_p99_ratio", "decode_method": "sense", "concurrency": 16, "vs": "concurrency_1",
            "ratio": 1.8, "ttft_p99_ms": 108.0, "ttft_p99_ms_1": 60.0, "ratio_waves": 3.7, "ratio_burst": 9.6}
    md = render({"machine": {"dtype": "bfloat16", "torch_threads": 2}, "rows": [*rows, ttft],
                 "args": {"max_tokens": 64, "min_requests": 8, "repeats": 3}})
    assert "at 16 in flight over its value at 1, steady state: 1.80x (108 against 60 ms;" in md
    assert "their later requests: 3.70x; every request, the opening burst included: 9.60x." in md
    # The drafting gate after each level, as /health summarized it (keys are strings once in JSON).
    gates = {"4": {"4": {"verdict": "drafts nothing", "pairs": 35, "gain": -0.079}},
             "8": {"4": {"verdict": "drafts nothing", "pairs": 35, "gain": -0.079},
                   "7-9": {"verdict": "drafts", "pairs": 6, "gain": 0.021, "seeded_from": "4"}},
             "1": None}
    md = render({"machine": {"dtype": "bfloat16", "torch_threads": 2}, "rows": rows, "gates": gates,
                 "args": {"max_tokens": 64, "min_requests": 8, "repeats": 3}})
    assert "- after 4 in flight: 4: drafts nothing (35 pairs, -7.9%)" in md
    assert "- after 8 in flight: 4: drafts nothing (35 pairs, -7.9%); 7-9: drafts (6 pairs, +2.1%, seeded from 4)" in md
    assert "- after 1 in flight: no load gated" in md


def test_the_load_benchmarks_id_store_is_built_once_from_the_models_own_answers(target, tmp_path):
    """--dense id: the model's greedy answers to the first GSM8K train questions, as a dense
    datastore directory that loads against the model; a second call finds it instead of building."""
    from bench.sense import dense_source, gsm8k_id_store
    from decoding.fingerprint import model_fingerprint
    from index.dense_store import DenseStore

    out = gsm8k_id_store(target, questions=4, max_tokens=24, workdir=tmp_path)
    store = DenseStore.load(out, expect=model_fingerprint(target))
    assert 64 <= len(store) <= 4 * 24          # the answers' positions only, not the prompts'
    built = (out / "manifest.json").stat().st_mtime_ns
    assert gsm8k_id_store(target, questions=4, max_tokens=24, workdir=tmp_path) == out
    assert (out / "manifest.json").stat().st_mtime_ns == built
    assert dense_source(target, "default")[0] == "default"
    assert dense_source(target, str(out))[0] == str(out.resolve())


def test_batching_steady_state_steps_every_method_in_turn(target):
    """bench.batching's steady state: one scheduler per method, stepped in turn on one target;
    every output is the request decoded alone, each method's window of c in flight is inside its
    own run, and the prefix cache is back afterwards."""
    from bench.batching import run_steady_together
    from decoding.config import SamplingParams
    from decoding.drafters import NoDrafter, PromptLookupDrafter
    from decoding.engine import encode_prompt, generate

    prompts = [encode_prompt(target, q) for q in ("What is 2 + 3?", "Name a colour.", "Count to five.",
                                                  "What is the capital of Italy?")]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = [generate(target, p, params=params).token_ids for p in prompts]
    cache = target.prefix_cache
    out = run_steady_together(target, prompts, {"ar": NoDrafter, "pld": PromptLookupDrafter}, params, 2, rotate=1)
    assert target.prefix_cache is cache and list(out) == ["ar", "pld"]
    for name, (seconds, outs, st) in out.items():
        assert outs == alone, name
        assert 0 < st["in_flight_seconds"] < seconds and 0 < st["in_flight_tokens"] < 4 * 12
        assert st["forwards"] > 0


def test_a_run_the_machine_stalled_is_measured_again():
    """StallGuard: runs that keep this process on the CPU are measured once; a run during which
    the process got far less CPU than its clean runs had (here: it slept, as in a VM pause) is
    measured again, and the clean attempt's value is kept. Real CPU time, no stand-ins."""
    import time

    from bench.common import StallGuard

    def busy(value, seconds=0.08):
        def measure():
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
            return value
        return measure

    # Other processes' share is left out (a limit of all of it): what the suite runs beside this
    # test must not count as a stall here; the own-share rule is the one under test.
    guard = StallGuard(others_limit=1.0)
    assert [guard.run(busy(i)) for i in range(5)] == list(range(5)) and guard.reruns == 0
    calls = []

    def stalled_once():
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.08)            # the wall clock runs, this process gets no CPU
            return "stalled"
        return busy("clean")()

    assert guard.run(stalled_once) == "clean" and len(calls) == 2
    assert guard.reruns == 1 and guard.kept_disturbed == 0
    # A rerun starts from the checkpoint: rewound before every attempt after the first only.
    log = []

    def checkpoint():
        log.append("checkpoint")
        return lambda: log.append("rewind")

    calls.clear()
    assert guard.run(stalled_once, checkpoint) == "clean" and log == ["checkpoint", "rewind"]
    log.clear()
    assert guard.run(busy("clean"), checkpoint) == "clean" and log == ["checkpoint"]
    always = StallGuard(attempts=2, others_limit=1.0)
    always.shares = [1.0] * 5
    assert always.run(lambda: time.sleep(0.05) or "slept") == "slept"      # the least disturbed of two
    assert always.reruns == 1 and always.kept_disturbed == 1
