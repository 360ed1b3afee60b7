"""SENSE benchmark: ar, pld, rest, dresd, sense_strict, sense_soft on the same data, one run.

    python -m bench.sense [--gsm8k 100] [--spec-per-category 10] [--dense-docs 7473] [--id-questions 0]

Datastores from GSM8K train: OOD = the dataset's answers (sparse: answer tokens; dense: the
answers in their chat context). ID (self-distillation, --id-questions > 0) = the target's own
greedy answers to that many train questions. Every method's budget is chosen per step by the
adaptive budget from the verify cost curve measured at start (sense_soft: sizes >= its window).
Quality on GSM8K: accuracy, token agreement and ROUGE-L with the ar output, mean log-prob.
Writes bench/results/sense.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.analysis import spec_bench_by_category
from bench.common import machine_info, median, write_results
from bench.quality import gsm8k_answer, mean_logprob, rouge_l, token_agreement
from decoding.budget import AdaptiveBudget, measure_verify_cost
from decoding.config import SamplingParams
from decoding.drafters import DenseDrafter, HybridDrafter, NoDrafter, PromptLookupDrafter, SparseDrafter
from decoding.engine import encode_prompt, generate
from decoding.soft import SoftGateConfig
from decoding.target import TargetModel
from index.corpus import gsm8k, gsm8k_answer_text, spec_bench
from index.dense_build import Document, build_dense_datastore
from index.dense_store import DenseStore
from index.sparse import SparseIndex

METHODS = ("ar", "pld", "rest", "dresd", "sense_strict", "sense_soft")
STORELESS = ("ar", "pld")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def make(method, sparse, dense):
    if method == "ar":
        return NoDrafter()
    if method == "pld":
        return PromptLookupDrafter()
    if method == "rest":
        return SparseDrafter(sparse)
    if method == "dresd":
        return DenseDrafter(dense, mode="chains", dynamic=False, name="dresd")
    return HybridDrafter([(PromptLookupDrafter(), 1.0), (SparseDrafter(sparse), 1.0), (DenseDrafter(dense), 2.0)],
                         name=method)


def summarize(agg, ds_name: str, store_name: str, n_items: int) -> list[dict]:
    """One row per method (MAT, acceptance, speedup over ar, efficiency, quality) and, on GSM8K,
    the accuracy ratio of sense_soft over ar."""
    rows = []
    tps_ar = sum(agg["ar"]["new_tokens"]) / sum(agg["ar"]["time_total"])
    for method in METHODS:
        a = agg[method]
        steps, acc, drafted = sum(a["steps"]), sum(a["accepted"]), sum(a["drafted"])
        mat = (acc + steps) / steps if steps else 0.0
        tps = sum(a["new_tokens"]) / sum(a["time_total"])
        speedup = tps / tps_ar
        per_q = [t / ta for t, ta in zip(a["tps"], agg["ar"]["tps"])]
        row = {"method": method, "dataset": ds_name, "datastore": store_name, "questions": n_items,
               "mat": round(mat, 3), "acceptance_rate": round(acc / drafted, 3) if drafted else 0.0,
               "speedup": round(speedup, 3), "efficiency": round(speedup / mat, 3) if mat else 0.0,
               "tokens_per_s": round(tps, 2), "speedup_per_question_median": round(median(per_q), 3),
               "speedup_per_question_iqr": [round(float(np.percentile(per_q, 25)), 3),
                                            round(float(np.percentile(per_q, 75)), 3)],
               "time_split_s": {k: round(sum(a[k]), 2) for k in ("time_draft", "time_verify", "time_commit")},
               "token_agreement_with_ar": round(float(np.mean(a["agree"])), 4),
               "rouge_l_with_ar": round(float(np.mean(a["rouge"])), 4),
               "rouge_l_with_ar_std": round(float(np.std(a["rouge"])), 4)}
        if a["correct"]:
            row["accuracy"] = round(float(np.mean(a["correct"])), 4)
        if a["logprob"]:
            row["mean_logprob"] = round(float(np.mean(a["logprob"])), 4)
            row["mean_logprob_std"] = round(float(np.std(a["logprob"])), 4)
        gates = {k[5:]: int(sum(v)) for k, v in a.items() if k.startswith("gate_")}
        if gates:
            row["soft_gates"] = gates
        rows.append(row)
    if agg["ar"]["correct"]:
        acc_ar = float(np.mean(agg["ar"]["correct"]))
        acc_soft = float(np.mean(agg["sense_soft"]["correct"]))
        rows.append({"method": "sense_soft", "vs": "ar", "dataset": ds_name, "datastore": store_name,
                     "accuracy_ratio": round(acc_soft / acc_ar, 4) if acc_ar else None,
                     "accuracy": round(acc_soft, 4), "vs_accuracy": round(acc_ar, 4),
                     "correct": int(sum(agg["sense_soft"]["correct"])), "vs_correct": int(sum(agg["ar"]["correct"])),
                     "questions": n_items})
    return rows


def self_distilled(target, rows, max_tokens: int, workdir) -> list[tuple[list[int], list[int]]]:
    """(prompt, the target's own greedy answer) per GSM8K row, by batched greedy generation;
    cached in `workdir` (keyed by count, length and the model's weights hash)."""
    import json

    from decoding.batch_generate import generate_greedy_batched
    from index.dense_format import model_fingerprint

    fp = model_fingerprint(target)
    cache = workdir / f"id_answers_{len(rows)}_{max_tokens}_{fp.weights_hash[:12]}.json"
    prompts = [encode_prompt(target, r["question"]) for r in rows]
    if cache.exists():
        answers = json.loads(cache.read_text())
        log(f"self-distilled answers from {cache}")
    else:
        t0, done = time.perf_counter(), [0]

        def progress(n):
            done[0] += n
            log(f"  id: {done[0]}/{len(prompts)} answers, {time.perf_counter() - t0:.0f} s")

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
    docs = [Document(p + a, corpus=name, store_from=len(p)) for p, a in answers]
    from index.dense_format import model_fingerprint

    fp = model_fingerprint(target)
    h = hashlib.sha256(fp.weights_hash.encode())
    for p, a in answers:
        h.update(np.asarray(p, dtype=np.int64).tobytes() + b"|" + np.asarray(a, dtype=np.int64).tobytes() + b";")
    out = Path(workdir) / f"{name}_{len(docs)}_{h.hexdigest()[:12]}"
    if (out / "manifest.json").is_file():
        log(f"{name}: dense datastore of {len(docs)} documents from {out}")
        return sparse, DenseStore.load(out, expect=fp)
    t0 = time.perf_counter()
    build_dense_datastore(target, docs, out, progress=lambda i, n: log(f"  {name}: {i}/{n} documents")
                          if i % 1000 == 0 else None)
    log(f"{name}: dense datastore of {len(docs)} documents in {time.perf_counter() - t0:.0f} s")
    return sparse, DenseStore.load(out, expect=fp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gsm8k", type=int, default=100)
    ap.add_argument("--spec-per-category", type=int, default=10)
    ap.add_argument("--dense-docs", type=int, default=7473)
    ap.add_argument("--id-questions", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--distill-max-tokens", type=int, default=256, help="answer length of the ID datastore")
    ap.add_argument("--workdir", default="bench/out")
    args = ap.parse_args(argv)
    from decoding.cli import _quiet_libraries

    _quiet_libraries()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    target = TargetModel.load()
    eos = sorted(target.eos_token_ids)[:1]
    cost = measure_verify_cost(target, (1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
    log("cost curve:", {n: round(c / cost[0], 2) for n, c in cost.items()})
    soft_cfg = SoftGateConfig()
    params = SamplingParams(max_new_tokens=args.max_new_tokens)

    train = gsm8k("train")[: args.dense_docs]
    ood = [(encode_prompt(target, r["question"]), target.tokenizer(gsm8k_answer_text(r["answer"]))["input_ids"] + eos)
           for r in train]
    stores = {"ood": build_stores(target, ood, workdir, "ood")}
    if args.id_questions:
        own = self_distilled(target, train[: args.id_questions], args.distill_max_tokens, workdir)
        stores["id"] = build_stores(target, own, workdir, "id")

    tests = {"gsm8k": [(q["question"], q["answer"]) for q in gsm8k("test")[: args.gsm8k]]}
    by_cat = spec_bench_by_category(spec_bench(), args.spec_per_category)
    tests["spec_bench"] = [(q, None) for cat in by_cat.values() for q in cat]

    rows, md = [], []
    for ds_name, items in tests.items():
        # agg[store][method]: ar and pld do not read a datastore, so they run once per question
        # and their figures stand in every datastore's table (measured side by side all the same).
        agg = {name: defaultdict(lambda: defaultdict(list)) for name in stores}
        for qi, (question, gold) in enumerate(items):
            ids = encode_prompt(target, question)
            ar_out = None
            for store_name, (sparse, dense) in stores.items():
                for method in METHODS:
                    a = agg[store_name][method]
                    if method in STORELESS and store_name != next(iter(stores)):
                        for k, v in agg[next(iter(stores))][method].items():
                            a[k].append(v[-1])
                        continue
                    soft = soft_cfg if method == "sense_soft" else None
                    sizes = [s for s in cost if s >= soft_cfg.window] if soft else None
                    budget = AdaptiveBudget(cost, sizes=sizes)
                    r = generate(target, ids, params=params, drafter=make(method, sparse, dense), budget=budget,
                                 soft=soft)
                    s = r.stats
                    for k in ("new_tokens", "steps", "drafted", "accepted", "time_total", "time_draft",
                              "time_verify", "time_commit"):
                        a[k].append(getattr(s, k))
                    a["tps"].append(s.tokens_per_s)
                    if method == "ar":
                        ar_out = r.token_ids
                    a["agree"].append(token_agreement(r.token_ids, ar_out))
                    a["rouge"].append(rouge_l(r.token_ids, ar_out))
                    if gold is not None:
                        a["correct"].append(gsm8k_answer(r.text) == gsm8k_answer(gold))
                        if method in ("ar", "sense_soft"):
                            a["logprob"].append(mean_logprob(target, ids, r.token_ids))
                    if soft and s.soft_gates:
                        for k, v in s.soft_gates.items():
                            a["gate_" + k].append(v)
            if qi % 10 == 9:
                log(f"{ds_name}: {qi + 1}/{len(items)}")
        for store_name in stores:
            rows += summarize(agg[store_name], ds_name, store_name, len(items))
    machine = machine_info()
    rest_mat = {(r["dataset"], r["datastore"]): r["mat"] for r in rows if r["method"] == "rest" and "mat" in r}
    md = ["# SENSE benchmark", "",
          f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, float32 CPU, "
          f"embedded SmolLM2-135M-Instruct; greedy, max {args.max_new_tokens} new tokens; adaptive budget.", "",
          "| datastore | dataset | method | MAT | MAT / REST | acceptance | speedup | efficiency | accuracy |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "mat" not in r:
            continue
        rm = rest_mat.get((r["dataset"], r["datastore"]))
        md.append(f"| {r['datastore']} | {r['dataset']} ({r['questions']}) | {r['method']} | {r['mat']:.2f} | "
                  f"{r['mat'] / rm if rm else float('nan'):.2f} | {r['acceptance_rate']:.3f} | "
                  f"{r['speedup']:.2f}x | {r['efficiency']:.2f} | {r.get('accuracy', '')} |")
    for r in rows:
        if "accuracy_ratio" in r:
            md.append(f"\nGSM8K accuracy, sense_soft vs ar ({r['datastore']}): {r['accuracy']} vs "
                      f"{r['vs_accuracy']} (ratio {r['accuracy_ratio']}).")
    path = write_results("sense", machine, rows, "\n".join(md) + "\n",
                         extra={"cost_curve": {str(n): round(c / cost[0], 3) for n, c in cost.items()},
                                "args": vars(args)})
    print("\n".join(md))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
