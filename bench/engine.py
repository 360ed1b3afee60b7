"""Engine benchmark: our decoding against transformers' generate(), side by side in one run.

    python -m bench.engine [--questions 10] [--max-new-tokens 128] [--repeats 2]

On the first N GSM8K test questions (greedy, chat template; the run order rotates per question
and repeat, bench.common.method_order), in one process:
  ours, in the dtype `auto` picks (the fast dtype): ar, pld, rest (REST over GSM8K train answers)
  ours in float32, beside them:                   ar, pld
  transformers' generate():  hf_ar in float32 (what a user gets by default), hf_ar in the fast
                             dtype, and HF prompt lookup in the fast dtype for every
                             prompt_lookup_num_tokens in --hf-pld-sweep (the best is the peer)
Rows (tokens/s ratios, medians over repeats, with the min-max spread):
  ar vs hf_ar_float32 (target >= 1.5), ar vs hf_ar (same dtype, >= 1.0),
  pld vs hf_pld_best (same dtype, >= 1.2), rest vs ar, and the float32 rows.
Every strict row counts its outputs identical to our ar in the same dtype. Our methods run
the default adaptive budget. Also the verify cost curve c(n) in both dtypes.
Writes bench/results/engine.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch

from bench.common import forget_prompts, machine_info, median, method_order, write_results
from decoding.cli import _quiet_libraries
from decoding.config import SamplingParams
from decoding.cost import measure_verify_cost, relative_cost
from decoding.demo_stores import encode_text
from decoding.engine import encode_prompt, generate
from decoding.methods import Datastores, make_drafter
from decoding.model_loader import load_model_and_tokenizer
from decoding.target import TargetModel
from index.corpus import gsm8k, gsm8k_sparse_index

COST_SIZES = (1, 2, 4, 8, 16, 32, 64)
TARGETS = {("ar", "hf_ar_float32"): 1.5, ("ar", "hf_ar"): 1.0, ("pld", "hf_pld_best"): 1.2}


def hf_generate(model, ids: list[int], max_new: int, **kwargs) -> tuple[list[int], float]:
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False, **kwargs)
    return out[0, len(ids):].tolist(), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hf-pld-sweep", default="2,3,4,10", help="prompt_lookup_num_tokens values for HF's PLD")
    args = ap.parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    sweep = [int(k) for k in args.hf_pld_sweep.split(",")]

    _quiet_libraries()
    fast = TargetModel.load()                      # dtype "auto": measured, remembered per machine
    dtype = str(fast.dtype).removeprefix("torch.")
    log(f"fast dtype: {fast.dtype_choice.reason}")
    f32 = fast if dtype == "float32" else TargetModel.load(dtype="float32")
    # transformers' generate() on separate, unmodified copies
    hf = {"float32": load_model_and_tokenizer(None, dtype="float32")[0]}
    if dtype not in hf:
        hf[dtype] = load_model_and_tokenizer(None, dtype=dtype)[0]
    machine = {**machine_info(), "dtype": dtype, "dtype_choice": fast.dtype_choice.reason}

    log("measuring the verify cost curve in both dtypes ...")
    cost_ms = {d: measure_verify_cost(t, COST_SIZES) for d, t in {dtype: fast, "float32": f32}.items()}
    cost = {d: relative_cost(ms) for d, ms in cost_ms.items()}

    t0 = time.perf_counter()
    index = gsm8k_sparse_index(encode_text(fast))
    log(f"REST datastore: {index.n_docs} answers, {index.n_tokens} tokens in {time.perf_counter() - t0:.1f} s")
    stores = Datastores(sparse=index)

    questions = gsm8k("test")[: args.questions]
    prompts = [encode_prompt(fast, q["question"]) for q in questions]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    # run name -> (kind, model or target, method / generate kwargs)
    runs = {"ar": ("ours", fast, "ar"), "pld": ("ours", fast, "pld"), "rest": ("ours", fast, "rest"),
            "hf_ar": ("hf", hf[dtype], {}), "hf_ar_float32": ("hf", hf["float32"], {})}
    for k in sweep:
        runs[f"hf_pld_{k}"] = ("hf", hf[dtype], {"prompt_lookup_num_tokens": k})
    if f32 is not fast:
        runs.update({"ar_float32": ("ours", f32, "ar"), "pld_float32": ("ours", f32, "pld")})

    totals = [defaultdict(lambda: defaultdict(float)) for _ in range(args.repeats)]
    same = defaultdict(int)         # run -> outputs identical to our ar in the same dtype
    for rep in range(args.repeats):
        for qi, ids in enumerate(prompts):
            outs = {}
            for name in method_order(list(runs), qi + rep * len(prompts)):
                kind, model, how = runs[name]
                if kind == "hf":
                    toks, dt = hf_generate(model, ids, args.max_new_tokens, **how)
                    rec = {"tokens": len(toks), "seconds": dt}
                else:
                    forget_prompts(model)
                    r = generate(model, ids, params=params, drafter=make_drafter(how, stores))
                    toks, s = r.token_ids, r.stats
                    rec = {"tokens": s.new_tokens, "seconds": s.time_total, "steps": s.steps,
                           "drafted": s.drafted, "accepted": s.accepted}
                outs[name] = toks
                for k, v in rec.items():
                    totals[rep][name][k] += v
            for name in runs:
                ref = "ar_float32" if name.endswith("float32") and "ar_float32" in outs else "ar"
                same[name] += outs[name] == outs[ref]
            log(f"repeat {rep + 1}/{args.repeats}: {qi + 1}/{len(prompts)} questions")

    def tps(rep, m):
        return totals[rep][m]["tokens"] / totals[rep][m]["seconds"]

    def stat(m, key):
        return sum(totals[r][m][key] for r in range(args.repeats))

    reps = range(args.repeats)
    best_k = max(sweep, key=lambda k: median([tps(r, f"hf_pld_{k}") for r in reps]))
    for r in reps:
        totals[r]["hf_pld_best"] = totals[r][f"hf_pld_{best_k}"]
    n_runs = args.repeats * len(prompts)
    common = {"dataset": "gsm8k", "questions": len(prompts), "max_new_tokens": args.max_new_tokens,
              "repeats": args.repeats}

    def row(method, vs, run=None, run_dtype=dtype, vs_dtype=None, **extra):
        run = run or method
        ratios = [tps(r, run) / tps(r, vs) for r in reps]
        out = {"method": method, "dtype": run_dtype, "vs": vs, "vs_dtype": vs_dtype or run_dtype,
               "ratio": round(median(ratios), 3), "ratio_min": round(min(ratios), 3),
               "ratio_max": round(max(ratios), 3), "tokens_per_s": round(median([tps(r, run) for r in reps]), 2),
               "vs_tokens_per_s": round(median([tps(r, vs) for r in reps]), 2)}
        if stat(run, "steps"):
            out["mat"] = round((stat(run, "accepted") + stat(run, "steps")) / stat(run, "steps"), 3)
            out["acceptance_rate"] = round(stat(run, "accepted") / max(stat(run, "drafted"), 1), 3)
        if not run.startswith("hf"):
            out["budget"] = "adaptive"
            if run not in ("ar", "ar_float32"):        # (ar is the reference itself)
                out["identical_to_ar"] = f"{same[run]}/{n_runs}"
        target = TARGETS.get((method, vs)) if run_dtype == dtype else None
        if target is not None:
            out["target"] = target
        return {**out, **extra, **common}

    rows = [row("ar", "hf_ar_float32", vs_dtype="float32"),
            row("ar", "hf_ar"),
            row("pld", "hf_pld_best", hf_pld_num_tokens=best_k),
            row("pld", "ar"),
            row("rest", "ar", datastore="gsm8k_train_answers", datastore_tokens=index.n_tokens)]
    for k in sweep:
        rows.append(row(f"hf_pld_{k}", "hf_ar", run=f"hf_pld_{k}"))
    if f32 is not fast:
        rows += [row("ar", "hf_ar_float32", run="ar_float32", run_dtype="float32"),
                 row("pld", "ar_float32", run="pld_float32", run_dtype="float32"),
                 row("ar", "ar_float32", run="ar", vs_dtype="float32")]
    for d, rel in cost.items():
        for n in sorted(rel):
            rows.append({"method": "verify_cost", "dtype": d, "draft_tokens": n,
                         "relative_cost": round(rel[n], 3), "ms": round(cost_ms[d][n] * 1e3, 2)})

    md = ["# Engine benchmark\n",
          f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
          f"transformers {machine['transformers']}. Embedded SmolLM2-135M-Instruct. "
          f"Fast dtype: {fast.dtype_choice.reason}.\n",
          f"First {len(prompts)} GSM8K test questions, greedy, max {args.max_new_tokens} new tokens, "
          f"{args.repeats} repeats; every run of a question in one process, the order rotating per question "
          "and repeat. Ratios: tokens/s, median over repeats [min, max]. Our methods run the default "
          "adaptive budget; identical = outputs equal to our `ar` in the same dtype.\n",
          "| method | dtype | vs | vs dtype | ratio [min, max] | target | tok/s | vs tok/s | MAT | identical |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "verify_cost":
            continue
        vs = r["vs"] + (f" (k={r['hf_pld_num_tokens']})" if "hf_pld_num_tokens" in r else "")
        tgt = f">= {r['target']}" + (" met" if r["ratio"] >= r["target"] else " missed") if "target" in r else ""
        md.append(f"| {r['method']} | {r['dtype']} | {vs} | {r['vs_dtype']} | {r['ratio']:.3f} "
                  f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] | {tgt} | {r['tokens_per_s']:.1f} | "
                  f"{r['vs_tokens_per_s']:.1f} | {r.get('mat', '')} | {r.get('identical_to_ar', '')} |")
    md += ["", "## Verify cost curve", "",
           "One verification forward with n draft tokens (chain, 256-token context) in decode steps of the "
           "same dtype, on our kernels (median of 7).", "",
           "| draft tokens | " + " | ".join(f"c(n) {d} | ms {d}" for d in cost) + " |",
           "|---|" + "---|---|" * len(cost)]
    for n in sorted(cost[dtype]):
        md.append(f"| {n} | " + " | ".join(f"{cost[d][n]:.2f} | {cost_ms[d][n] * 1e3:.1f}" for d in cost) + " |")
    path = write_results("engine", machine, rows, "\n".join(md) + "\n")
    print("\n".join(md))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
