"""The GPU check (run through bench/gpu/run.sh on a machine with a CUDA device).

1. The target in the dtype `auto` picks there (bfloat16 or float16 measured), its verify cost
   curve c(n) up to 128 draft tokens.
2. GSM8K test questions with an ID store (the target's own greedy answers to GSM8K train,
   self-distilled there in batches): `ar`, SENSE-strict and SENSE-soft with the adaptive
   budget; methods rotated per question; tokens/s, MAT, and how many strict outputs are
   identical to `ar`'s.
3. FAISS search latency over the ID store's keys (and 1M random ones): GPU if faiss has GPU
   support, else CPU, said in the row.

    python -m bench.gpu.measure [--questions 40] [--id-questions 400] [--max-new-tokens 128] [--device cuda]

Writes bench/results/gpu.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import machine_info, method_order, write_results
from bench.sense import build_stores, make, self_distilled
from decoding.budget import AdaptiveBudget, draft_sizes
from decoding.config import SamplingParams
from decoding.cost import measure_verify_cost, relative_cost
from decoding.engine import encode_prompt, generate
from decoding.config import SoftGateConfig
from decoding.target import TargetModel
from index.corpus import gsm8k

SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
METHODS = ("ar", "sense_strict", "sense_soft")


def faiss_latency(keys: np.ndarray, k: int = 10, random_keys: int = 1_000_000) -> list[dict]:
    import faiss

    gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    rows = []
    rng = np.random.default_rng(0)
    for name, base in (("id_store", keys), (f"random_{random_keys}", rng.standard_normal((random_keys, keys.shape[1]),
                                                                                      dtype=np.float32))):
        base = np.ascontiguousarray(base, dtype=np.float32)
        index = faiss.IndexFlatIP(base.shape[1])
        if gpu:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(base)
        for batch in (1, 32):
            q = base[rng.integers(0, len(base), batch)]
            index.search(q, k)
            ts = []
            for _ in range(50):
                t0 = time.perf_counter()
                index.search(q, k)
                ts.append(time.perf_counter() - t0)
            rows.append({"method": "faiss_search", "dataset": name, "keys": len(base), "batch": batch,
                         "device": "gpu" if gpu else "cpu", "ms": round(statistics.median(ts) * 1e3, 4)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--id-questions", type=int, default=400)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--random-keys", type=int, default=1_000_000, help="keys of the random FAISS search base")
    a = ap.parse_args(argv)
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="sense-gpu-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    target = TargetModel.load(device=a.device)
    print(f"dtype: {target.dtype_choice.reason}", flush=True)
    seconds = measure_verify_cost(target, SIZES, repeats=9)
    cost = relative_cost(seconds)
    rows = [{"method": "verify_cost", "draft_tokens": n, "relative_cost": round(c, 3),
             "ms": round(seconds[n] * 1e3, 3)} for n, c in cost.items()]
    print("c(n):", {n: round(c, 2) for n, c in cost.items()}, flush=True)

    answers = self_distilled(target, [r["question"] for r in gsm8k("train")[: a.id_questions]], a.max_new_tokens,
                             workdir)
    sparse, dense = build_stores(target, answers, workdir, "id")
    params = SamplingParams(max_new_tokens=a.max_new_tokens)
    soft = SoftGateConfig()
    figures = {m: {"tokens": 0, "seconds": 0.0, "steps": 0, "accepted": 0, "identical": 0} for m in METHODS}
    for i, row in enumerate(gsm8k("test")[: a.questions]):
        ids = encode_prompt(target, row["question"])
        out = {}
        for m in method_order(METHODS, i):
            gates = soft if m == "sense_soft" else None
            budget = AdaptiveBudget(seconds, sizes=draft_sizes(seconds, gates))
            r = generate(target, ids, params=params, drafter=make(m, sparse, dense), budget=budget, soft=gates)
            f = figures[m]
            f["tokens"] += r.stats.new_tokens
            f["seconds"] += r.stats.time_total
            f["steps"] += r.stats.steps
            f["accepted"] += r.stats.accepted
            out[m] = r.token_ids
        for m in METHODS:
            figures[m]["identical"] += out[m] == out["ar"]
    ar_tps = figures["ar"]["tokens"] / figures["ar"]["seconds"]
    for m, f in figures.items():
        tps = f["tokens"] / f["seconds"]
        row = {"method": m, "dataset": "gsm8k", "datastore": "id", "dtype": target.dtype_choice.dtype,
               "budget": "adaptive", "vs": "ar", "speedup": round(tps / ar_tps, 3), "tokens_per_s": round(tps, 1),
               "mat": round((f["accepted"] + f["steps"]) / max(f["steps"], 1), 3), "questions": a.questions}
        if m != "sense_soft":
            row["identical"] = f"{f['identical']}/{a.questions}"
        rows.append(row)
    rows += faiss_latency(dense.keys, random_keys=a.random_keys)

    machine = machine_info()
    machine["dtype"] = target.dtype_choice.to_dict()
    md = ["# GPU check", "", f"dtype: {target.dtype_choice.reason}", "",
          "| draft tokens | c(n) | ms |", "|---|---|---|"]
    md += [f"| {r['draft_tokens']} | {r['relative_cost']} | {r['ms']} |" for r in rows if r["method"] == "verify_cost"]
    md += ["", f"GSM8K test, {a.questions} questions, {a.max_new_tokens} tokens, ID store of {a.id_questions} "
               "self-distilled answers, adaptive budget:", "",
           "| method | tokens/s | speedup | MAT | identical to ar |", "|---|---|---|---|---|"]
    md += [f"| {r['method']} | {r['tokens_per_s']} | {r['speedup']}x | {r['mat']} | {r.get('identical', '-')} |"
           for r in rows if r.get("dataset") == "gsm8k"]
    md += ["", "| FAISS search | keys | batch | device | ms |", "|---|---|---|---|---|"]
    md += [f"| {r['dataset']} | {r['keys']} | {r['batch']} | {r['device']} | {r['ms']} |"
           for r in rows if r["method"] == "faiss_search"]
    md += ["", f"Run time {time.perf_counter() - t_start:.0f} s."]
    write_results("gpu", machine, rows, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
