"""Serving benchmark: the Ray Serve application over HTTP against the in-process engine.

    python -m bench.serving                 # full run: writes bench/results/serving.{json,md}
    python -m bench.serving --quick         # smoke run (few prompts, short answers): prints, writes nothing

On the first N GSM8K test questions (chat template, greedy, same budget both sides):
1. engine: ``decoding.engine.generate`` in this process, one question after the other;
2. served: the same questions through ``POST /v1/chat/completions`` on a local Serve app (one
   decoder replica, index held in the decoder), one at a time; row ``{method: served, vs:
   engine, ratio}`` per decoding method (served tokens/s over engine tokens/s);
3. latency at concurrency 1, 4 and 8 (streamed): time to first token and per-token latency
   (time between the first and last token over the tokens in between), p50/p99 over requests,
   and the aggregate throughput;
4. throughput at concurrency 8 with 1 and then 2 decoder replicas.
Served outputs are checked token for token against the engine's.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

import requests

from bench.common import machine_info, write_results

FALLBACK_PROMPTS = ["What is 17 * 23? Explain step by step.", "Write a short poem about the sea.",
                    "List three uses of a paperclip.", "Explain photosynthesis in two sentences."]


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[i]


def questions(n: int) -> list[str]:
    try:
        from index.corpus import gsm8k

        return [r["question"] for r in gsm8k("test")[:n]]
    except Exception:                     # no shared data: a few built-in prompts
        return (FALLBACK_PROMPTS * (n // len(FALLBACK_PROMPTS) + 1))[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- engine ------------------------------------------------------------------------------------


def run_engine(target, stores, prompts, method: str, max_tokens: int, budget) -> tuple[float, list[list[int]]]:
    from decoding.budget import AdaptiveBudget, measure_verify_cost
    from decoding.config import SamplingParams
    from decoding.engine import encode_prompt, generate
    from decoding.methods import make_drafter

    cost = measure_verify_cost(target, (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)) if budget == "adaptive" else None
    outs, tokens, seconds = [], 0, 0.0
    for q in prompts:
        ids = encode_prompt(target, q)
        b = AdaptiveBudget(cost) if cost else budget
        t0 = time.perf_counter()
        r = generate(target, ids, params=SamplingParams(max_new_tokens=max_tokens), drafter=make_drafter(method, stores),
                     budget=b)
        seconds += time.perf_counter() - t0
        tokens += len(r.token_ids)
        outs.append(r.token_ids)
    return tokens / seconds, outs


# -- HTTP clients ------------------------------------------------------------------------------


def body(q: str, method: str, max_tokens: int, budget, stream: bool) -> dict:
    return {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, "speculative": {"method": method, "budget": budget, "return_token_ids": True}}


def one_plain(url: str, q: str, method: str, max_tokens: int, budget) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    r = requests.post(url + "/v1/chat/completions", json=body(q, method, max_tokens, budget, False), timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"], time.perf_counter() - t0


def one_stream(url: str, q: str, method: str, max_tokens: int, budget) -> dict:
    t0 = time.perf_counter()
    first = last = None
    ids: list[int] = []
    with requests.post(url + "/v1/chat/completions", json=body(q, method, max_tokens, budget, True), stream=True,
                       timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            new = (chunk.get("choices") or [{}])[0].get("token_ids") or []
            if new:
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
                ids += new
    end = time.perf_counter()
    n = len(ids)
    return {"ttft": (first if first is not None else end) - t0,
            "tpot": (last - first) / (n - 1) if n > 1 and first is not None else float("nan"),
            "tokens": n, "ids": ids, "seconds": end - t0}


def concurrent(url: str, prompts, method: str, max_tokens: int, budget, concurrency: int, rounds: int) -> dict:
    """Each of `concurrency` workers streams its share of prompts x rounds; aggregate stats."""
    work = [q for _ in range(rounds) for q in prompts]
    results: list[dict] = []
    lock = threading.Lock()
    it = iter(work)

    def worker():
        while True:
            with lock:
                q = next(it, None)
            if q is None:
                return
            res = one_stream(url, q, method, max_tokens, budget)
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] == r["tpot"]]
    return {"requests": len(results), "tokens": sum(r["tokens"] for r in results), "wall_s": wall,
            "throughput_tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "tpot_p50_ms": 1e3 * pct(tpot, 50), "tpot_p99_ms": 1e3 * pct(tpot, 99)}


# -- the served app ----------------------------------------------------------------------------


def app_args(method: str, budget, replicas: int, threads: int, index: dict, max_ongoing: int) -> dict:
    return {"model": {"torch_threads": threads},
            "index": index,
            "speculative": {"method": method, "budget": budget},
            "decoder": {"num_replicas": replicas, "max_ongoing_requests": max_ongoing, "max_queued_requests": 64,
                        "ray_actor_options": {"num_cpus": 1}},
            "ingress": {"ray_actor_options": {"num_cpus": 0}}}


def deploy(args: dict, url: str) -> None:
    from ray import serve

    from serving.app import build_app

    serve.run(build_app(args), name="bench", route_prefix="/")
    deadline = time.time() + 900
    while time.time() < deadline:
        try:
            if requests.get(url + "/health", timeout=10).json().get("status") == "ok":
                return
        except Exception:
            pass
        time.sleep(1)
    raise TimeoutError("the benchmark app did not become healthy")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 prompts, 24 tokens, pld; writes nothing")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--methods", default="pld,sense")
    ap.add_argument("--budget", default="4", help="draft budget, both sides (an integer or 'adaptive')")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=1, help="passes over the questions per concurrency level")
    ap.add_argument("--dense-docs", type=int, default=200, help="default dense store size (GSM8K train pairs)")
    ap.add_argument("--write", action="store_true", help="with --quick: write the results files anyway")
    args = ap.parse_args(argv)
    if args.quick:
        args.questions, args.max_new_tokens, args.methods, args.concurrency = 3, 24, "pld", "1,4"
    budget = args.budget if args.budget == "adaptive" else int(args.budget)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    levels = [int(c) for c in args.concurrency.split(",")]

    from decoding.cli import _quiet_libraries

    _quiet_libraries()
    import ray
    import torch
    from ray import serve

    from decoding.methods import Datastores
    from decoding.target import TargetModel
    from serving.config import IndexConfig
    from serving.index_data import load_dense, load_sparse

    machine = machine_info()
    threads = torch.get_num_threads()
    prompts = questions(args.questions)
    target = TargetModel.load()
    need = {"rest", "dense", "dresd", "sense"} & set(methods)
    index = IndexConfig(dense_default_docs=args.dense_docs, sparse="default" if need else None,
                        dense="default" if need - {"rest"} else None)
    stores = Datastores(sparse=load_sparse(index, target), dense=load_dense(index, target))

    # The engine alone first (no Ray processes around), and again at the end: drift shows.
    run_engine(target, stores, prompts[:1], methods[0], 8, budget)                  # warm-up
    engine_runs = {}
    for method in methods:
        log(f"[{method}] engine: {len(prompts)} questions ...")
        engine_runs[method] = [run_engine(target, stores, prompts, method, args.max_new_tokens, budget)]

    rows, mismatches = [], {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=max(4, 2 * threads), logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    served = {}
    try:
        for method in methods:
            m_index = {"sparse": index.sparse, "dense": index.dense, "dense_default_docs": args.dense_docs}
            log(f"[{method}] serving (1 replica) ...")
            deploy(app_args(method, budget, 1, threads, m_index, max(levels)), url)
            one_plain(url, prompts[0], method, 8, budget)                      # warm-up
            tokens, seconds, served_out = 0, 0.0, []
            for q in prompts:
                ids, dt = one_plain(url, q, method, args.max_new_tokens, budget)
                tokens, seconds = tokens + len(ids), seconds + dt
                served_out.append(ids)
            served[method] = tokens / seconds
            mismatches[method] = sum(a != b for a, b in zip(engine_runs[method][0][1], served_out))
            log(f"[{method}] served {served[method]:.1f} tok/s")
            for c in levels:
                log(f"[{method}] concurrency {c} ...")
                s = concurrent(url, prompts, method, args.max_new_tokens, budget, c, args.rounds)
                rows.append({"method": "served_latency", "decode_method": method, "concurrency": c, "replicas": 1,
                             **{k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()}})
            if method == methods[0] and not args.quick:
                c = max(levels)
                base = next(r for r in rows if r.get("concurrency") == c and r["method"] == "served_latency"
                            and r["decode_method"] == method)
                log(f"[{method}] 2 replicas, concurrency {c} ...")
                deploy(app_args(method, budget, 2, max(1, threads // 2), m_index, max(levels)), url)
                s = concurrent(url, prompts, method, args.max_new_tokens, budget, c, args.rounds)
                rows.append({"method": "served_replicas", "decode_method": method, "concurrency": c,
                             "replicas": 1, "throughput_tokens_per_s": base["throughput_tokens_per_s"]})
                rows.append({"method": "served_replicas", "decode_method": method, "concurrency": c,
                             "replicas": 2, "throughput_tokens_per_s": round(s["throughput_tokens_per_s"], 2),
                             "vs_1_replica": round(s["throughput_tokens_per_s"] / base["throughput_tokens_per_s"], 3)})
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    for method in methods:
        log(f"[{method}] engine again ...")
        engine_runs[method].append(run_engine(target, stores, prompts, method, args.max_new_tokens, budget))
        tps = [r[0] for r in engine_runs[method]]
        engine_tps = sum(tps) / len(tps)
        rows.insert(len([r for r in rows if r["method"] == "served"]),
                    {"method": "served", "vs": "engine", "ratio": round(served[method] / engine_tps, 3),
                     "decode_method": method, "tok_s": round(served[method], 2), "vs_tok_s": round(engine_tps, 2),
                     "engine_tok_s_runs": [round(t, 2) for t in tps],
                     "same_output": f"{len(prompts) - mismatches[method]}/{len(prompts)}"})

    md = [f"# Serving benchmark{' (quick smoke run)' if args.quick else ''}\n",
          f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine['device']}; "
          f"embedded SmolLM2-135M-Instruct. {len(prompts)} GSM8K test questions, chat template, greedy, "
          f"max {args.max_new_tokens} new tokens, draft budget {budget}; the served app: one local Ray node, "
          f"index held in the decoder, {threads} torch thread(s) per replica (half each with 2 replicas).\n",
          "## Served vs in-process engine (one request at a time)\n",
          "Engine tok/s is the mean of a run before the server started and one after it stopped.\n",
          "| decoding method | served tok/s | engine tok/s | ratio | same output |", "|---|---|---|---|---|"]
    md += [f"| {r['decode_method']} | {r['tok_s']} | {r['vs_tok_s']} ({' / '.join(map(str, r['engine_tok_s_runs']))})"
           f" | {r['ratio']:.3f} | {r['same_output']} |" for r in rows if r["method"] == "served"]
    md += ["", "## Latency (streamed)\n",
           "| decoding method | concurrency | TTFT p50 ms | TTFT p99 ms | per-token p50 ms | per-token p99 ms | "
           "throughput tok/s |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['decode_method']} | {r['concurrency']} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
           f"{r['tpot_p50_ms']:.1f} | {r['tpot_p99_ms']:.1f} | {r['throughput_tokens_per_s']:.1f} |"
           for r in rows if r["method"] == "served_latency"]
    rep = [r for r in rows if r["method"] == "served_replicas"]
    if rep:
        md += ["", "## Decoder replicas (concurrency %d)\n" % rep[0]["concurrency"],
               "| replicas | throughput tok/s | vs 1 replica |", "|---|---|---|"]
        md += [f"| {r['replicas']} | {r['throughput_tokens_per_s']:.1f} | {r.get('vs_1_replica', 1.0):.3f} |"
               for r in rep]
    text = "\n".join(md) + "\n"
    print(text)
    if not args.quick or args.write:
        path = write_results("serving", machine, rows, text,
                             extra={"config": {k: v for k, v in vars(args).items()}, "mismatches": mismatches})
        log(f"wrote {path}")
    return 1 if any(mismatches.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
