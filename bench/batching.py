"""Continuous batching in the engine: aggregate throughput by concurrency, in one process.

    python -m bench.batching                  # writes bench/results/batching.{json,md}
    python -m bench.batching --quick          # smoke run: prints, writes nothing

For each concurrency c (c GSM8K test questions decoded at once, greedy, every answer
``--max-new-tokens`` long: EOS ignored, so every variant produces the same token count) and each
method, side by side in one run, order rotated per repeat:

- ``serialized``: the requests one after another through ``generate`` (what a decoder that runs
  one forward at a time achieves, whatever the concurrency);
- ``batched``: all c requests in one ``BatchScheduler`` (one verification forward per step for
  all of them, budgets allocated across the batch);
- ``hf_static_batch``: transformers' ``generate()`` on the c prompts left-padded into one batch,
  same model, dtype and kernels (plain decoding; the peer a serving system is judged against);
- ``steady``: ``--rounds`` x c questions through one ``BatchScheduler`` with c in flight, a new
  request joining as one ends (a server's steady state: the static batch of c ends with its
  slowest request, so what the others gain by drafting counts only when all of them gain; here a
  request that ends early makes room for the next), every method's scheduler stepped in turn in
  one loop, each step timed on its method's clock (``run_steady_together``). Its tokens/s count
  the tokens and seconds from when the first c are all prefilled until the first request ends
  with no question left to join (the opening prefills, the same work for every method,
  excluded): the drain after it runs at ever lower concurrency, at once for answers in lockstep
  (`ar`), over a tail for answers that drifted apart (speculation); the ratio with the drain is
  reported beside it.

Every batched output must equal the serialized one token for token, and every steady one `ar`'s
(the run fails otherwise). Rows: ``{"method": m, "concurrency": c, "vs": "serialized" |
"hf_static_batch" | "ar_batched" | "ar_steady", "ratio": batched (steady) tokens/s over the
peer's, "tokens_per_s": ...}``; medians over repeats with min/max. A method's batched runs share
one drafting gate (``decoding.gate``) across levels and repeats, and its steady runs another, as
a server's decoder keeps its one for its life.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.common import DENSE_CHOICES_HELP, forget_prompts, machine_info, median, method_order, write_results

# torch and the model are imported inside main(), after the libraries are quieted.


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def run_serialized(target, prompts, make, params) -> tuple[float, list[list[int]]]:
    from decoding.engine import generate

    forget_prompts(target)
    t0 = time.perf_counter()
    outs = [generate(target, p, params=params, drafter=make()).token_ids for p in prompts]
    return time.perf_counter() - t0, outs


def _scheduler(target, concurrency: int, gate):
    """A batch scheduler; with `gate` (a ``DraftingGate``), that one: a server's decoder keeps one
    scheduler, and what its gate measured, for its life, so a benchmark's runs of a method share
    one rather than each measuring every load afresh."""
    from decoding.scheduler import BatchScheduler

    sched = BatchScheduler(target, max_batch=concurrency)
    if gate is not None:
        sched.gate = gate
    return sched


def run_steady(target, prompts, make, params, concurrency: int, gate=None) -> tuple[float, list[list[int]], dict]:
    """`prompts` through one scheduler with `concurrency` requests in flight, the next request
    added as one ends: (seconds, outputs in prompt order, the scheduler's stats with
    ``in_flight_tokens`` and ``in_flight_seconds``: the tokens and seconds from when the first c
    requests had all been prefilled until the first request ended with no prompt left to take its
    place, the opening prefills and the drain excluded). `gate`: see ``_scheduler``."""
    return run_steady_together(target, prompts, {"": make}, params, concurrency, gates={"": gate})[""]


def run_steady_together(target, prompts, makes: dict, params, concurrency: int, rotate: int = 0,
                        gates: dict | None = None) -> dict[str, tuple[float, list[list[int]], dict]]:
    """``run_steady`` for every method of `makes` (name -> a fresh drafter per request) at once:
    one scheduler each, stepped in turn, the order rotated every round, each method's steps (and
    the requests it adds) timed on its own clock. The VM's drift, 10-30% over minutes, then falls
    on every method alike, where runs one after another each met their own (in process, 8 in
    flight: repeats of a ratio agree within 1-2% this way, 10-30% run after run). The target's
    prefix cache is off meanwhile: one method's prefill would find another's prompt kept (one
    method alone runs with it, emptied first). Returns per method what ``run_steady`` returns, its
    seconds the sum of its steps'. `gates`: method -> its ``DraftingGate`` (see ``_scheduler``)."""
    from decoding.engine import Sequence

    cache = getattr(target, "prefix_cache", None)
    if len(makes) == 1:
        forget_prompts(target)
    else:
        target.prefix_cache = None
    runs = {}
    try:
        for m, make in makes.items():
            t0 = time.perf_counter()
            sched = _scheduler(target, concurrency, (gates or {}).get(m))
            seqs = [Sequence(target, p, params=params, drafter=make()) for p in prompts[:concurrency]]
            for s in seqs:
                sched.add(s)
            runs[m] = {"sched": sched, "seqs": seqs, "make": make, "seconds": time.perf_counter() - t0,
                       "opened": None, "window": None}
        names, turn = list(makes), rotate
        while any(not r["sched"].idle for r in runs.values()):
            for m in names[turn % len(names):] + names[:turn % len(names)]:
                r = runs[m]
                sched, seqs = r["sched"], r["seqs"]
                if sched.idle:
                    continue
                t0 = time.perf_counter()
                finished = sched.step()
                for _ in finished:
                    if len(seqs) < len(prompts):
                        seqs.append(Sequence(target, prompts[len(seqs)], params=params, drafter=r["make"]()))
                        sched.add(seqs[-1])
                    elif r["window"] is None:
                        r["window"] = (sum(len(s.generated) for s in seqs), r["seconds"] + time.perf_counter() - t0)
                r["seconds"] += time.perf_counter() - t0
                if r["opened"] is None and all(s.generated for s in seqs[:concurrency]):
                    r["opened"] = (sum(len(s.generated) for s in seqs), r["seconds"])
            turn += 1
    finally:
        target.prefix_cache = cache
    out = {}
    for m, r in runs.items():
        seqs, dt = r["seqs"], r["seconds"]
        window = r["window"] or (sum(len(s.generated) for s in seqs), dt)
        opened = r["opened"] if r["opened"] is not None and r["opened"][1] < window[1] else (0, 0.0)
        out[m] = (dt, [s.result().token_ids for s in seqs],
                  {**r["sched"].stats(), "in_flight_tokens": window[0] - opened[0],
                   "in_flight_seconds": window[1] - opened[1]})
    return out


def run_batched(target, prompts, make, params, gate=None) -> tuple[float, list[list[int]], dict]:
    """All `prompts` at once in one scheduler (a static batch): ``run_steady`` with every one in flight."""
    return run_steady(target, prompts, make, params, len(prompts), gate)


def run_hf_static(target, prompts, max_new: int) -> float:
    import torch

    width = max(len(p) for p in prompts)
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        target.model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                              do_sample=False, pad_token_id=pad)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    from decoding.cli import _quiet_libraries

    _quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: concurrency 1,4, 16 tokens; writes nothing")
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--methods", default="ar,pld,sense")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4, help="steady state: requests per slot (rounds x c questions)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--dense-docs", type=int, default=200, help="default dense store size (GSM8K train pairs)")
    ap.add_argument("--dense", default=None, help=DENSE_CHOICES_HELP + " (--quick: 'default')")
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.max_new_tokens, args.repeats, args.rounds = "1,4", 16, 1, 2

    import torch

    from bench.sense import dense_source
    from decoding.config import SamplingParams
    from decoding.cost import batch_cost, cost_curve
    from decoding.engine import encode_prompt
    from decoding.methods import check_method, make_drafter
    from decoding.stores import load_datastores
    from decoding.target import TargetModel
    from index.corpus import gsm8k

    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    methods = [check_method(m) for m in args.methods.split(",")]
    target = TargetModel.load(dtype=args.dtype)
    log(f"target: {target.dtype_choice.reason}; lean forward {target.lean_note}; kernels {target.kernels}")
    args.dense_source, args.store = dense_source(target, args.dense, args.quick)
    stores = load_datastores(target, methods=methods, dense=args.dense_source,
                             dense_default_docs=args.dense_docs)
    questions = [r["question"] for r in gsm8k("test")[:max(levels) * args.rounds]]
    prompts = [encode_prompt(target, q) for q in questions]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    # Warm-up: the kernels, the allocator, and both cost models (measured once per machine and
    # kernel build, then remembered): outside the timed runs, as a server measures them at start.
    run_serialized(target, prompts[:1], lambda: make_drafter("pld", stores), params)
    cost_curve(target)
    batch_cost(target)

    from decoding.gate import DraftingGate

    gates = {(m, kind): DraftingGate() for m in methods for kind in ("batched", "steady")}
    times: dict[tuple, list[float]] = {}
    rows_per_forward: dict[tuple, list[float]] = {}
    in_flight: dict[tuple, list[float]] = {}        # steady tokens/s while c were in flight
    for c in levels:
        batch = prompts[:c]
        variants = ([(m, kind) for m in methods for kind in ("serialized", "batched")]
                    + [("ar", "hf_static_batch"), ("all", "steady")])
        for rep in range(args.repeats):
            for m, kind in method_order(variants, rep + c):
                make = lambda m=m: make_drafter(m, stores)      # noqa: E731  a fresh drafter per request
                if kind == "serialized":
                    dt, outs = run_serialized(target, batch, make, params)
                    times.setdefault((m, kind, c), []).append(dt)
                    times.setdefault((m, "outputs", c), outs)
                elif kind == "batched":
                    dt, outs, st = run_batched(target, batch, make, params, gates[(m, kind)])
                    times.setdefault((m, kind, c), []).append(dt)
                    rows_per_forward.setdefault((m, c), []).append(st["rows_per_forward"] or 0)
                    times.setdefault((m, "batched_outputs", c), outs)
                elif kind == "steady":          # every method at once, stepped in turn
                    makes = {m: (lambda m=m: make_drafter(m, stores)) for m in methods}
                    together = run_steady_together(target, prompts[:c * args.rounds], makes, params, c, rep + c,
                                                   {m: gates[(m, kind)] for m in methods})
                    for m, (dt, outs, st) in together.items():
                        times.setdefault((m, kind, c), []).append(dt)
                        in_flight.setdefault((m, c), []).append(st["in_flight_tokens"] / st["in_flight_seconds"])
                        rows_per_forward.setdefault((m, "steady", c), []).append(st["rows_per_forward"] or 0)
                        times.setdefault((m, "steady_outputs", c), outs)
                        log(f"c={c} rep={rep} {m:6} {kind:16} {dt:7.2f} s")
                    continue
                else:
                    times.setdefault((m, kind, c), []).append(run_hf_static(target, batch, args.max_new_tokens))
                log(f"c={c} rep={rep} {m:6} {kind:16} {times[(m, kind, c)][-1]:7.2f} s")
        for m in methods:
            if times[(m, "batched_outputs", c)] != times[(m, "outputs", c)]:
                log(f"FAIL: {m} at concurrency {c}: batched output differs from the requests decoded alone")
                return 1
            if "ar" in methods and times[(m, "steady_outputs", c)] != times[("ar", "steady_outputs", c)]:
                log(f"FAIL: {m} at concurrency {c}: a steady-state output differs from ar's")
                return 1

    tokens = {c: c * args.max_new_tokens for c in levels}
    rate = {k: [tokens[k[2]] * (args.rounds if k[1] == "steady" else 1) / t for t in v] for k, v in times.items()
            if k[1] in ("serialized", "batched", "steady", "hf_static_batch")}
    out_rows = []
    for c in levels:
        for m in methods:
            mine = rate[(m, "batched", c)]
            peers = {"serialized": rate[(m, "serialized", c)], "hf_static_batch": rate[("ar", "hf_static_batch", c)],
                     "ar_batched": rate[("ar", "batched", c)]}
            for vs, theirs in peers.items():
                if vs == "ar_batched" and m == "ar":
                    continue
                ratios = [a / b for a, b in zip(mine, theirs)]
                out_rows.append({"benchmark": "batching", "method": m, "concurrency": c, "vs": vs,
                                 "ratio": round(median(ratios), 3), "ratio_min": round(min(ratios), 3),
                                 "ratio_max": round(max(ratios), 3), "tokens_per_s": round(median(mine), 2),
                                 "peer_tokens_per_s": round(median(theirs), 2),
                                 "rows_per_forward": round(median(rows_per_forward[(m, c)]), 2),
                                 "identical": True})
            if m != "ar" and "ar" in methods:
                # While c were in flight (run_steady); the whole run's, drain included, beside it.
                mine, theirs = in_flight[(m, c)], in_flight[("ar", c)]
                ratios = [a / b for a, b in zip(mine, theirs)]
                drained = [a / b for a, b in zip(rate[(m, "steady", c)], rate[("ar", "steady", c)])]
                out_rows.append({"benchmark": "batching", "method": m, "concurrency": c, "vs": "ar_steady",
                                 "ratio": round(median(ratios), 3), "ratio_min": round(min(ratios), 3),
                                 "ratio_max": round(max(ratios), 3), "ratio_whole_run": round(median(drained), 3),
                                 "tokens_per_s": round(median(mine), 2),
                                 "peer_tokens_per_s": round(median(theirs), 2), "requests": c * args.rounds,
                                 "rows_per_forward": round(median(rows_per_forward[(m, "steady", c)]), 2),
                                 "identical": True})
    md = ["# Continuous batching in the engine (`python -m bench.batching`)", "",
          f"Target: {target.dtype_choice.reason}; {args.max_new_tokens} tokens per request (EOS ignored), greedy, "
          f"GSM8K test questions; SENSE drafts from {args.store}; median of {args.repeats} repeats (order rotated). Batched outputs equal the "
          f"requests decoded alone, token for token, at every concurrency. Batched: the c questions at once (a static batch, "
          f"over when its slowest request is); steady: {args.rounds} x c questions with c in flight, the next joining as one "
          f"ends (a server's steady state), every output equal to ar's, every method's scheduler stepped in turn in one "
          f"loop (the order rotated, each step timed on its method's clock; prefix cache off); its tokens/s are counted while c were in flight "
          f"(from when the first c are prefilled until the first request ends with no question left), the whole run "
          f"with the drain after it in the last column.", "",
          "| method | concurrency | batched tok/s | vs serialized | vs HF static batch | vs ar batched | rows/forward "
          "| steady tok/s | vs ar steady | rows/forward | vs ar steady, whole run |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in levels:
        for m in methods:
            r = {row["vs"]: row for row in out_rows if row["method"] == m and row["concurrency"] == c}
            arb = f"{r['ar_batched']['ratio']:.2f}x" if "ar_batched" in r else "-"
            steady = (f"{r['ar_steady']['tokens_per_s']:.1f} | {r['ar_steady']['ratio']:.2f}x "
                      f"[{r['ar_steady']['ratio_min']:.2f}, {r['ar_steady']['ratio_max']:.2f}] | "
                      f"{r['ar_steady']['rows_per_forward']:.1f} | {r['ar_steady']['ratio_whole_run']:.2f}x"
                      if "ar_steady" in r else
                      f"{median(in_flight[(m, c)]):.1f} | - | {median(rows_per_forward[(m, 'steady', c)]):.1f} | -")
            md.append(f"| {m} | {c} | {r['serialized']['tokens_per_s']:.1f} | {r['serialized']['ratio']:.2f}x | "
                      f"{r['hf_static_batch']['ratio']:.2f}x | {arb} | {r['serialized']['rows_per_forward']:.1f} | "
                      f"{steady} |")
    text = "\n".join(md) + "\n"
    print(text)
    if not args.quick:
        write_results("batching", machine_info() | {"dtype": str(target.dtype).removeprefix("torch.")}, out_rows, text,
                      extra={"args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
