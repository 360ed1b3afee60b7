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
import os
import sys
import threading
import time

import psutil
import requests

from bench.common import forget_prompts, machine_info, median, write_results
from decoding.methods import NEEDS_DENSE, NEEDS_SPARSE, check_method, make_drafter
from support.load import pct
from support.net import free_port

# torch, transformers, Ray and the serving app are imported inside main() and the functions it
# calls, after _quiet_libraries(): HF_HUB_OFFLINE and the libraries' verbosity are read as they load.

FALLBACK_PROMPTS = ["What is 17 * 23? Explain step by step.", "Write a short poem about the sea.",
                    "List three uses of a paperclip.", "Explain photosynthesis in two sentences."]


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def questions(n: int) -> list[str]:
    try:
        from index.corpus import gsm8k

        return [r["question"] for r in gsm8k("test")[:n]]
    except Exception:                     # no shared data: a few built-in prompts
        return (FALLBACK_PROMPTS * (n // len(FALLBACK_PROMPTS) + 1))[:n]


# -- engine ------------------------------------------------------------------------------------


def run_engine(target, stores, prompts, method: str, max_tokens: int, budget,
               cost: dict | None = None) -> tuple[float, list[list[int]], list[dict]]:
    """(tokens/s over the generate() calls, token ids per prompt, per-request costs in seconds).
    With budget "adaptive", `cost` is the verify cost curve (measured here if not given)."""
    from decoding.budget import AdaptiveBudget, SharedEstimates
    from decoding.config import SamplingParams
    from decoding.cost import measure_verify_cost
    from decoding.engine import encode_prompt, generate

    if budget == "adaptive" and cost is None:
        cost = measure_verify_cost(target, (1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
    outs, recs, tokens, seconds = [], [], 0, 0.0
    shared = SharedEstimates()      # what a decoder's earlier requests taught, as the default budget has it
    for q in prompts:
        t0 = time.perf_counter()
        ids = encode_prompt(target, q)
        t_encode = time.perf_counter() - t0
        b = AdaptiveBudget(cost, shared=shared) if cost else budget
        forget_prompts(target)
        t0 = time.perf_counter()
        r = generate(target, ids, params=SamplingParams(max_new_tokens=max_tokens), drafter=make_drafter(method, stores),
                     budget=b)
        seconds += time.perf_counter() - t0
        tokens += len(r.token_ids)
        outs.append(r.token_ids)
        s = r.stats
        recs.append({"encode": t_encode, "prefill": s.time_prefill, "draft": s.time_draft, "verify": s.time_verify,
                     "commit": s.time_commit, "total": s.time_total, "steps": s.steps, "tokens": len(r.token_ids)})
    return tokens / seconds, outs, recs


# -- HTTP clients ------------------------------------------------------------------------------


def body(q: str, method: str, max_tokens: int, budget, stream: bool) -> dict:
    return {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, "speculative": {"method": method, "budget": budget, "return_token_ids": True}}


def one_plain(url: str, q: str, method: str, max_tokens: int, budget) -> tuple[list[int], float, dict]:
    """(token ids, client wall seconds, per-request costs in seconds as the decoder reports them)."""
    t0 = time.perf_counter()
    r = requests.post(url + "/v1/chat/completions", json=body(q, method, max_tokens, budget, False), timeout=600)
    r.raise_for_status()
    wall = time.perf_counter() - t0
    out = r.json()
    sp = out["speculative"]
    ids = out["choices"][0]["token_ids"]
    rec = {"wall": wall, "queue": sp["time_queue_s"], "encode": sp["time_encode_s"], "prefill": sp["time_prefill_s"],
           "draft": sp["time_draft_s"], "verify": sp["time_verify_s"], "commit": sp["time_commit_s"],
           "total": sp["time_total_s"], "steps": sp["steps"], "tokens": len(ids)}
    return ids, wall, rec


def probe(url: str, path: str, n: int = 30) -> float:
    """Median round trip of GET `path` in ms (a kept-alive connection, as a client would have)."""
    with requests.Session() as s:
        s.get(url + path, timeout=30).raise_for_status()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            s.get(url + path, timeout=30).raise_for_status()
            times.append(time.perf_counter() - t0)
    return 1e3 * median(times)


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
            "request_s_mean": sum(r["seconds"] for r in results) / max(1, len(results)),
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "tpot_p50_ms": 1e3 * pct(tpot, 50), "tpot_p99_ms": 1e3 * pct(tpot, 99)}


# -- cost breakdown ----------------------------------------------------------------------------

# Process classes for CPU accounting (psutil names and command lines of one local Ray node).
_CLASSES = (("decoder replica", (":Decoder",)), ("ingress replica", (":Ingress",)),
            ("serve proxy", ("ProxyActor",)), ("serve controller", ("ServeController",)),
            ("raylet", ("raylet",)), ("gcs", ("gcs_server",)),
            ("dashboard (head, agents)", ("dashboard", "DashboardAgent", "runtime_env", "RuntimeEnvAgent")),
            ("other Ray processes", ("ray::", "/ray/", "log_monitor", "monitor.py")))


def _proc_class(p) -> str | None:
    if p.pid == os.getpid():
        return "benchmark client"
    try:
        text = p.name() + " " + " ".join(p.cmdline())
    except Exception:
        return None
    for name, keys in _CLASSES:
        if any(k in text for k in keys):
            return name
    return "other processes"


def cpu_snapshot() -> tuple[dict, list[int]]:
    """CPU seconds per process (with its class) and the system-wide /proc/stat counters."""
    procs = {}
    for p in psutil.process_iter():
        c = _proc_class(p)
        if c is not None:
            try:
                t = p.cpu_times()
                procs[p.pid] = (c, t.user + t.system)
            except Exception:
                pass
    try:
        with open("/proc/stat") as f:
            stat = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        stat = []
    return procs, stat


def cpu_use(a: tuple[dict, list[int]], b: tuple[dict, list[int]], wall: float) -> dict:
    """Cores used between two snapshots: per process class, and by the whole machine."""
    use: dict[str, float] = {}
    for pid, (c, t) in b[0].items():
        use[c] = use.get(c, 0.0) + t - a[0].get(pid, (c, 0.0))[1]
    out = {c: round(v / wall, 3) for c, v in sorted(use.items(), key=lambda kv: -kv[1])}
    if a[1] and b[1]:
        d = [y - x for x, y in zip(a[1], b[1])]
        hz = os.sysconf("SC_CLK_TCK")
        out["machine (all processes)"] = round((sum(d) - d[3] - d[4]) / hz / wall, 3)
    return out


def _mean_ms(recs: list[dict], key) -> float:
    vals = [key(r) for r in recs]
    return round(1e3 * sum(vals) / len(vals), 1)


def breakdown(method: str, engine: list[dict], served: list[dict], engine_ray_up: list[dict], probes: dict,
              streamed_s: float | None, cpu: dict) -> dict:
    """Where a served request's time goes, against the in-process engine (ms per request, means)."""
    def loop(r):
        return r["draft"] + r["verify"] + r["commit"]

    def rest(r):                  # inside generate(): stop checks, detokenisation, the stream hook
        return r["total"] - r["prefill"] - loop(r)

    def per_step(recs, key):
        return round(1e3 * sum(key(r) for r in recs) / max(1, sum(r["steps"] for r in recs)), 2)

    row = {"method": "served_breakdown", "decode_method": method, "requests": len(served),
           "tokens_per_request": round(sum(r["tokens"] for r in served) / len(served), 1),
           "steps_per_request": round(sum(r["steps"] for r in served) / len(served), 1)}
    for side, recs in (("engine", engine), ("served", served), ("engine_ray_up", engine_ray_up)):
        row[side] = {"encode_ms": _mean_ms(recs, lambda r: r["encode"]),
                     "prefill_ms": _mean_ms(recs, lambda r: r["prefill"]),
                     "draft_ms": _mean_ms(recs, lambda r: r["draft"]),
                     "verify_ms": _mean_ms(recs, lambda r: r["verify"]),
                     "commit_ms": _mean_ms(recs, lambda r: r["commit"]),
                     "other_generate_ms": _mean_ms(recs, rest),
                     "step_ms": per_step(recs, loop), "verify_step_ms": per_step(recs, lambda r: r["verify"]),
                     "draft_step_ms": per_step(recs, lambda r: r["draft"]),
                     "request_ms": _mean_ms(recs, lambda r: r.get("wall", r["encode"] + r["total"]))}
    row["served"]["queue_ms"] = _mean_ms(served, lambda r: r["queue"])
    row["served"]["outside_decoder_ms"] = _mean_ms(served, lambda r: r["wall"] - r["queue"] - r["encode"] - r["total"])
    row["served"]["streamed_request_ms"] = round(1e3 * streamed_s, 1) if streamed_s else None
    row["probes_ms"] = probes
    row["cpu_cores_while_serving"] = cpu
    return row


def breakdown_md(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r["method"] == "served_breakdown"]
    if not rows:
        return []
    md = ["", "## Cost breakdown (one request at a time)\n",
          "Means per request, in ms. *engine*: in this process before Ray started; *served*: the same "
          "requests over HTTP, the decoder's own timings (returned in `speculative`) plus the client's wall "
          "time; *engine, Ray up*: in this process, in turns with the served requests while the app was "
          "deployed and idle (Ray's background on the same cores, no serving path).\n"]
    head = "| | " + " | ".join(f"{r['decode_method']} {side}" for r in rows
                               for side in ("engine", "served", "engine, Ray up")) + " |"
    md += [head, "|---|" + "---|" * (3 * len(rows))]
    lines = [("client -> proxy -> ingress -> decoder handle and back (HTTP, JSON, handle call)",
              lambda r, side: r["served"]["outside_decoder_ms"] if side == "served" else None),
             ("waiting for a generate thread in the replica", lambda r, side: r["served"]["queue_ms"]
              if side == "served" else None),
             ("tokenisation + chat template", lambda r, side: r[side]["encode_ms"]),
             ("prefill", lambda r, side: r[side]["prefill_ms"]),
             ("decode loop: drafting (retrieval)", lambda r, side: r[side]["draft_ms"]),
             ("decode loop: verification forward", lambda r, side: r[side]["verify_ms"]),
             ("decode loop: commit (acceptance + KV compaction)", lambda r, side: r[side]["commit_ms"]),
             ("rest of generate (stop checks, detokenisation)", lambda r, side: r[side]["other_generate_ms"]),
             ("**request total**", lambda r, side: r[side]["request_ms"]),
             ("ms per decode step (draft + verify + commit)", lambda r, side: r[side]["step_ms"]),
             ("ms per verification forward", lambda r, side: r[side]["verify_step_ms"]),
             ("ms per draft (retrieval)", lambda r, side: r[side]["draft_step_ms"])]
    for label, get in lines:
        cells = []
        for r in rows:
            for side in ("engine", "served", "engine_ray_up"):
                v = get(r, side)
                cells.append("" if v is None else f"{v:g}")
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    md += ["", "Fixed costs (median round trip, ms): "
           + "; ".join(f"{r['decode_method']}: GET /v1/models (client -> proxy -> ingress) "
                       f"{r['probes_ms']['models']:.1f}, GET /health (+ one handle call to the decoder) "
                       f"{r['probes_ms']['health']:.1f}" for r in rows) + ".",
           "", "Streaming (SSE, one chunk per decode step) vs one JSON body, one request at a time: "
           + "; ".join(f"{r['decode_method']} {r['served']['streamed_request_ms']:.0f} ms vs "
                       f"{r['served']['request_ms']:.0f} ms per request" for r in rows
                       if r["served"]["streamed_request_ms"]) + ".",
           "", "CPU while serving one request at a time (cores, of 2; psutil per process, machine from /proc/stat):",
           "", "| process | " + " | ".join(r["decode_method"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    names = []
    for r in rows:
        names += [n for n in r["cpu_cores_while_serving"] if n not in names]
    for n in names:
        md.append(f"| {n} | " + " | ".join(f"{r['cpu_cores_while_serving'].get(n, 0.0):.3f}" for r in rows) + " |")
    return md


# -- the served app ----------------------------------------------------------------------------


def app_args(method: str, budget, replicas: int, threads: int, index: dict, max_ongoing: int) -> dict:
    return {"model": {"torch_threads": threads},
            "index": index,
            "speculative": {"method": method, "budget": budget},
            "decoder": {"num_replicas": replicas, "max_ongoing_requests": max_ongoing, "max_queued_requests": 64,
                        "ray_actor_options": {"num_cpus": 1}},
            "ingress": {"ray_actor_options": {"num_cpus": 0}}}


def deploy(args: dict, url: str, *, name: str = "bench", route_prefix: str = "/") -> None:
    from ray import serve

    from serving.app import build_app

    serve.run(build_app(args), name=name, route_prefix=route_prefix)
    health = url + route_prefix.rstrip("/") + "/health"
    deadline = time.time() + 900
    while time.time() < deadline:
        try:
            if requests.get(health, timeout=10).json().get("status") == "ok":
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
    ap.add_argument("--budget", default="adaptive", help="draft budget, both sides ('adaptive', the default, or an integer)")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=1, help="passes over the questions per concurrency level")
    ap.add_argument("--dense-docs", type=int, default=200, help="default dense store size (GSM8K train pairs)")
    ap.add_argument("--write", action="store_true", help="with --quick: write the results files anyway")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.quick:
        args.questions, args.max_new_tokens, args.methods, args.concurrency = 3, 24, "pld", "1,4"
    budget = args.budget if args.budget == "adaptive" else int(args.budget)
    methods = [check_method(m.strip()) for m in args.methods.split(",") if m.strip()]
    levels = [int(c) for c in args.concurrency.split(",")]

    from decoding.cli import _quiet_libraries

    _quiet_libraries()
    import ray
    import torch
    from ray import serve

    from decoding.target import TargetModel
    from serving.app import reset_prefix_caches
    from serving.config import IndexConfig
    from serving.control_plane import init_local_ray
    from serving.index_data import load_version_stores

    machine = machine_info()
    threads = torch.get_num_threads()
    prompts = questions(args.questions)
    target = TargetModel.load()
    index = IndexConfig(dense_default_docs=args.dense_docs, sparse="default" if NEEDS_SPARSE & set(methods) else None,
                        dense="default" if NEEDS_DENSE & set(methods) else None)
    stores = load_version_stores(index, target)          # decoding.stores.load_datastores

    # Each method in its own Ray instance, bracketed by engine runs with no Ray process around
    # (just before the instance starts and just after it stops): the served figure is compared
    # with the engine measured minutes from it, and no method inherits another's cluster state.
    engine_runs, rows, mismatches, served, breakdowns, interleaved = {}, [], {}, {}, [], {}
    cost = None
    if budget == "adaptive":                  # one curve for every engine run of this benchmark
        from decoding.cost import measure_verify_cost

        cost = measure_verify_cost(target, (1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
    run_engine(target, stores, prompts[:1], methods[0], 8, budget, cost)            # warm-up
    for method in methods:
        log(f"[{method}] engine: {len(prompts)} questions ...")
        engine_runs[method] = [run_engine(target, stores, prompts, method, args.max_new_tokens, budget, cost)]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        init_local_ray(num_cpus=max(4, 2 * threads), logging_level="ERROR", log_to_driver=False)   # as serving.run
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            m_index = {"sparse": index.sparse, "dense": index.dense, "dense_default_docs": args.dense_docs}
            log(f"[{method}] serving (1 replica) ...")
            deploy(app_args(method, budget, 1, threads, m_index, max(levels)), url)
            one_plain(url, prompts[0], method, 8, budget)                      # warm-up
            probes = {"models": round(probe(url, "/v1/models"), 2), "health": round(probe(url, "/health"), 2)}
            # Served against the engine in this process, question by question while the app is up
            # (engine then served, then served then engine, ...): both run beside the same idle
            # Ray daemons and the same minute of this VM's drifting speed (runs minutes apart differ
            # by up to 15% here). CPU per process is counted during the served requests.
            log(f"[{method}] served and engine (app up), interleaved question by question ...")
            served_tok = served_s = up_tok = up_s = 0.0
            served_out, recs, up_recs, per_q, cpu_acc = [], [], [], [], {}
            for i, q in enumerate(prompts):
                for side in (("engine", "served") if i % 2 == 0 else ("served", "engine")):
                    if side == "engine":
                        tps_q, _, rec_q = run_engine(target, stores, [q], method, args.max_new_tokens, budget, cost)
                        engine_q = tps_q
                        up_recs += rec_q
                        up_tok, up_s = up_tok + rec_q[0]["tokens"], up_s + rec_q[0]["tokens"] / tps_q
                        continue
                    reset_prefix_caches("bench")
                    before = cpu_snapshot()
                    ids, dt, rec = one_plain(url, q, method, args.max_new_tokens, budget)
                    for k, v in cpu_use(before, cpu_snapshot(), dt).items():
                        cpu_acc[k] = cpu_acc.get(k, 0.0) + v * dt
                    served_tok, served_s = served_tok + len(ids), served_s + dt
                    served_out.append(ids)
                    recs.append(rec)
                per_q.append((len(served_out[-1]) / recs[-1]["wall"]) / engine_q)
            machine_key = "machine (all processes)"
            cpu = {k: round(v / served_s, 3) for k, v in sorted(cpu_acc.items(), key=lambda kv: -kv[1])
                   if k != machine_key}
            cpu[machine_key] = round(cpu_acc.get(machine_key, 0.0) / served_s, 3)
            served[method] = served_tok / served_s
            ray_up = (up_tok / up_s, None, up_recs)
            interleaved[method] = {"per_question": per_q}
            mismatches[method] = sum(a != b for a, b in zip(engine_runs[method][0][1], served_out))
            log(f"[{method}] served {served[method]:.1f} tok/s (engine with the app up: {ray_up[0]:.1f})")
            streamed_s = None
            for c in levels:
                log(f"[{method}] concurrency {c} ...")
                reset_prefix_caches("bench")
                s = concurrent(url, prompts, method, args.max_new_tokens, budget, c, args.rounds)
                if c == 1:
                    streamed_s = s["request_s_mean"]
                rows.append({"method": "served_latency", "decode_method": method, "concurrency": c, "replicas": 1,
                             **{k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()}})
            breakdowns.append(breakdown(method, engine_runs[method][0][2], recs, ray_up[2], probes, streamed_s, cpu))
            breakdowns[-1]["engine_ray_up_tok_s"] = round(ray_up[0], 2)
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
        finally:
            serve.shutdown()
            ray.shutdown()
        log(f"[{method}] engine again ...")
        engine_runs[method].append(run_engine(target, stores, prompts, method, args.max_new_tokens, budget, cost))
        tps = [r[0] for r in engine_runs[method]]
        engine_tps = sum(tps) / len(tps)
        per_q = interleaved[method]["per_question"]
        up_tps = next(b for b in breakdowns if b["decode_method"] == method)["engine_ray_up_tok_s"]
        n_served = len([r for r in rows if r["method"] == "served"])
        rows[n_served:n_served] = [
            {"method": "served", "vs": "engine", "ratio": round(served[method] / up_tps, 3),
             "decode_method": method, "tok_s": round(served[method], 2), "vs_tok_s": up_tps,
             "ratio_per_question_median": round(median(per_q), 3),
             "ratio_per_question_iqr": [round(pct(per_q, 25), 3), round(pct(per_q, 75), 3)],
             "engine": "this process, the app up and idle, interleaved with the served requests question by question",
             "same_output": f"{len(prompts) - mismatches[method]}/{len(prompts)}"},
            {"method": "served", "vs": "engine_without_ray", "ratio": round(served[method] / engine_tps, 3),
             "decode_method": method, "tok_s": round(served[method], 2), "vs_tok_s": round(engine_tps, 2),
             "engine_tok_s_runs": [round(t, 2) for t in tps],
             "engine": "this process, no Ray processes: one run just before the Ray instance started, one just "
                       "after it stopped"}]
    rows += breakdowns
    runtime_s = round(time.perf_counter() - t_start)

    from serving.control_plane import LEAN_ENV, want_dashboard

    ray_env = {k: os.environ.get(k) for k in LEAN_ENV}
    lean = ", ".join(f"{k}={v}" for k, v in ray_env.items()) + ("" if want_dashboard(None) else ", no dashboard")
    md = [f"# Serving benchmark{' (quick smoke run)' if args.quick else ''}\n",
          f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine['device']}; "
          f"embedded SmolLM2-135M-Instruct. {len(prompts)} GSM8K test questions, chat template, greedy, "
          f"max {args.max_new_tokens} new tokens, draft budget {budget}; the served app: one local Ray node, "
          f"index held in the decoder, {threads} torch thread(s) per replica (half each with 2 replicas); "
          f"Ray started as `serving.run` starts it: lean control plane ({lean}).\n",
          "## Served vs in-process engine (one request at a time)\n",
          "Each method ran in a Ray instance of its own, its app deployed as `serving.run` deploys it. "
          "**Served vs engine**: question by question, the engine in this process and the same question over "
          "HTTP, in turns (engine first, then served first, ...), so both run beside the same idle Ray "
          "daemons and in the same minute of this VM, whose speed drifts by up to 15% over minutes. Served "
          "tok/s counts the client's wall time (HTTP, tokenisation and all). **Without Ray**: the same served "
          "figure over the engine with no Ray process on the machine (mean of a run just before the Ray "
          "instance started and one just after it stopped; the two runs show the drift).\n",
          "| decoding method | served tok/s | engine tok/s | served / engine | per question: median (IQR) | "
          "same output | engine without Ray tok/s | served / engine without Ray |",
          "|---|---|---|---|---|---|---|---|"]
    by = {(r["decode_method"], r["vs"]): r for r in rows if r["method"] == "served"}
    for m in methods:
        r, w = by[(m, "engine")], by[(m, "engine_without_ray")]
        iqr = r["ratio_per_question_iqr"]
        md.append(f"| {m} | {r['tok_s']} | {r['vs_tok_s']} | {r['ratio']:.3f} | "
                  f"{r['ratio_per_question_median']:.3f} ({iqr[0]:.3f}-{iqr[1]:.3f}) | {r['same_output']} | "
                  f"{w['vs_tok_s']} ({' / '.join(map(str, w['engine_tok_s_runs']))}) | {w['ratio']:.3f} |")
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
    md += breakdown_md(rows)
    md += ["", f"Benchmark run time: {runtime_s / 60:.1f} min."]
    text = "\n".join(md) + "\n"
    print(text)
    if not args.quick or args.write:
        path = write_results("serving", machine, rows, text,
                             extra={"config": {k: v for k, v in vars(args).items()}, "ray_env": ray_env,
                                    "mismatches": mismatches, "runtime_s": runtime_s})
        log(f"wrote {path}")
    return 1 if any(mismatches.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
