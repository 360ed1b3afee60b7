"""Structured outputs benchmark: does speculation still pay when a grammar constrains the answer?

    python -m bench.structured [--questions 16] [--max-new-tokens 128] [--repeats 2] [--dense id]

GSM8K test questions asked for JSON: {"reasoning": the steps as a string, "answer": the number}
(a JSON schema, OpenAI's ``response_format: json_schema``; decoding/structured.py), and asked to
call ``submit_answer(answer, unit)`` under a required tool call's schema (serving/tools.py: the
name and keys are forced, so every method but ar drafts them). Methods ar,
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
# A tool call's schema (what serving/tools.py constrains a required call to): the name and the
# keys are forced, so they are drafted, every token landing.
CALL = {"type": "object", "properties": {
    "name": {"const": "submit_answer"},
    "arguments": {"type": "object", "properties": {"answer": {"type": "number"}, "unit": {"type": "string"}},
                  "required": ["answer", "unit"], "additionalProperties": False}},
    "required": ["name", "arguments"], "additionalProperties": False}
ASK_CALL = " Call the function submit_answer with the final number and its unit."


def valid(text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(value) == {"reasoning", "answer"} and isinstance(value["reasoning"], str) \
        and isinstance(value["answer"], (int, float)) and not isinstance(value["answer"], bool)


def valid_call(text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    if not isinstance(value, dict):
        return False
    args = value.get("arguments")
    return value.get("name") == "submit_answer" and isinstance(args, dict) and set(args) == {"answer", "unit"}


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
    grammars = {"text": None, "json": Grammar.json_schema(SCHEMA), "call": Grammar.json_schema(CALL)}
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    questions = [r["question"] for r in gsm8k("test")[: args.questions]]
    prompts = {fmt: [encode_prompt(target, q + (ASK_CALL if fmt == "call" else ASK)) for q in questions]
               for fmt in grammars}
    variants = [(m, fmt) for m in METHODS for fmt in grammars]
    generate(target, prompts["json"][0], params=SamplingParams(max_new_tokens=8), grammar=grammars["json"])  # warm-up

    # totals[repeat][(method, fmt)] -> tokens, seconds, steps, accepted
    totals = [defaultdict(lambda: defaultdict(float)) for _ in range(args.repeats)]
    same, ended, good, calls = defaultdict(int), 0, 0, 0
    i = 0
    for rep in range(args.repeats):
        for qi in range(len(questions)):
            outs = {}
            for m, fmt in method_order(variants, i):
                forget_prompts(target)
                r = generate(target, prompts[fmt][qi], params=params, drafter=make_drafter(m, stores),
                             grammar=grammars[fmt])
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
                calls += outs[("ar", "call")].finish_reason == "stop" and valid_call(outs[("ar", "call")].text)
            log(f"repeat {rep + 1}/{args.repeats}: {qi + 1}/{len(questions)}")

    reps = range(args.repeats)

    def tps(r, v):
        return totals[r][v]["tokens"] / totals[r][v]["seconds"]

    def total(v, k):
        return sum(totals[r][v][k] for r in reps)

    def mat(v):
        return round((total(v, "accepted") + total(v, "steps")) / total(v, "steps"), 3)

    def ms_step(v):
        return round(1e3 * total(v, "seconds") / total(v, "steps"), 2)

    n = args.repeats * len(questions)
    rows = []
    for (m, fmt), vs in ((("pld", "call"), ("ar", "call")), (("sense", "call"), ("ar", "call")),
                         (("pld", "json"), ("ar", "json")), (("sense", "json"), ("ar", "json")),
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
                     "budget": "adaptive", "questions": len(questions), "max_new_tokens": args.max_new_tokens,
                     "repeats": args.repeats, "datastore": store})

    md = ["# Structured outputs benchmark (`python -m bench.structured`)\n",
          f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}; embedded "
          f"SmolLM2-135M-Instruct, {target.dtype_choice.reason}. SENSE's dense store: {store}.\n",
          f"First {len(questions)} GSM8K test questions asking for JSON `{{\"reasoning\": string, \"answer\": number}}`, "
          f"*json*: under that JSON schema (`response_format: json_schema`), *text*: unconstrained; *call*: asking "
          "for a call of `submit_answer(answer: number, unit: string)`, under a required tool call's schema "
          "(serving/tools.py: the name and keys forced, so drafted); greedy, max "
          f"{args.max_new_tokens} new tokens, adaptive budget, {args.repeats} repeats, the order rotating per question "
          "and repeat. Ratios: tokens/s, median over repeats [min, max]. Identical: answers equal to `ar`'s under "
          "the same constraint. ms/step: a decode step's time, the grammar's masks in it.\n",
          f"Constrained `ar` answers that ended (the JSON complete) within the token limit: {ended}/{len(questions)}, "
          f"of them valid JSON of the schema: {good}/{ended}; calls complete and valid: {calls}/{len(questions)}.\n",
          "| method | answers | vs | ratio [min, max] | tok/s | vs tok/s | MAT | vs MAT | ms/step | vs ms/step | identical |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['method']} | {r['dataset'].removeprefix('gsm8k_')} | {r['vs']} | {r['ratio']:.3f} "
                  f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] | {r['tokens_per_s']} | {r['vs_tokens_per_s']} | "
                  f"{r['mat']} | {r['vs_mat']} | {r['ms_per_step']} | {r['vs_ms_per_step']} | {r['identical'] or ''} |")
    path = write_results("structured", machine, rows, "\n".join(md) + "\n",
                         {"json_answers_ended": ended, "json_answers_valid": good, "calls_valid": calls,
                          "schema": SCHEMA, "call_schema": CALL})
    print("\n".join(md))
    log(f"wrote {path}")
    bad = [m for m, fmt in variants if same[(m, fmt)] != n]
    if bad:
        log(f"FAIL: answers differ from ar's under the same constraint: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
