"""Reliability benchmark: load shedding, memory and injected faults, on a local Ray cluster.

    python -m bench.reliability              # writes bench/results/reliability.{json,md}
    python -m bench.reliability --quick      # a smaller run: prints, writes nothing
    python -m bench.reliability --no-pipeline-faults   # serving only (~5 min less)
    python -m bench.reliability --quick --long-only    # only the long-answer round

The served app (started here on a 2-node local Ray cluster: a head and one worker node): one
decoder replica admitting ``max_ongoing_requests`` + ``queued_in_replica`` + ``max_queued_requests``
requests (a batch, the replica's own queue, the callers' queue), two index
shards, SENSE drafting, greedy.

1. **Load** (``--rounds`` times): ``--requests`` cheap requests (``--max-tokens`` new tokens)
   sent at a fixed rate over ``--seconds`` with up to ``--concurrency`` in flight, far past what
   the decoder admits. Each answer is classified: admitted (200; its tokens must equal the
   reference answer, else ``wrong_output``), shed (429/503 with Retry-After and code
   ``overloaded``), server error (any other 5xx), failed (no HTTP answer). Latency p50/p99 of
   the admitted ones; recovery (a normal request right after the burst); resident memory of the
   decoder replica, the ingress replica and the HTTP proxies before and after (psutil, PIDs from
   Ray's state API), after a warm-up burst. Medians over rounds in the summary row.
   **Long answers** (``--long-requests``, 0: none): a 2-token answer is about one verify step, so
   "no wrong answer" above says little about speculative decoding under load. This round sends a
   handful of requests for ``--long-tokens`` (128) tokens each (SENSE and PLD, several at once)
   and checks every admitted answer token for token against the same request decoded alone by
   the engine in this process (same model, dtype, torch threads and index version, the index
   whole rather than sharded). ``--long-only``: this round alone (no load rounds, no faults).
2. **Faults**: the decoder replica killed mid-stream (``ray.kill`` of its actor, and SIGKILL of
   its worker process) with other requests in flight: every request must end complete and
   correct, or with a clean error (an HTTP error with Retry-After, or an SSE error event then
   ``[DONE]``), never a truncated stream that looks complete; Serve must replace the replica.
   Every index shard killed mid-request: the request completes by PLD fallback (statistics say
   so) with the same tokens, and a later request uses the index again. Pipeline (optional):
   the extraction node removed mid-build (a replacement node joins) and the S3 server stopped
   mid-build (clean failure, the rerun completes); both outputs must hold every entry once and
   agree with each other.

``data_lost`` counts answers that lost data silently: a 200 with wrong or missing tokens, a
stream that ended without its finish chunk and without an error event, a request that never got
an HTTP answer; for the pipeline, missing or duplicated entries.

The load generator, the fault injectors and the in-process reference decode are the support
package's (``support.load``, ``support.faults``, ``support.reference``), shared with
tests/test_reliability.py; the pipeline build is tests/test_pipeline_datastore.py's
(``support.datastore``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from ray import serve

from bench.common import machine_info, median, write_results
from decoding.cli import _quiet_libraries
from decoding.target import TargetModel
from index import storage
from serving.app import build_app
from support.cluster import shutdown_cluster, start_local_cluster
from support.datastore import build_cli, read_entries, write_gsm8k_corpus
from support.faults import kill_decoder_mid_stream, kill_shards_mid_request
from support.load import (LONG_METHODS, STORY, answer_ids, burst, chat_body, long_bodies, long_round, long_round_ok,
                          recovery_ms)
from support.net import free_port, wait_for
from support.processes import kv_bytes_per_token, memory
from support.reference import engine_reference
from support.s3 import S3Server

REPO = Path(__file__).resolve().parents[1]
APP = "reliability"
PROMPTS = ["What is 17 * 23?", "Name three colours.", "Say hello in French.", "What is the capital of Italy?"]


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# -- pipeline faults ----------------------------------------------------------------------------


def _entries(root: str) -> dict:
    """(doc_id, position) pairs of every entry of a datastore (local or s3://), their value tokens
    by pair, and its manifest."""
    e = read_entries(root)
    pairs = list(zip(e["doc_id"].tolist(), e["position"].tolist()))
    return {"pairs": pairs, "values": dict(zip(pairs, map(tuple, e["value"].tolist()))), "manifest": e["manifest"]}


def pipeline_faults(cluster, s3, workdir: Path, n_docs: int = 10) -> list[dict]:
    """The two pipeline faults of tests/test_pipeline_datastore.py, measured: the extraction node
    removed mid-build (a replacement joins), and the S3 server stopped mid-build (the job must
    fail cleanly, exit 2, no manifest; the rerun completes). The two outputs must each hold every
    entry exactly once and agree with each other."""
    corpus = workdir / "pairs.jsonl"
    write_gsm8k_corpus(corpus, n_docs, bad=False)
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    rows = []

    # 1. The node running the extraction actor is removed mid-build.
    out = workdir / "ds-node-kill"
    # Two CPUs per extraction node: room for the extraction actor (1 CPU) even when Ray Data puts
    # its tokenizer actor (0.25 CPU) there too (on a 1-CPU node that left the extraction actor
    # pending for minutes before any fault).
    victim = cluster.add_node(num_cpus=2, resources={"extract": 1}, dashboard_agent_listen_port=free_port())
    cluster.wait_for_nodes()
    t0 = time.time()
    proc = subprocess.Popen(build_cli(corpus, out, "--workers", "1", "--worker-resources", '{"extract": 1}'),
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    injected = False
    try:
        def extracted():
            units = out / "units"
            return units.is_dir() and any(json.loads(p.read_text()).get("phase") == "extract"
                                          for p in units.glob("*.json"))
        while time.time() - t0 < 300 and proc.poll() is None and not extracted():
            time.sleep(0.2)
        if proc.poll() is None:
            cluster.remove_node(victim, allow_graceful=False)
            injected = True
            cluster.add_node(num_cpus=2, resources={"extract": 1}, dashboard_agent_listen_port=free_port())
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    units = sorted((out / "units").glob("*.json")) if (out / "units").is_dir() else []
    nodes = {json.loads(p.read_text()).get("node") for p in units}
    # Injected for real only if extraction work had begun on the victim (and so had to move).
    injected = injected and victim.node_id in nodes
    node = {"test": "fault", "fault": "pipeline_node_kill", "requests": 0, "exit_code": proc.returncode,
            "faults_injected": int(injected), "extraction_nodes": len(nodes), "seconds": round(time.time() - t0, 1)}
    if proc.returncode != 0:
        node["error"] = err.strip().splitlines()[-1][:300] if err.strip() else None
    rows.append(node)

    # 2. The S3 server goes down mid-build for longer than the retries, then comes back.
    s3.make_bucket("outage")
    uri = "s3://outage/ds"
    t0 = time.time()
    proc = subprocess.Popen(build_cli(corpus, uri, "--workers", "1"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    injected = False
    try:
        while time.time() - t0 < 300 and proc.poll() is None:
            keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="outage").get("Contents", [])]
            if any(k.startswith("ds/units/") for k in keys):
                break
            time.sleep(0.3)
        if proc.poll() is None:
            s3.stop()
            injected = True
        _, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        if s3.proc is None:
            s3.start()
    last = err.strip().splitlines()[-1] if err.strip() else ""
    clean_failure = proc.returncode == 2 and last.startswith("error: ") and "Traceback" not in err
    s3.make_bucket("outage")
    no_manifest = not storage.exists(uri + "/manifest.json")
    rerun = subprocess.run(build_cli(corpus, uri, "--workers", "1"), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    outage = {"test": "fault", "fault": "pipeline_s3_outage", "requests": 0, "exit_code_during_outage": proc.returncode,
              "clean_failure": clean_failure, "manifest_during_outage": not no_manifest,
              "rerun_exit_code": rerun.returncode, "faults_injected": int(injected),
              "seconds": round(time.time() - t0, 1)}
    rows.append(outage)

    # Both outputs: every entry once, every document, and the same entries.
    lost = {"node": 0, "outage": 0}
    try:
        a = _entries(str(out)) if node["exit_code"] == 0 else None
        b = _entries(uri) if rerun.returncode == 0 else None
        for key, e in (("node", a), ("outage", b)):
            if e is None:
                continue
            dup = len(e["pairs"]) - len(set(e["pairs"]))
            missing = n_docs - e["manifest"]["documents"]
            lost[key] = dup + max(0, missing)
        if a is not None and b is not None:
            diff = set(a["values"].items()) ^ set(b["values"].items())
            node["entries"], outage["entries"] = len(a["pairs"]), len(b["pairs"])
            node["entries_differing_from_other_build"] = outage["entries_differing_from_other_build"] = len(diff)
            lost["node"] += len(set(b["pairs"]) - set(a["pairs"]))
            lost["outage"] += len(set(a["pairs"]) - set(b["pairs"]))
    except Exception as exc:                     # an unreadable output is lost data
        log(f"pipeline outputs unreadable: {exc}")
        lost = {"node": 1, "outage": 1}
    node["data_lost"] = lost["node"] + (node["exit_code"] != 0)
    outage["data_lost"] = lost["outage"] + (rerun.returncode != 0)
    node["faults_survived"] = int(injected and node["exit_code"] == 0 and node["data_lost"] == 0) \
        if node["faults_injected"] else 0
    outage["faults_survived"] = int(outage["faults_injected"] and clean_failure and no_manifest
                                    and rerun.returncode == 0 and outage["data_lost"] == 0)
    for r in rows:
        r.setdefault("shed", 0)
        r.setdefault("server_errors", 0)
    return rows


# -- the benchmark ------------------------------------------------------------------------------


def app_args(max_ongoing: int, max_queued: int, overload_status: int = 503) -> dict:
    return {"model": {"torch_threads": 1},
            "index": {"version": "v1", "dense": "default", "sparse": "default"},
            "speculative": {"method": "sense"},
            "sampling": {"temperature": 0.0},
            "decoder": {"num_replicas": 1, "max_ongoing_requests": max_ongoing, "max_queued_requests": max_queued,
                        "ray_actor_options": {"num_cpus": 1}, "graceful_shutdown_timeout_s": 5},
            "shards": {"num_shards": 2, "ray_actor_options": {"num_cpus": 0.25}, "search_timeout_s": 1.0,
                       "cooldown_s": 2.0},
            "ingress": {"ray_actor_options": {"num_cpus": 0.25}, "overload_status": overload_status,
                        "retry_after_s": 1}}


def start_cluster(s3_env: dict):
    """A head and one worker node (2 logical CPUs each) with the dashboard (support.cluster), the
    environment its nodes inherit set first."""
    # Exported before the nodes start: their worker processes (replicas, pipeline actors) inherit it.
    os.environ.update(s3_env)
    os.environ.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
                       "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)})
    return start_local_cluster({"head": 1}, {"worker": 1})


def deploy(args: dict, port: int) -> str:
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP, route_prefix="/")
    ok = wait_for(lambda: _healthy(url), 600, every=1.0)
    if not ok:
        raise TimeoutError("the app did not become healthy")
    return url


def _healthy(url: str) -> bool:
    try:
        h = requests.get(url + "/health", timeout=10).json()
    except Exception:
        return False
    return h.get("status") == "ok" and bool((h["decoder"].get("index") or {}).get("dense"))


def load_row(url: str, dash: str, bodies, refs, args, rnd: int) -> dict:
    mem0 = memory(dash, APP)
    res = burst(url, bodies, refs, args.requests, seconds=args.seconds, concurrency=args.concurrency)
    rec = recovery_ms(url, bodies[0], refs[0])
    time.sleep(2)                        # let requests cancelled by the client finish their cleanup
    mem1 = memory(dash, APP)
    s = res.summary()
    for ex in res.examples[:3]:
        log("   example:", ex)
    growth = (mem1["decoder"] - mem0["decoder"]) * 1024 / max(1, res.admitted)
    return {"test": "load", "round": rnd, **s, "decoder_rss_growth_kib_per_admitted": round(growth, 1), "rate_rps": round(args.requests / args.seconds, 1),
            "concurrency": args.concurrency, "max_tokens": args.max_tokens,
            "recovery_ms": round(rec, 1), "rss_mb_before": mem0["decoder"], "rss_mb_after": mem1["decoder"],
            "ingress_rss_mb_before": mem0["ingress"], "ingress_rss_mb_after": mem1["ingress"],
            "proxy_rss_mb_before": mem0["proxy"], "proxy_rss_mb_after": mem1["proxy"],
            "faults_injected": 0, "faults_survived": 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller run (600 requests, 1 round, no pipeline); "
                                                         "prints, writes nothing")
    ap.add_argument("--requests", type=int, default=1500, help="requests per load round")
    ap.add_argument("--seconds", type=float, default=30.0, help="the requests are started over this long")
    ap.add_argument("--concurrency", type=int, default=64, help="most requests in flight at once")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=200, help="requests of the warm-up burst (not measured)")
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--long-requests", type=int, default=8,
                    help="requests of the long-answer round, sent at once (0: no such round)")
    ap.add_argument("--long-tokens", type=int, default=128, help="new tokens of each long answer")
    ap.add_argument("--long-only", action="store_true",
                    help="only the long-answer round (no warm-up, load rounds or faults); prints, writes nothing")
    ap.add_argument("--max-ongoing", type=int, default=None,
                    help="decoder max_ongoing_requests (default: the served default; with batching, the batch limit)")
    ap.add_argument("--max-queued", type=int, default=None,
                    help="decoder max_queued_requests (default: the served default)")
    ap.add_argument("--decoder-kills", default="ray.kill,SIGKILL")
    ap.add_argument("--shard-kills", default="ray.kill,SIGKILL")
    ap.add_argument("--no-pipeline-faults", action="store_true")
    ap.add_argument("--write", action="store_true",
                    help="with --quick or --long-only: write the results files anyway")
    args = ap.parse_args(argv)
    from serving.config import DecoderConfig

    served = DecoderConfig()
    args.max_ongoing = served.max_ongoing_requests if args.max_ongoing is None else args.max_ongoing
    args.max_queued = served.max_queued_requests if args.max_queued is None else args.max_queued
    if args.quick:
        args.requests, args.rounds, args.warmup, args.seconds, args.no_pipeline_faults = 600, 1, 60, 15, True
    if args.long_only:
        if args.long_requests < 1:
            ap.error("--long-only needs --long-requests >= 1")
        args.rounds, args.warmup, args.decoder_kills, args.shard_kills, args.no_pipeline_faults = 0, 0, "", "", True

    _quiet_libraries()
    machine = machine_info()
    rows: list[dict] = []
    kv_kib = float("nan")
    s3 = S3Server()
    s3.start()
    t_start = time.time()
    cluster = start_cluster(s3.env)
    dash = cluster.dashboard_url
    try:
        port = free_port()
        log(f"deploying (decoder max_ongoing {args.max_ongoing}, max_queued {args.max_queued}) ...")
        app = app_args(args.max_ongoing, args.max_queued)
        url = deploy(app, port)
        bodies = [chat_body(p, args.max_tokens) for p in PROMPTS]
        refs = [answer_ids(url, b) for b in bodies]
        usage = requests.post(url + "/v1/chat/completions", json=bodies[0], timeout=120).json()["usage"]
        kv_kib = usage["total_tokens"] * kv_bytes_per_token(TargetModel.load()) / 1024
        if args.warmup:
            log(f"warm-up: {args.warmup} requests ...")
            burst(url, bodies, refs, args.warmup, seconds=max(2.0, args.warmup / 50), concurrency=args.concurrency)
        for rnd in range(args.rounds):
            log(f"load round {rnd + 1}/{args.rounds}: {args.requests} requests over {args.seconds:.0f} s, "
                f"concurrency {args.concurrency} ...")
            row = load_row(url, dash, bodies, refs, args, rnd)
            log(f"   admitted {row['admitted']} shed {row['shed']} 5xx {row['server_errors']} failed {row['failed']} "
                f"wrong {row['wrong_output']} p50 {row['admitted_p50_ms']} ms p99 {row['admitted_p99_ms']} ms, "
                f"decoder RSS {row['rss_mb_before']} -> {row['rss_mb_after']} MiB")
            rows.append(row)
        if args.long_requests:
            long = long_bodies(args.long_requests, args.long_tokens)
            log(f"long answers: {len(long)} requests of {args.long_tokens} tokens at once; references decoded "
                f"alone in process ...")
            row = long_round(url, long, engine_reference(long, app))
            log(f"   admitted {row['admitted']} shed {row['shed']} 5xx {row['server_errors']} failed {row['failed']} "
                f"wrong {row['wrong_output']}; {row['tokens_checked']} tokens checked, {row['verify_steps']} "
                f"verify steps")
            rows.append(row)

        decoder_kills = [h for h in args.decoder_kills.split(",") if h]
        shard_kills = [h for h in args.shard_kills.split(",") if h]
        if decoder_kills:
            stream_body = chat_body(STORY, 96, method="pld", stream=True)
            stream_ref = answer_ids(url, stream_body)
            plain_body = chat_body(PROMPTS[0], 24, method="pld")
            plain_ref = answer_ids(url, plain_body)
        for how in decoder_kills:
            log(f"fault: decoder replica killed mid-stream ({how}) ...")
            r = kill_decoder_mid_stream(url, dash, APP, how=how, stream_body=stream_body, stream_ref=stream_ref,
                                        plain_body=plain_body, plain_ref=plain_ref)
            r.setdefault("shed", 0)
            log("  ", r)
            rows.append(r)
            wait_for(lambda: _healthy(url), 300, every=1.0)
        if shard_kills:
            sense_body = chat_body("Natalia sold clips to 48 of her friends in April, and then she sold half as "
                                   "many clips in May. How many clips did Natalia sell altogether in April and May?",
                                   64, method="sense")
            sense_ref = answer_ids(url, sense_body)
        for how in shard_kills:
            log(f"fault: every index shard killed mid-request ({how}) ...")
            r = kill_shards_mid_request(url, dash, APP, body=sense_body, ref=sense_ref, how=how)
            r.setdefault("shed", 0)
            log("  ", r)
            rows.append(r)
            wait_for(lambda: _healthy(url), 300, every=1.0)
        serve.delete(APP)
        if not args.no_pipeline_faults:
            log("fault: pipeline extraction node removed mid-build; S3 outage mid-build ...")
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    for r in pipeline_faults(cluster, s3, Path(tmp)):
                        log("  ", r)
                        rows.append(r)
                except Exception as exc:         # recorded as a fault not survived, the rest is kept
                    log(f"   pipeline faults failed: {type(exc).__name__}: {exc}")
                    rows.append({"test": "fault", "fault": "pipeline", "requests": 0, "shed": 0, "server_errors": 0,
                                 "faults_injected": 1, "faults_survived": 0, "data_lost": 0,
                                 "error": f"{type(exc).__name__}: {exc}"[:300]})
    finally:
        shutdown_cluster(cluster)
        s3.stop()
    total_s = time.time() - t_start

    loads = [r for r in rows if r["test"] == "load"] if rows else []
    longs = [r for r in rows if r["test"] == "long_answers"]
    faults = [r for r in rows if r.get("fault")]
    summary = {"test": "total", "requests": sum(r["requests"] for r in rows), "shed": sum(r["shed"] for r in rows),
               "server_errors": sum(r["server_errors"] for r in rows),
               "faults_injected": sum(r["faults_injected"] for r in rows),
               "faults_survived": sum(r["faults_survived"] for r in rows),
               "data_lost": sum(r["data_lost"] for r in rows),
               "admitted_p50_ms_median": median([r["admitted_p50_ms"] for r in loads]),
               "admitted_p99_ms_median": median([r["admitted_p99_ms"] for r in loads]),
               "rss_mb_before": loads[0]["rss_mb_before"] if loads else None,
               "rss_mb_after": loads[-1]["rss_mb_after"] if loads else None,
               "admitted": sum(r["admitted"] for r in loads),
               "long_answers_checked": sum(r["admitted"] for r in longs),
               "kv_cache_kib_per_request": round(kv_kib, 1),
               "seconds": round(total_s, 1)}
    rows.append(summary)
    md = markdown(machine, args, loads, faults, summary, longs)
    print(md)
    if (not args.quick and not args.long_only) or args.write:
        path = write_results("reliability", machine, rows, md, extra={"config": vars(args)})
        log(f"wrote {path}")
    ok = summary["data_lost"] == 0 and summary["faults_survived"] == summary["faults_injected"] \
        and summary["server_errors"] == 0 and long_round_ok(longs, args.long_requests)
    return 0 if ok else 1


def markdown(machine, args, loads, faults, summary, longs=()) -> str:
    md = [f"# Reliability benchmark{' (quick run)' if args.quick else ''}\n",
          f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine['device']}; "
          f"embedded SmolLM2-135M-Instruct, local Ray cluster (head + 1 worker node). One decoder replica "
          f"(continuous batching, max_ongoing_requests {args.max_ongoing}, max_queued_requests {args.max_queued}), "
          f"two index shards, SENSE (adaptive budget), greedy. Total {summary['seconds']:.0f} s.\n"]
    only_long = args.long_only
    if only_long:
        md += ["Long-answer round only (--long-only): no load rounds, no faults."]
    else:
        md += ["## Load\n",
               f"{args.requests} requests per round ({args.max_tokens} new tokens each) started over "
               f"{args.seconds:.0f} s with up to {args.concurrency} in flight, after a {args.warmup}-request warm-up. "
               "Admitted answers are checked token for token; shed = 503/429 with Retry-After; latency of admitted "
               "requests; RSS in MiB of the decoder replica, the ingress replica and the HTTP proxies before -> "
               "after the round.\n",
               "| round | requests | admitted | shed | 5xx (not shed) | no answer | wrong output | p50 ms | p99 ms | "
               "recovery ms | decoder RSS | ingress RSS | proxy RSS |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['round'] + 1} | {r['requests']} | {r['admitted']} | {r['shed']} | {r['server_errors']} | "
           f"{r['failed']} | {r['wrong_output']} | {r['admitted_p50_ms']:.0f} | {r['admitted_p99_ms']:.0f} | "
           f"{r['recovery_ms']:.0f} | {r['rss_mb_before']:.0f} -> {r['rss_mb_after']:.0f} | "
           f"{r['ingress_rss_mb_before']:.0f} -> {r['ingress_rss_mb_after']:.0f} | "
           f"{r['proxy_rss_mb_before']:.0f} -> {r['proxy_rss_mb_after']:.0f} |" for r in loads]
    if loads:
        grown = loads[-1]["rss_mb_after"] - loads[0]["rss_mb_before"]
        md += ["", f"Decoder RSS: {loads[0]['rss_mb_before']:.0f} -> {loads[-1]['rss_mb_after']:.0f} MiB over "
                   f"{summary['admitted']} admitted requests ({1024 * grown / max(1, summary['admitted']):.1f} KiB "
                   f"each); a KV cache kept per request would add {summary['kv_cache_kib_per_request']:.0f} KiB each. "
                   f"Admitted latency, median over rounds: p50 {summary['admitted_p50_ms_median']:.0f} ms, "
                   f"p99 {summary['admitted_p99_ms_median']:.0f} ms."]
    if longs:
        md += ["", "## Long answers\n",
               f"{args.long_requests} requests of {args.long_tokens} new tokens each ({', '.join(LONG_METHODS)}, "
               "greedy, ignore_eos) sent at once; every admitted answer checked token for token against the same "
               "request decoded alone by the engine in process.\n",
               "| requests | admitted | shed | 5xx (not shed) | no answer | wrong output | tokens checked "
               "| verify steps | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['requests']} | {r['admitted']} | {r['shed']} | {r['server_errors']} | {r['failed']} | "
               f"{r['wrong_output']} | {r['tokens_checked']} | {r['verify_steps']} | {r['admitted_p50_ms']:.0f} | "
               f"{r['admitted_p99_ms']:.0f} |" for r in longs]
    if not only_long:
        md += ["", "## Faults\n",
               "| fault | how | requests | complete | clean errors | 5xx (not clean) | data lost | survived | detail |",
               "|---|---|---|---|---|---|---|---|---|"]
    for r in faults:
        if r["fault"] == "decoder_kill":
            detail = f"stream: {r['stream']} ({r['stream_error']}); replaced in {r['replaced_s']} s"
        elif r["fault"] == "shard_kill":
            detail = (f"{r['shards_killed']} shards; fallback {r['fallback']} from step {r['fallback_from_step']}; "
                      f"index back in {r['recovered_s']} s")
        elif r["fault"] == "pipeline_node_kill":
            detail = (f"exit {r['exit_code']}, {r.get('entries', '?')} entries, "
                      f"{r.get('entries_differing_from_other_build', '?')} differing from the S3 build; {r['seconds']} s")
        elif r.get("error"):
            detail = f"failed: {r['error']}"
        else:
            detail = (f"exit {r['exit_code_during_outage']} during the outage (clean: {r['clean_failure']}, "
                      f"manifest: {r['manifest_during_outage']}), rerun exit {r['rerun_exit_code']}; {r['seconds']} s")
        md.append(f"| {r['fault']} | {r.get('how', '-')} | {r['requests']} | {r.get('complete', '-')} | "
                  f"{r.get('clean_errors', '-')} | {r['server_errors']} | {r['data_lost']} | "
                  f"{r['faults_survived']}/{r['faults_injected']} | {detail} |")
    md += ["", f"**Total**: {summary['requests']} requests, {summary['shed']} shed, {summary['server_errors']} "
               f"server errors, faults {summary['faults_survived']}/{summary['faults_injected']} survived, "
               f"data lost {summary['data_lost']}"
               + (f"; long answers checked token for token: {summary['long_answers_checked']}." if longs else ".")]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
