"""Engine benchmark: our decoding against transformers' generate(), side by side in one run.

    python -m bench.engine [--questions 50] [--max-new-tokens 128] [--repeats 2]

On the first N GSM8K test questions (greedy, chat template; the method order rotates per question):
  ar   (ours, no drafts)           vs hf_ar  (generate())
  pld  (ours, prompt lookup)       vs hf_pld (generate(prompt_lookup_num_tokens=10))
  rest (ours, REST over GSM8K train answers), reported as speedup over ar
plus the verify cost curve c(n) for both matmul paths. Writes bench/results/engine.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch

from bench.common import machine_info, median, method_order, write_results
from decoding.budget import measure_verify_cost, pick_budget, relative_cost
from decoding.cli import _quiet_libraries
from decoding.config import SamplingParams
from decoding.demo_stores import encode_text
from decoding.engine import encode_prompt, generate
from decoding.methods import Datastores, make_drafter
from decoding.model_loader import load_model_and_tokenizer
from decoding.target import TargetModel
from index.corpus import gsm8k, gsm8k_sparse_index

COST_SIZES = (1, 2, 3, 4, 8, 16, 32, 64)


def hf_generate(model, ids: list[int], max_new: int, **kwargs) -> tuple[list[int], float]:
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False, **kwargs)
    return out[0, len(ids):].tolist(), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rest-budget", type=int, default=None, help="default: the cost-curve budget")
    ap.add_argument("--pld-budget", type=int, default=None, help="default: the cost-curve budget")
    args = ap.parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    _quiet_libraries()
    target = TargetModel.load()
    hf_model, _ = load_model_and_tokenizer(None)          # a separate, unmodified copy for generate()
    machine = machine_info()

    # 1. Verify cost curve, both matmul paths, measured side by side.
    log("measuring the verify cost curve ...")
    plain = TargetModel(hf_model, target.tokenizer, cpu_kernels=False, invariant_forward=False)
    cost_fast = measure_verify_cost(target, COST_SIZES)
    cost_plain = measure_verify_cost(plain, COST_SIZES)
    rel_fast, rel_plain = relative_cost(cost_fast), relative_cost(cost_plain)
    budget = pick_budget(rel_fast)
    pld_budget = args.pld_budget or budget
    rest_budget = args.rest_budget or budget
    log(f"c(n) = {', '.join(f'{n}:{c:.2f}' for n, c in rel_fast.items())}; budget {budget}")

    # 2. REST datastore from GSM8K train answers.
    t0 = time.perf_counter()
    index = gsm8k_sparse_index(encode_text(target))
    log(f"REST datastore: {index.n_docs} answers, {index.n_tokens} tokens in {time.perf_counter() - t0:.1f} s")

    questions = gsm8k("test")[: args.questions]
    prompts = [encode_prompt(target, q["question"]) for q in questions]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    ours = {"ar": 1, "pld": pld_budget, "rest": rest_budget}       # our methods (decoding.methods), budgets
    stores = Datastores(sparse=index)
    hf = {"hf_ar": {}, "hf_pld": {"prompt_lookup_num_tokens": 10}}

    # per repeat, per method: tokens, seconds, steps, drafted, accepted
    totals = [defaultdict(lambda: defaultdict(float)) for _ in range(args.repeats)]
    per_q = defaultdict(list)       # (method) -> per-question tokens/s
    agree = defaultdict(int)
    for rep in range(args.repeats):
        for qi, ids in enumerate(prompts):
            reference = None
            # rotated per question and repeat, reversed every other one: who goes first alternates
            order = method_order(["hf_ar", "ar", "hf_pld", "pld", "rest"], qi + rep)
            outs = {}
            for m in order:
                if m in hf:
                    toks, dt = hf_generate(hf_model, ids, args.max_new_tokens, **hf[m])
                    rec = {"tokens": len(toks), "seconds": dt}
                else:
                    r = generate(target, ids, params=params, drafter=make_drafter(m, stores), budget=ours[m])
                    toks, s = r.token_ids, r.stats
                    rec = {"tokens": s.new_tokens, "seconds": s.time_total, "steps": s.steps,
                           "drafted": s.drafted, "accepted": s.accepted}
                outs[m] = toks
                for k, v in rec.items():
                    totals[rep][m][k] += v
                per_q[m].append(rec["tokens"] / rec["seconds"])
            reference = outs["hf_ar"]
            for m in ("ar", "pld", "rest", "hf_pld"):
                agree[m] += outs[m] == reference
            if qi % 10 == 9:
                log(f"repeat {rep + 1}/{args.repeats}: {qi + 1}/{len(prompts)} questions")

    def tps(rep, m):
        return totals[rep][m]["tokens"] / totals[rep][m]["seconds"]

    def med(fn):
        return median([fn(r) for r in range(args.repeats)])

    def stat(m, key):
        return sum(totals[r][m][key] for r in range(args.repeats))

    def mat(m):
        return (stat(m, "accepted") + stat(m, "steps")) / stat(m, "steps")

    def acc(m):
        return stat(m, "accepted") / max(stat(m, "drafted"), 1)

    n_runs = args.repeats * len(prompts)
    common = {"dataset": "gsm8k", "questions": len(prompts), "max_new_tokens": args.max_new_tokens,
              "repeats": args.repeats}
    rows = [
        {"method": "ar", "vs": "hf_ar", "ratio": round(med(lambda r: tps(r, "ar") / tps(r, "hf_ar")), 3),
         "tokens_per_s": round(med(lambda r: tps(r, "ar")), 2),
         "vs_tokens_per_s": round(med(lambda r: tps(r, "hf_ar")), 2),
         "same_output_as_hf": f"{agree['ar']}/{n_runs}", **common},
        {"method": "pld", "vs": "hf_pld", "ratio": round(med(lambda r: tps(r, "pld") / tps(r, "hf_pld")), 3),
         "tokens_per_s": round(med(lambda r: tps(r, "pld")), 2),
         "vs_tokens_per_s": round(med(lambda r: tps(r, "hf_pld")), 2), "mat": round(mat("pld"), 3),
         "acceptance_rate": round(acc("pld"), 3), "budget": pld_budget,
         "speedup_over_ar": round(med(lambda r: tps(r, "pld") / tps(r, "ar")), 3),
         "hf_pld_over_hf_ar": round(med(lambda r: tps(r, "hf_pld") / tps(r, "hf_ar")), 3),
         "same_output_as_hf": f"{agree['pld']}/{n_runs}", **common},
        {"method": "rest", "vs": "ar", "datastore": "gsm8k_train_answers",
         "speedup": round(med(lambda r: tps(r, "rest") / tps(r, "ar")), 3),
         "ratio": round(med(lambda r: tps(r, "rest") / tps(r, "ar")), 3),
         "mat": round(mat("rest"), 3), "acceptance_rate": round(acc("rest"), 3),
         "tokens_per_s": round(med(lambda r: tps(r, "rest")), 2), "budget": rest_budget,
         "datastore_tokens": index.n_tokens, "same_output_as_hf": f"{agree['rest']}/{n_runs}", **common},
    ]
    for n in sorted(rel_fast):
        rows.append({"method": "verify_cost", "draft_tokens": n, "relative_cost": round(rel_fast[n], 3),
                     "ms": round(cost_fast[n] * 1e3, 2), "kernels": "small_batch",
                     "relative_cost_default_kernels": round(rel_plain[n], 3),
                     "ms_default_kernels": round(cost_plain[n] * 1e3, 2)})

    md = ["# Engine benchmark\n",
          f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
          f"transformers {machine['transformers']}, float32 CPU. Embedded SmolLM2-135M-Instruct.\n",
          f"First {len(prompts)} GSM8K test questions, greedy, max {args.max_new_tokens} new tokens, "
          f"{args.repeats} repeats (the method order rotates per question; medians over repeats).\n",
          "| method | vs | ratio | tok/s | vs tok/s | MAT | acceptance | budget | same output as HF |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows[:3]:
        md.append(f"| {r['method']} | {r['vs']} | {r['ratio']:.3f} | {r['tokens_per_s']:.1f} | "
                  f"{r.get('vs_tokens_per_s', '')} | {r.get('mat', 1.0)} | {r.get('acceptance_rate', '')} | "
                  f"{r.get('budget', '')} | {r['same_output_as_hf']} |")
    md += ["", f"HF's PLD vs HF's autoregressive: {rows[1]['hf_pld_over_hf_ar']:.3f}x; "
           f"our PLD over our autoregressive: {rows[1]['speedup_over_ar']:.3f}x.", "",
           "## Verify cost curve", "",
           "Time of one verification forward with n draft tokens (chain, 256-token context), relative to one "
           "decode step. `small_batch` is our default CPU matmul path (decoding/cpu_kernels.py); `default` is "
           "PyTorch's F.linear as transformers uses it.", "",
           "| draft tokens | c(n) small_batch | ms | c(n) default | ms |", "|---|---|---|---|---|"]
    for r in rows[3:]:
        md.append(f"| {r['draft_tokens']} | {r['relative_cost']:.2f} | {r['ms']:.1f} | "
                  f"{r['relative_cost_default_kernels']:.2f} | {r['ms_default_kernels']:.1f} |")
    md += ["", f"Budget picked from the curve (largest n with c(n) <= 1.25): {budget}.", ""]
    path = write_results("engine", machine, rows, "\n".join(md) + "\n",
                         extra={"per_question_tokens_per_s_median": {m: round(median(v), 2)
                                                                     for m, v in per_q.items()}})
    print("\n".join(md))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
