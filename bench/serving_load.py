"""Served throughput and latency under load: continuous batching against the serialized decoder
and transformers' static batch, over HTTP with the ``openai`` client.

    python -m bench.serving_load              # writes bench/results/serving_load.{json,md}
    python -m bench.serving_load --quick      # smoke run (concurrency 1 and 4, 16 tokens): prints only

One local Ray instance started as ``serving.run`` starts it, two apps deployed side by side with
the same settings but one: ``decoder.batching`` true (``/b``, the default: every running
request's draft tree verified in one forward per step) and false (``/s``, today's serialized
decoder: one forward at a time per replica). The decoder keeps its default limits (at most
``decoder.max_ongoing_requests`` requests in a batch, ``decoder.queued_in_replica`` more waiting in
the replica's own queue, the rest at the caller; time to first token includes the wait), one
replica, the default dtype (auto).

For each number of requests in flight c (closed loop: c clients, each sending its next request
when the last one ended; ``max(--rounds x c, --min-requests)`` distinct GSM8K test questions per level,
streamed chat completions of exactly ``--max-tokens`` tokens, EOS ignored, greedy) and each
method (``ar``, strict ``sense``), order rotated per level and repeat:

- served, batched and serialized: aggregate tokens/s, p50/p99 latency, p50/p99 time to first token;
- ``hf_static_batch``: ``transformers`` ``generate()`` on the same prompts, left-padded into
  batches of c, in this process, same model, dtype and kernels (plain decoding);
- ``engine``: at c = 1, ``decoding.engine.generate`` in this process against the batched app,
  question by question in turns (engine first, then served first, ...: this VM's speed drifts by
  10-15% over minutes, and a served run minutes from its engine run would measure the drift),
  the same questions; the ratio is the served over the engine tokens/s of the pass (the sum of
  the requests' latencies).

Time to first token at 16 in flight against 1, steady state: a pass of its own at 16 in flight
(``STAGGER_ROUNDS`` requests per client, SENSE, batched) with the clients staggered over an answer's
time (``closed_loop``'s `stagger`), each client's first request not counted. In the table's runs
the clients start at once and their answers, all of one length, end together: their later
requests still arrive in waves of 16 (reported beside it, and the opening burst too).

Each served run, and each served request of the engine comparison, starts with the decoder's
prefix cache emptied (``serving.app.reset_prefix_caches``; the in-process engine's likewise):
within a run the requests share the chat template as distinct users' requests do, and no run
finds another's whole prompt kept.

Every served answer must equal, token for token, the same question decoded alone by the engine
with ``ar`` (strict decoding is exact whatever the batch): the run fails otherwise.

After each level the batched decoder's drafting gate (``/health``: its verdict per load) is
recorded beside the rows, so a level's SENSE figure can be read against what the gate had
measured by then (one gate for the whole run: a load's first runs pay its learning).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from bench.batching import run_hf_static, run_serialized
from bench.common import DENSE_CHOICES_HELP, machine_info, median, method_order, write_results
from bench.serving import deploy, questions
from support.load import pct
from support.net import free_port

VARIANTS = ("batched", "serialized")
# Requests per client of the staggered TTFT pass at 16 in flight: its p99 is over the requests
# after each client's first, 16 x (STAGGER_ROUNDS - 1) a repeat (with 3, 32: the p99 was their
# largest, and runs of one code read 2.4-5.3x).
STAGGER_ROUNDS = 8
STORE_BEFORE = "the default store (200 human-written GSM8K train answers)"   # runs before --dense


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def stream_one(client, model: str, prompt: str, method: str, max_tokens: int, on_tokens=None) -> dict:
    """One streamed chat completion through the openai client: token ids, TTFT, latency, and
    each chunk's (arrival time, tokens); `on_tokens(n)`: told the tokens received so far at every
    chunk."""
    t0 = time.perf_counter()
    first = None
    ids: list[int] = []
    chunks: list[tuple[float, int]] = []
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, extra_body={"ignore_eos": True,
                                 "speculative": {"method": method, "return_token_ids": True}})
    for chunk in stream:
        for choice in chunk.choices:
            new = (choice.model_extra or {}).get("token_ids") or []
            if new and first is None:
                first = time.perf_counter()
            ids += new
            if new:
                chunks.append((time.perf_counter(), len(new)))
            if new and on_tokens is not None:
                on_tokens(len(ids))
    end = time.perf_counter()
    return {"ids": ids, "ttft": (first or end) - t0, "latency": end - t0, "chunks": chunks}


def closed_loop(base_url: str, prompts: list[str], method: str, max_tokens: int, concurrency: int,
                stagger: bool = False, slots: int | None = None) -> dict:
    """`concurrency` clients share the prompts, each sending its next request when its last ends.
    All start at once (a burst of c), or with `stagger` one after another: client k sends its first
    request once the first client's first answer has k / c of its tokens. Answers of one length
    that start together end together, so the clients of a burst go on in waves (c requests
    arriving at once, again and again); staggered, their requests arrive spread over an answer's
    time, c in flight, as independent users' do.

    Tokens/s count the tokens streamed while c requests were in flight and decoding
    (``tokens_per_s``): from the first token of the last client's first answer (the opening
    burst's prefills done; with `slots`, the server's batch limit, below c: of the slots-th, the
    others queued) until the first client finds no prompt left. Before it the c prompts
    of the opening burst are prefilled one after another, the same work for every method, which
    would weigh more in a shorter run; after it the run drains, fewer and fewer requests in
    flight, and requests of one length that went in lockstep (`ar`: waves) drain at once while
    requests that drifted apart (speculation: each commits its own number of tokens a step)
    drain over several answers' tail at lower concurrency. The whole run's figure, the opening
    and the drain included, is ``tokens_per_s_all``."""
    from openai import OpenAI

    results: dict[int, dict] = {}
    lock = threading.Lock()
    todo = iter(range(len(prompts)))
    errors: list[BaseException] = []
    lead = threading.Condition()
    lead_tokens = [0]                       # of the first client's first answer (stagger)
    drained: list[float | None] = [None]    # when the first client found no prompt left

    def led(n: int) -> None:
        with lead:
            lead_tokens[0] = n
            lead.notify_all()

    model = OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0).models.list().data[0].id

    def client_loop(k: int):
        client = OpenAI(base_url=base_url + "/v1", api_key="none", timeout=900, max_retries=0)
        first = True
        if stagger and k:
            with lead:
                lead.wait_for(lambda: lead_tokens[0] >= k * max_tokens / concurrency or errors, timeout=900)
        while True:
            with lock:
                i = next(todo, None)
                if i is None and drained[0] is None:
                    drained[0] = time.perf_counter()
            if i is None:
                if stagger and not k:
                    led(max_tokens)             # no answer to lead with: release the others
                return
            try:
                res = stream_one(client, model, prompts[i], method, max_tokens,
                                 on_tokens=led if stagger and first and not k else None)
            except BaseException as exc:          # reported after the join
                errors.append(exc)
                led(max_tokens)
                return
            if stagger and first and not k:
                led(max_tokens)                 # an answer cut short releases the rest
            res["first"], first = first, False
            with lock:
                results[i] = res

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{method} at concurrency {concurrency}: {errors[0]!r}")
    recs = [results[i] for i in range(len(prompts))]
    tokens = sum(len(r["ids"]) for r in recs)
    end = drained[0] or t0 + wall
    firsts = sorted(r["chunks"][0][0] for r in recs if r["first"] and r["chunks"])
    start = firsts[min(len(firsts), slots or len(firsts)) - 1] if firsts else t0
    chunks = [r["chunks"] for r in recs]
    steady = ((tokens_before(chunks, end) - tokens_before(chunks, start)) / (end - start) if end > start
              else tokens / wall)
    return {"ids": [r["ids"] for r in recs], "tokens": tokens, "seconds": wall, "tokens_per_s": steady,
            "tokens_per_s_all": tokens / wall, "steady_seconds": end - t0,
            "ttft": [r["ttft"] for r in recs], "latency": [r["latency"] for r in recs],
            "ttft_steady": [r["ttft"] for r in recs if not r["first"]]}


def tokens_before(chunks: list[list[tuple[float, int]]], end: float) -> int:
    """The tokens of the answers' (arrival time, tokens) chunks that arrived by `end`."""
    return sum(n for answer in chunks for t, n in answer if t <= end)


def batch_health(app_url: str) -> dict:
    """The batched decoder's scheduler stats from the app's ``/health`` ({} when it does not batch)."""
    import json
    import urllib.request

    with urllib.request.urlopen(app_url + "/health", timeout=60) as resp:
        return json.load(resp)["decoder"].get("batch") or {}


def forward_totals(app_url: str) -> tuple[int, float]:
    """The batched decoder's verification forwards so far and the rows they verified; (0, 0.0)
    when the decoder does not batch."""
    batch = batch_health(app_url)
    forwards = int(batch.get("forwards") or 0)
    return forwards, forwards * float(batch.get("rows_per_forward") or 0.0)


def render_gates(gates: dict) -> str:
    """The batched decoder's drafting gate after each level (``DraftingGate.summary`` per level:
    load band -> verdict, pairs, gain, the band it was seeded from), one line a level."""
    lines = ["The batched decoder's drafting gate after each level (per load: requests in the batch, "
             "verdict, pairs compared, drafting's measured gain; one gate for the whole run, as a server keeps):"]
    for c, summary in gates.items():
        loads = "; ".join(f"{band}: {g['verdict']} ({g['pairs']} pairs, {100 * g['gain']:+.1f}%"
                          + (f", seeded from {g['seeded_from']}" if g.get("seeded_from") else "") + ")"
                          for band, g in (summary or {}).items())
        lines.append(f"- after {c} in flight: {loads or 'no load gated'}")
    return "\n".join(lines)


def hf_static(target, prompt_ids: list[list[int]], batch: int, max_new: int) -> float:
    """transformers' generate() over the prompts in left-padded batches of `batch`: tokens/s
    (every row generates exactly `max_new` tokens)."""
    seconds = sum(run_hf_static(target, prompt_ids[k:k + batch], max_new) for k in range(0, len(prompt_ids), batch))
    return len(prompt_ids) * max_new / seconds


def engine_alone(target, stores, prompt_ids, method: str, max_new: int) -> tuple[float, list[list[int]]]:
    """The questions one after another through ``generate`` in this process: (tokens/s, ids)."""
    from decoding.config import SamplingParams
    from decoding.methods import make_drafter

    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    seconds, outs = run_serialized(target, prompt_ids, lambda: make_drafter(method, stores), params)
    return sum(map(len, outs)) / seconds, outs


def engine_vs_served(base_url: str, target, stores, texts: list[str], prompt_ids: list[list[int]], method: str,
                     max_tokens: int, rep: int) -> tuple[dict, dict]:
    """At 1 in flight: each question through the in-process engine and through the served app, in
    turns (``method_order``); returns the (engine, served) runs, tokens/s over the sum of their
    requests' latencies."""
    from openai import OpenAI

    from decoding.config import SamplingParams
    from decoding.methods import make_drafter
    from serving.app import reset_prefix_caches

    params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)
    client = OpenAI(base_url=base_url + "/v1", api_key="none", timeout=900, max_retries=0)
    model = client.models.list().data[0].id
    runs = {v: {"ids": [], "latency": [], "ttft": []} for v in ("engine", "served")}
    for i, (text, ids) in enumerate(zip(texts, prompt_ids)):
        for v in method_order(("engine", "served"), i + rep):
            if v == "engine":
                seconds, outs = run_serialized(target, [ids], lambda: make_drafter(method, stores), params)
                res = {"ids": list(outs[0]), "latency": seconds}
            else:
                reset_prefix_caches("batched")
                res = stream_one(client, model, text, method, max_tokens)
                runs[v]["ttft"].append(res["ttft"])
            runs[v]["ids"].append(res["ids"])
            runs[v]["latency"].append(res["latency"])
    for r in runs.values():
        r["tokens_per_s"] = sum(map(len, r["ids"])) / sum(r["latency"])
    return runs["engine"], runs["served"]


def summarize(runs: list[dict]) -> dict:
    """Median tokens/s over repeats (with min and max), latency and TTFT percentiles over all."""
    tps = [r["tokens_per_s"] for r in runs]
    ttft = [x for r in runs for x in r["ttft"]]
    steady = [x for r in runs for x in r.get("ttft_steady", [])]
    lat = [x for r in runs for x in r["latency"]]
    return {"tokens_per_s": median(tps), "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "ttft_steady_p99_ms": 1e3 * pct(steady, 99) if steady else float("nan"),
            "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
            "rows_per_forward": median([r["rows_per_forward"] for r in runs if "rows_per_forward" in r] or [0.0])}


def _ratio(row: dict) -> str:
    """A paired ratio: the median over repeats and, with several, their range."""
    lo, hi = row.get("ratio_min", row["ratio"]), row.get("ratio_max", row["ratio"])
    return f"{row['ratio']:.2f}x" + (f" [{lo:.2f}, {hi:.2f}]" if hi > lo else "")


def render(payload: dict) -> str:
    """The markdown report of a run (``payload``: its machine, args and rows)."""
    args, rows, mach = payload["args"], payload["rows"], payload["machine"]
    reason = mach.get("dtype_reason") or mach.get("dtype", "?")
    levels = sorted({r["concurrency"] for r in rows if r["method"] != "ttft_p99_ratio"})
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "ttft_p99_ratio"))
    md = ["# Served load (`python -m bench.serving_load`)", "",
          f"Target: {reason}; SENSE drafts from {args.get('store') or STORE_BEFORE}; one decoder replica ({mach.get('torch_threads', '?')} torch threads), default limits "
          f"(a batch of at most {args.get('batch_limit', 8)}, the rest queued); {args['max_tokens']}-token streamed chat completions (EOS "
          f"ignored), greedy, through the `openai` client; per level max({args.get('rounds', 1)} c, "
          f"{args['min_requests']}) distinct GSM8K test questions, closed loop (c clients, each sending its next "
          f"request when its last one ended, all starting at once; TTFT p99 later: the requests after each client's "
          f"first, without the opening burst of c at once, but in waves: see below); {args['repeats']} repeat(s), "
          f"order rotated. Tokens/s are medians over "
          f"the repeats; a ratio is the median of the repeats' paired ratios (each repeat's runs side by side), "
          f"[min, max] beside it. Every served answer equals the question decoded alone by the engine, token "
          f"for token.", "",
          "Tokens/s are counted while c requests were in flight and decoding (from the first token of the last "
          "client's first answer until the first client finds no question left); the whole run's ratio, with the "
          "opening burst's prefills and the drain after it, fewer and fewer in flight, is in the last column: answers "
          "of one length that went in lockstep (`ar`, in waves) end at once, answers that drifted apart (each "
          "speculative request commits its own number of tokens a step) drain over a tail at lower concurrency.", "",
          "| method | in flight | batched tok/s | vs serialized | vs HF static batch | vs ar batched | "
          "TTFT p50 / p99 ms | TTFT p99 later ms | latency p50 / p99 s | rows / forward | vs ar, whole run |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in levels:
        for m in methods:
            r = {row["vs"]: row for row in rows if row["method"] == m and row["concurrency"] == c}
            if "serialized" not in r:
                continue
            b = r["serialized"]
            arb = _ratio(r["ar_batched"]) if "ar_batched" in r else "-"
            md.append(f"| {m} | {c} | {b['tokens_per_s']:.1f} | {_ratio(b)} ({b['peer_tokens_per_s']:.1f}) | "
                      f"{_ratio(r['hf_static_batch'])} ({r['hf_static_batch']['peer_tokens_per_s']:.1f}) | "
                      f"{arb} | {b['ttft_p50_ms']:.0f} / {b['ttft_p99_ms']:.0f} | "
                      f"{b.get('ttft_steady_p99_ms', float('nan')):.0f} | "
                      f"{b['latency_p50_s']:.2f} / {b['latency_p99_s']:.2f} | "
                      f"{b.get('rows_per_forward') or float('nan'):.1f} | "
                      f"{'%.2fx' % r['ar_batched']['ratio_whole_run'] if 'ratio_whole_run' in r.get('ar_batched', {}) else '-'} |")
    for row in rows:
        if row["vs"] == "engine":
            md.append(f"\nAt 1 in flight, served {row['method']} over the in-process engine, question by question in "
                      f"turns: {_ratio(row)} "
                      f"(medians: {row['tokens_per_s']:.1f} served, {row['peer_tokens_per_s']:.1f} tok/s engine).")
        if row["method"] == "ttft_p99_ratio":
            md.append(f"\np99 time to first token of {row['decode_method']} at 16 in flight over its value at 1, "
                      f"steady state: {row['ratio']:.2f}x ({row.get('ttft_p99_ms', float('nan')):.0f} against "
                      f"{row.get('ttft_p99_ms_1', float('nan')):.0f} ms; {STAGGER_ROUNDS} x 16 requests, the 16 clients "
                      f"staggered over an answer's time, each client's first request not counted). In waves, the "
                      f"clients started together (the table's runs: answers of one length end together, so 16 "
                      f"requests arrive at once again and again, each wave's 16 prefills one after another on the "
                      f"cores), their later requests: {row.get('ratio_waves', float('nan')):.2f}x; every request, "
                      f"the opening burst included: {row.get('ratio_burst', float('nan')):.2f}x.")
    if payload.get("gates"):
        md.append("\n" + render_gates(payload["gates"]))
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    from decoding.cli import _quiet_libraries

    _quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: concurrency 1,4, 16 tokens; writes nothing")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--methods", default="ar,sense")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-requests", type=int, default=16, help="requests per level at least (c at most)")
    ap.add_argument("--repeats", type=int, default=2)
    # Tokens/s count while c requests are in flight, until the first client finds no question
    # left: with r rounds that is about r - 1 answers' time. With 2 rounds, one answer (~1.5 s at
    # 16 in flight): SENSE/ar at 16 in flight read 0.83-1.17x over runs of like code; with 4,
    # three answers.
    ap.add_argument("--rounds", type=int, default=4,
                    help="requests per client at least: the later ones arrive while the others run (steady state)")
    ap.add_argument("--dense-docs", type=int, default=200, help="default dense store size (GSM8K train pairs)")
    ap.add_argument("--dense", default=None, help=DENSE_CHOICES_HELP + " (--quick: 'default')")
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.max_tokens, args.min_requests, args.rounds, args.repeats = "1,4", 16, 4, 1, 1
    levels = [int(c) for c in args.concurrency.split(",")]

    from serving.config import DecoderConfig

    args.batch_limit = DecoderConfig().max_ongoing_requests     # the served default, recorded
    import ray
    import torch
    from ray import serve

    from decoding.engine import encode_prompt
    from decoding.methods import check_method
    from bench.sense import dense_source
    from decoding.stores import load_datastores
    from decoding.target import TargetModel
    from serving.app import reset_prefix_caches
    from serving.control_plane import init_local_ray

    methods = [check_method(m) for m in args.methods.split(",")]
    threads = torch.get_num_threads()
    target = TargetModel.load()
    log(f"target: {target.dtype_choice.reason}; lean forward {target.lean_note}")
    args.dense_source, args.store = dense_source(target, args.dense, args.quick)
    stores = load_datastores(target, methods=methods, dense=args.dense_source,
                             dense_default_docs=args.dense_docs)
    steady_ttft = 1 in levels and 16 in levels          # the staggered pass at 16 (see closed_loop)
    texts = questions(max(args.min_requests, args.rounds * max(levels), STAGGER_ROUNDS * 16 if steady_ttft else 0))
    prompt_ids = [encode_prompt(target, q) for q in texts]
    n_for = {c: max(c * args.rounds, args.min_requests) for c in levels}
    log("reference: every question decoded alone by the engine (ar) ...")
    _, reference = engine_alone(target, stores, prompt_ids, "ar", args.max_tokens)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    index = {"dense": args.dense_source, "dense_default_docs": args.dense_docs}
    apps = {v: {"model": {"torch_threads": threads}, "index": index,
                "decoder": {"batching": v == "batched", "max_queued_requests": -1}} for v in VARIANTS}
    init_local_ray(num_cpus=max(4, 2 * threads), logging_level="ERROR", log_to_driver=False)   # as serving.run
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs: dict[tuple, list[dict]] = {}
    gates: dict[int, dict | None] = {}      # the batched decoder's drafting gate after each level
    mismatches: list[str] = []
    try:
        for v, app in apps.items():
            log(f"deploying the {v} decoder ...")
            deploy(app, url, name=v, route_prefix=f"/{v[0]}")
        for v in VARIANTS:                                       # warm-up: kernels, cost curve, allocator
            for m in methods:
                closed_loop(f"{url}/{v[0]}", texts[:1], m, 8, 1)
            reset_prefix_caches(v)                               # and the deployment handle it calls
        for m in methods:                                        # the in-process engine, likewise
            engine_alone(target, stores, prompt_ids[:1], m, 8)
        for c in levels:
            prompts = texts[:n_for[c]]
            variants = [(m, v) for m in methods for v in (*VARIANTS, "hf_static_batch")
                        if not (v == "hf_static_batch" and m != "ar")]
            for rep in range(args.repeats):
                for m, v in method_order(variants, rep + c):
                    if v == "hf_static_batch":
                        tps = hf_static(target, prompt_ids[:len(prompts)], c, args.max_tokens)
                        res = {"tokens_per_s": tps, "ttft": [], "latency": [], "ids": []}
                    else:
                        reset_prefix_caches(v)
                        before = forward_totals(f"{url}/{v[0]}")
                        res = closed_loop(f"{url}/{v[0]}", prompts, m, args.max_tokens, c, slots=args.batch_limit)
                        after = forward_totals(f"{url}/{v[0]}")
                        if after[0] > before[0]:        # rows a verification forward (prefills not counted)
                            res["rows_per_forward"] = (after[1] - before[1]) / (after[0] - before[0])
                    runs.setdefault((m, v, c), []).append(res)
                    if v != "hf_static_batch" and res["ids"] != reference[:len(prompts)]:
                        bad = sum(a != b for a, b in zip(res["ids"], reference))
                        mismatches.append(f"{m} {v} at concurrency {c}: {bad} of {len(prompts)} answers differ")
                    log(f"c={c} rep={rep} {m:6} {v:16} {res['tokens_per_s']:7.1f} tok/s")
                if c == 1:
                    m = "sense" if "sense" in methods else methods[-1]
                    for v, res in zip(("engine", "batched_vs_engine"), engine_vs_served(
                            f"{url}/b", target, stores, prompts, prompt_ids[:len(prompts)], m, args.max_tokens, rep)):
                        runs.setdefault((m, v, c), []).append(res)
                        if res["ids"] != reference[:len(prompts)]:
                            bad = sum(a != b for a, b in zip(res["ids"], reference))
                            mismatches.append(f"{m} {v} at concurrency 1: {bad} of {len(prompts)} answers differ")
                    log(f"c=1 rep={rep} {m:6} served / engine in turns {res['tokens_per_s']:7.1f} / "
                        f"{runs[(m, 'engine', c)][-1]['tokens_per_s']:7.1f} tok/s")
            gates[c] = batch_health(f"{url}/b").get("drafting_gate")
        ttft_m = "sense" if "sense" in methods else methods[-1]
        for rep in range(args.repeats if steady_ttft else 0):
            prompts = texts[:STAGGER_ROUNDS * 16]
            reset_prefix_caches("batched")
            res = closed_loop(f"{url}/b", prompts, ttft_m, args.max_tokens, 16, stagger=True)
            runs.setdefault((ttft_m, "staggered", 16), []).append(res)
            if res["ids"] != reference[:len(prompts)]:
                bad = sum(a != b for a, b in zip(res["ids"], reference))
                mismatches.append(f"{ttft_m} staggered at concurrency 16: {bad} of {len(prompts)} answers differ")
            log(f"c=16 rep={rep} {ttft_m:6} staggered clients: TTFT p99 of the later requests "
                f"{1e3 * pct(res['ttft_steady'], 99):.0f} ms")
    finally:
        serve.shutdown()
        ray.shutdown()
    if mismatches:
        for line in mismatches:
            log("FAIL:", line)
        return 1

    s = {k: summarize(v) for k, v in runs.items()}
    rows = []
    for c in levels:
        for m in methods:
            mine = s[(m, "batched", c)]
            peers = {"serialized": (m, "serialized", c), "hf_static_batch": ("ar", "hf_static_batch", c)}
            if m != "ar" and "ar" in methods:
                peers["ar_batched"] = ("ar", "batched", c)
            if (m, "engine", c) in s:
                peers["engine"] = (m, "engine", c)
            for vs, key in peers.items():
                mine_runs, theirs = runs[(m, "batched_vs_engine" if vs == "engine" else "batched", c)], runs[key]
                ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(mine_runs, theirs)]
                # the whole run, its opening and drain included (closed_loop); the engine's and HF's runs have none
                drained = [a.get("tokens_per_s_all", a["tokens_per_s"]) / b.get("tokens_per_s_all", b["tokens_per_s"])
                           for a, b in zip(mine_runs, theirs)]
                own = s[(m, "batched_vs_engine", c)] if vs == "engine" else mine
                rows.append({"benchmark": "serving", "method": m, "concurrency": c, "vs": vs,
                             "ratio": round(median(ratios), 3), "ratio_min": round(min(ratios), 3),
                             "ratio_max": round(max(ratios), 3), "ratio_whole_run": round(median(drained), 3),
                             "tokens_per_s": round(own["tokens_per_s"], 2),
                             "peer_tokens_per_s": round(s[key]["tokens_per_s"], 2),
                             **{k: round(own[k], 3) for k in ("ttft_p50_ms", "ttft_p99_ms", "ttft_steady_p99_ms",
                                                               "latency_p50_s", "latency_p99_s",
                                                               "rows_per_forward")},
                             "requests": n_for[c], "identical": True})
    if steady_ttft:
        one = s[(ttft_m, "batched", 1)]["ttft_steady_p99_ms"]
        steady = s[(ttft_m, "staggered", 16)]["ttft_steady_p99_ms"]
        rows.append({"benchmark": "serving", "method": "ttft_p99_ratio", "decode_method": ttft_m, "concurrency": 16,
                     "vs": "concurrency_1", "ratio": round(steady / one, 3),
                     "ttft_p99_ms": round(steady, 1), "ttft_p99_ms_1": round(one, 1),
                     "ratio_waves": round(s[(ttft_m, "batched", 16)]["ttft_steady_p99_ms"] / one, 3),
                     "ratio_burst": round(s[(ttft_m, "batched", 16)]["ttft_p99_ms"]
                                          / s[(ttft_m, "batched", 1)]["ttft_p99_ms"], 3)})

    text = render({"machine": {"dtype_reason": target.dtype_choice.reason, "torch_threads": threads},
                   "args": vars(args), "rows": rows, "gates": gates})
    print(text)
    if not args.quick:
        write_results("serving_load", machine_info() | {"dtype": str(target.dtype).removeprefix("torch."),
                                                        "dtype_reason": target.dtype_choice.reason}, rows,
                      text, extra={"args": vars(args), "gates": gates})
    return 0


if __name__ == "__main__":
    sys.exit(main())
