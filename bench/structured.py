"""Structured outputs benchmark: does speculation still pay when a grammar constrains the answer?

    python -m bench.structured [--questions 16] [--max-new-tokens 128] [--repeats 2] [--dense id]

GSM8K test questions asked for JSON: {"reasoning": the steps as a string, "answer": the number}
(a JSON schema, OpenAI's ``response_format: json_schema``; decoding/structured.py). Methods ar,
pld and sense (the dense store ``--dense``: by default the GSM8K ID store, the model's own answers
to 400 train questions), each with the default adaptive budget in the dtype ``auto`` picks, each
unconstrained and under the schema; the order rotates per question and repeat. Every constrained
answer must equal constrained ``ar``'s token for token (strict verification; counted), and the
constrained answers that ended are checked as JSON of the schema. Rows: tokens/s ratios (median
over repeats [min, max]) of each constrained method against constrained ``ar`` and against the
same method unconstrained; MAT; ms per decode step (the grammar's mask and its walk of each tree
are in the step). Writes bench/results/structured.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from bench.common import DENSE_CHOICES_HELP, fast_target, forget_prompts, median, method_order, write_results

METHODS = ("ar", "pld", "sense")
SCHEMA = {"type": "object",
          "properties": {"reasoning": {"type": "string"}, "answer": {"type": "number"}},
          "required": ["reasoning", "answer"], "additionalProperties": False}
ASK = (' Answer in JSON: {"reasoning": your step-by-step reasoning as one string, '
       '"answer": the final number}.')


def valid(text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(value) == {"reasoning", "answer"} and isinstance(value["reasoning"], str) \
        and isinstance(value["answer"], (int, float)) and not isinstance(value["answer"], bool)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dense", default=None, help=DENSE_CHOICES_HELP)
    args = ap.parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    target, dtype, machine = fast_target()
    from bench.sense import dense_source
    from decoding.config import SamplingParams
    from decoding.engine import encode_prompt, generate
    from decoding.methods import make_drafter
    from decoding.stores import load_datastores
    from decoding.structured import Grammar
    from index.corpus import gsm8k

    source, store = dense_source(target, args.dense)
    stores = load_datastores(target, methods=list(METHODS), dense=source)
    grammar = Grammar.json_schema(SCHEMA)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    prompts = [encode_prompt(target, r["question"] + ASK) for r in gsm8k("test")[: args.questions]]
    variants = [(m, fmt) for m in METHODS for fmt in ("text", "json")]
    generate(target, prompts[0], params=SamplingParams(max_new_tokens=8), grammar=grammar)     # warm-up

    # totals[repeat][(method, fmt)] -> tokens, seconds, steps, accepted
    totals = [defaultdict(lambda: defaultdict(float)) for _ in range(args.repeats)]
    same, ended, good = defaultdict(int), 0, 0
    i = 0
    for rep in range(args.repeats):
        for qi, ids in enumerate(prompts):
            outs = {}
            for m, fmt in method_order(variants, i):
                forget_prompts(target)
                r = generate(target, ids, params=params, drafter=make_drafter(m, stores),
                             grammar=grammar if fmt == "json" else None)
                s = r.stats
                for k, v in (("tokens", s.new_tokens), ("seconds", s.time_total), ("steps", s.steps),
                             ("accepted", s.accepted)):
                    totals[rep][(m, fmt)][k] += v
                outs[(m, fmt)] = r
            i += 1
            for m, fmt in variants:
                same[(m, fmt)] += outs[(m, fmt)].token_ids == outs[("ar", fmt)].token_ids
            if rep == 0:
                ref = outs[("ar", "json")]
                ended += ref.finish_reason == "stop"
                good += ref.finish_reason == "stop" and valid(ref.text)
            log(f"repeat {rep + 1}/{args.repeats}: {qi + 1}/{len(prompts)}")

    reps = range(args.repeats)

    def tps(r, v):
        return totals[r][v]["tokens"] / totals[r][v]["seconds"]

    def total(v, k):
        return sum(totals[r][v][k] for r in reps)

    def mat(v):
        return round((total(v, "accepted") + total(v, "steps")) / total(v, "steps"), 3)

    def ms_step(v):
        return round(1e3 * total(v, "seconds") / total(v, "steps"), 2)

    n = args.repeats * len(prompts)
    rows = []
    for (m, fmt), vs in ((("pld", "json"), ("ar", "json")), (("sense", "json"), ("ar", "json")),
                         (("pld", "text"), ("ar", "text")), (("sense", "text"), ("ar", "text")),
                         (("ar", "json"), ("ar", "text")), (("pld", "json"), ("pld", "text")),
                         (("sense", "json"), ("sense", "text"))):
        ratios = [tps(r, (m, fmt)) / tps(r, vs) for r in reps]
        rows.append({"method": m, "dataset": f"gsm8k_{fmt}", "vs": vs[0] if vs[1] == fmt else f"{vs[0]}_{vs[1]}",
                     "dtype": dtype, "ratio": round(median(ratios), 3), "ratio_min": round(min(ratios), 3),
                     "ratio_max": round(max(ratios), 3), "tokens_per_s": round(median([tps(r, (m, fmt)) for r in reps]), 1),
                     "vs_tokens_per_s": round(median([tps(r, vs) for r in reps]), 1),
                     "mat": mat((m, fmt)), "vs_mat": mat(vs), "ms_per_step": ms_step((m, fmt)),
                     "vs_ms_per_step": ms_step(vs), "identical": f"{same[(m, fmt)]}/{n}" if vs[1] == fmt else None,
                     "budget": "adaptive", "questions": len(prompts), "max_new_tokens": args.max_new_tokens,
                     "repeats": args.repeats, "datastore": store})

    md = ["# Structured outputs benchmark (`python -m bench.structured`)\n",
          f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}; embedded "
          f"SmolLM2-135M-Instruct, {target.dtype_choice.reason}. SENSE's dense store: {store}.\n",
          f"First {len(prompts)} GSM8K test questions asking for JSON `{{\"reasoning\": string, \"answer\": number}}`, "
          f"*json*: under that JSON schema (`response_format: json_schema`), *text*: unconstrained; greedy, max "
          f"{args.max_new_tokens} new tokens, adaptive budget, {args.repeats} repeats, the order rotating per question "
          "and repeat. Ratios: tokens/s, median over repeats [min, max]. Identical: answers equal to `ar`'s under "
          "the same constraint. ms/step: a decode step's time, the grammar's masks in it.\n",
          f"Constrained `ar` answers that ended (the JSON complete) within the token limit: {ended}/{len(prompts)}, "
          f"of them valid JSON of the schema: {good}/{ended}.\n",
          "| method | answers | vs | ratio [min, max] | tok/s | vs tok/s | MAT | vs MAT | ms/step | vs ms/step | identical |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['method']} | {r['dataset'].removeprefix('gsm8k_')} | {r['vs']} | {r['ratio']:.3f} "
                  f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] | {r['tokens_per_s']} | {r['vs_tokens_per_s']} | "
                  f"{r['mat']} | {r['vs_mat']} | {r['ms_per_step']} | {r['vs_ms_per_step']} | {r['identical'] or ''} |")
    path = write_results("structured", machine, rows, "\n".join(md) + "\n",
                         {"json_answers_ended": ended, "json_answers_valid": good, "schema": SCHEMA})
    print("\n".join(md))
    log(f"wrote {path}")
    bad = [m for m, fmt in variants if same[(m, fmt)] != n]
    if bad:
        log(f"FAIL: answers differ from ar's under the same constraint: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
