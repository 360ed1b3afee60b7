"""Quality of soft-gated verification on GSM8K test: sense_soft against autoregressive greedy.

    python -m bench.soft_quality [--questions 200] [--id-questions 400] [--max-new-tokens 128]

The reference is the target's greedy answer (batched greedy generation: the engine's own
autoregressive output on its lean forward, up to float rounding elsewhere; decoding/batch_generate.py). sense_soft runs the
engine with the hybrid SENSE drafter over the ID datastore (the target's own answers to GSM8K
train questions, as in bench.sense) and the default soft gates. Reported with their spread over
questions: exact-answer accuracy of both (and the ratio, with a bootstrap interval), token
agreement and ROUGE-L against the reference, the target's mean log-probability per generated
token for both and their paired difference per question with a bootstrap interval (the measure
with statistical power: accuracy's base rate is a few percent here), MAT and speedup-free figures
of the soft run, and how often each gate fired, per mismatch and per 1,000 generated tokens.
Writes bench/results/soft_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import machine_info, write_results
from bench.quality import gsm8k_answer, mean_logprob, rouge_l, token_agreement
from bench.sense import build_stores, log, make, self_distilled
from decoding.batch_generate import generate_greedy_batched
from decoding.budget import AdaptiveBudget, SharedEstimates, draft_sizes
from decoding.config import SamplingParams
from decoding.cost import measure_verify_cost
from decoding.engine import encode_prompt, generate
from decoding.config import SoftGateConfig
from decoding.target import TargetModel
from index.corpus import gsm8k


def _spread(x) -> dict:
    x = np.asarray(x, dtype=float)
    return {"mean": round(float(x.mean()), 4), "std": round(float(x.std()), 4),
            "p25": round(float(np.percentile(x, 25)), 4), "p50": round(float(np.median(x)), 4),
            "p75": round(float(np.percentile(x, 75)), 4)}


def _ratio_interval(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float | None]:
    """95% bootstrap interval of mean(a) / mean(b), questions resampled jointly."""
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(a), len(a))
        if b[idx].mean() > 0:
            ratios.append(a[idx].mean() / b[idx].mean())
    if not ratios:
        return [None, None]
    return [round(float(np.percentile(ratios, 2.5)), 4), round(float(np.percentile(ratios, 97.5)), 4)]


def _mean_interval(d: np.ndarray, n_boot: int = 4000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of mean(d) (d: one paired difference per question)."""
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def gate_rates(gates: dict, new_tokens: int) -> dict:
    """How often each soft gate fired: per mismatch (a drafted token the target's argmax did not
    take, the cases the gates judge) and per 1,000 generated tokens."""
    mismatches = gates.get("mismatches", 0)
    return {k: {"per_mismatch": round(v / mismatches, 4) if mismatches else None,
                "per_1000_tokens": round(1000 * v / new_tokens, 2) if new_tokens else None}
            for k, v in gates.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--id-questions", type=int, default=400, help="GSM8K train questions of the ID store (as bench.sense)")
    ap.add_argument("--distill-max-tokens", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--workdir", default="bench/out")
    args = ap.parse_args(argv)
    from decoding.cli import _quiet_libraries

    _quiet_libraries()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    target = TargetModel.load()
    cost = measure_verify_cost(target, (1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
    own = self_distilled(target, [r["question"] for r in gsm8k("train")[: args.id_questions]],
                         args.distill_max_tokens, workdir)
    sparse, dense = build_stores(target, own, workdir, "id")
    soft_cfg = SoftGateConfig()
    params = SamplingParams(max_new_tokens=args.max_new_tokens)

    items = gsm8k("test")[: args.questions]
    prompts = [encode_prompt(target, q["question"]) for q in items]
    t0 = time.perf_counter()
    ref = generate_greedy_batched(target, prompts, args.max_new_tokens)
    log(f"reference (batched greedy): {len(ref)} answers in {time.perf_counter() - t0:.0f} s")

    acc_ar, acc_soft, agree, rouge, lp_ar, lp_soft, gates = [], [], [], [], [], [], {}
    steps = accepted = drafted = new_tokens = 0
    shared = SharedEstimates()      # earlier questions' estimates, as the default budget has them
    for i, (q, p, r) in enumerate(zip(items, prompts, ref)):
        budget = AdaptiveBudget(cost, sizes=draft_sizes(cost, soft_cfg), shared=shared)
        out = generate(target, p, params=params, drafter=make("sense_soft", sparse, dense), budget=budget,
                       soft=soft_cfg)
        gold = gsm8k_answer(q["answer"])
        acc_ar.append(gsm8k_answer(target.tokenizer.decode(r, skip_special_tokens=True)) == gold)
        acc_soft.append(gsm8k_answer(out.text) == gold)
        agree.append(token_agreement(out.token_ids, r))
        rouge.append(rouge_l(out.token_ids, r))
        lp_ar.append(mean_logprob(target, p, r))
        lp_soft.append(mean_logprob(target, p, out.token_ids))
        s = out.stats
        steps, accepted, drafted = steps + s.steps, accepted + s.accepted, drafted + s.drafted
        new_tokens += s.new_tokens
        for k, v in (s.soft_gates or {}).items():
            gates[k] = gates.get(k, 0) + v
        if i % 20 == 19:
            log(f"{i + 1}/{len(items)}: accuracy ar {np.mean(acc_ar):.3f} soft {np.mean(acc_soft):.3f}, "
                f"agreement {np.mean(agree):.3f}")

    a_ar, a_soft = np.array(acc_ar, float), np.array(acc_soft, float)
    ratio = float(a_soft.mean() / a_ar.mean()) if a_ar.mean() else None
    # paired per question: the target's own judgement of the soft output against its greedy one
    d_lp = np.array(lp_soft) - np.array(lp_ar)
    row = {"method": "sense_soft", "vs": "ar", "dataset": "gsm8k", "datastore": "id", "questions": len(items),
           "accuracy_ratio": round(ratio, 4) if ratio is not None else None,
           "accuracy_ratio_ci95": _ratio_interval(a_soft, a_ar),
           "accuracy": round(float(a_soft.mean()), 4), "vs_accuracy": round(float(a_ar.mean()), 4),
           "correct": int(a_soft.sum()), "vs_correct": int(a_ar.sum()),
           "both_correct": int((a_soft * a_ar).sum()),
           "token_agreement": _spread(agree), "rouge_l": _spread(rouge),
           "mean_logprob": _spread(lp_soft), "vs_mean_logprob": _spread(lp_ar),
           "mean_logprob_difference": round(float(d_lp.mean()), 4),
           "mean_logprob_difference_ci95": _mean_interval(d_lp),
           "mean_logprob_difference_share_below_zero": round(float((d_lp < 0).mean()), 4),
           "new_tokens": new_tokens, "soft_gate_rates": gate_rates(gates, new_tokens),
           "identical_outputs": int(sum(a == 1.0 for a in agree)),
           "mat": round((accepted + steps) / steps, 3) if steps else 0.0,
           "acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0, "soft_gates": gates,
           "gates": {"theta": soft_cfg.theta, "top_k": soft_cfg.top_k, "lam": soft_cfg.lam,
                     "window": soft_cfg.window, "tau": soft_cfg.tau}}
    machine = {**machine_info(), "dtype": str(target.dtype).removeprefix("torch.")}
    md = ["# Soft-gated verification: quality on GSM8K", "",
          f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine['dtype']}; embedded "
          f"SmolLM2-135M-Instruct, greedy, max {args.max_new_tokens} new tokens. {len(items)} GSM8K test questions; "
          f"sense_soft over the ID datastore ({args.id_questions} self-distilled train answers) with the default "
          f"gates (θ {soft_cfg.theta}, top-k {soft_cfg.top_k}, λ {soft_cfg.lam}, W {soft_cfg.window}, "
          f"τ {soft_cfg.tau}); reference: the target's greedy answers (batched greedy).", "",
          "| figure | sense_soft | ar (reference) |", "|---|---|---|",
          f"| exact-answer accuracy | {row['accuracy']:.4f} ({row['correct']}/{len(items)}) | "
          f"{row['vs_accuracy']:.4f} ({row['vs_correct']}/{len(items)}) |",
          f"| mean log-prob per token (mean ± std) | {row['mean_logprob']['mean']:.3f} ± "
          f"{row['mean_logprob']['std']:.3f} | {row['vs_mean_logprob']['mean']:.3f} ± "
          f"{row['vs_mean_logprob']['std']:.3f} |",
          f"| token agreement with ar (mean ± std) | {row['token_agreement']['mean']:.3f} ± "
          f"{row['token_agreement']['std']:.3f} | 1 |",
          f"| ROUGE-L with ar (mean ± std) | {row['rouge_l']['mean']:.3f} ± {row['rouge_l']['std']:.3f} | 1 |",
          f"| identical outputs | {row['identical_outputs']}/{len(items)} | |",
          f"| MAT / acceptance | {row['mat']} / {row['acceptance_rate']} | 1 / - |", "",
          f"Accuracy ratio sense_soft / ar: {row['accuracy_ratio']} (95% bootstrap interval "
          f"{row['accuracy_ratio_ci95']}); the target is 0.99. At a base rate of {row['vs_accuracy']:.1%} this "
          "interval is wide: the paired log-probability below is the measure with power.", "",
          f"**Mean log-prob per token, sense_soft minus ar, paired per question: {row['mean_logprob_difference']:+.4f} "
          f"(95% bootstrap interval {row['mean_logprob_difference_ci95']}; lower for soft on "
          f"{row['mean_logprob_difference_share_below_zero']:.0%} of questions).** The target scores its own greedy "
          "answer and the soft answer; a difference near 0 means the accepted mismatches are tokens the target "
          "itself found nearly as likely.", "",
          "How often each gate fired (a mismatch is a drafted token the target's argmax did not take; soft "
          "tokens are the mismatches accepted):", "",
          "| gate | count | per mismatch | per 1,000 generated tokens |", "|---|---|---|---|",
          *[f"| {k} | {gates[k]} | {v['per_mismatch']} | {v['per_1000_tokens']} |"
            for k, v in row["soft_gate_rates"].items()], ""]
    path = write_results("soft_quality", machine, [row], "\n".join(md),
                         extra={"args": vars(args), "per_question": {
                             "mean_logprob": [round(x, 5) for x in lp_soft], "vs_mean_logprob": [round(x, 5) for x in lp_ar],
                             "correct": [bool(x) for x in acc_soft], "vs_correct": [bool(x) for x in acc_ar]}})
    print("\n".join(md))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
