"""Reliability benchmark: load shedding, memory and injected faults, on a local Ray cluster.

    python -m bench.reliability              # writes bench/results/reliability.{json,md}
    python -m bench.reliability --quick      # a smaller run: prints, writes nothing
    python -m bench.reliability --no-pipeline-faults   # serving only (~5 min less)
    python -m bench.reliability --quick --long-only    # only the long-answer round

The served app (started here on a 2-node local Ray cluster: a head and one worker node): one
decoder replica admitting ``max_ongoing_requests`` + ``max_queued_requests`` requests, two index
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

The helpers (``burst``, ``serve_processes``, ``rss_mb``, ``kill_decoder_mid_stream``,
``kill_shards_mid_request``, ``engine_reference``, ``long_round``) are used by
tests/test_reliability.py too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bench.common import machine_info, median, write_results

REPO = Path(__file__).resolve().parents[1]
APP = "reliability"
PROMPTS = ["What is 17 * 23?", "Name three colours.", "Say hello in French.", "What is the capital of Italy?"]
STORY = "Write a very long story about a dragon who learns to bake bread."
# Long answers (ignore_eos: every one runs its full --long-tokens), alternately SENSE and PLD.
LONG_PROMPTS = [STORY,
                "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May? Explain every step.",
                "Explain in detail how a bill becomes a law.",
                "Repeat this sentence ten times: the quick brown fox jumps over the lazy dog.",
                "Write a Python function that sorts a list of numbers, and explain how it works.",
                "Describe the water cycle to a ten-year-old."]
LONG_METHODS = ("sense", "pld")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_body(text: str, max_tokens: int, *, method: str = "sense", budget: int = 4, stream: bool = False) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream,
            "speculative": {"method": method, "budget": budget, "return_token_ids": True}}


def answer_ids(url: str, body: dict, timeout: float = 300) -> list[int]:
    """The token ids of one non-streamed answer (the reference for later checks)."""
    r = requests.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=timeout)
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


# -- processes and memory -----------------------------------------------------------------------


def serve_processes(dashboard_url: str, app: str) -> dict[str, list[dict]]:
    """Alive Serve actors of `app` by role ("Decoder", "Ingress", "IndexShard0", ..., "proxy"),
    each {"name", "pid", "node_id"}, from Ray's state API on this cluster's dashboard (the address
    is explicit: another local cluster must never be picked up)."""
    from ray.util.state import list_actors

    out: dict[str, list[dict]] = {}
    prefix = f"ServeReplica:{app}:"
    for a in list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], detail=True, limit=10000,
                         raise_on_missing_output=False):
        cls = a["class_name"] or ""
        role = cls[len(prefix):] if cls.startswith(prefix) else "proxy" if cls == "ProxyActor" else None
        if role is not None and a.get("pid"):
            out.setdefault(role, []).append({"name": a["name"], "pid": a["pid"], "node_id": a.get("node_id")})
    return out


def rss_mb(pids: list[int]) -> float:
    """Resident memory of these processes together, in MiB (a process gone counts 0)."""
    import psutil

    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def memory(dashboard_url: str, app: str) -> dict[str, float]:
    procs = serve_processes(dashboard_url, app)
    return {"decoder": rss_mb([p["pid"] for p in procs.get("Decoder", [])]),
            "ingress": rss_mb([p["pid"] for p in procs.get("Ingress", [])]),
            "proxy": rss_mb([p["pid"] for p in procs.get("proxy", [])])}


def kv_bytes_per_token(target) -> int:
    """Bytes of KV cache one token costs the target model (keys and values, every layer)."""
    cfg = target.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * 4


# -- load ---------------------------------------------------------------------------------------


@dataclass
class BurstResult:
    requests: int
    admitted: int = 0
    shed: int = 0
    shed_without_retry_after: int = 0
    server_errors: int = 0
    client_errors: int = 0
    failed: int = 0                      # no HTTP answer (connection error, timeout)
    wrong_output: int = 0                # a 200 whose tokens differ from the reference
    tokens_checked: int = 0              # answer tokens compared with the reference (admitted answers)
    verify_steps: int = 0                # verify steps of the admitted answers (their statistics)
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    shed_latencies_ms: list[float] = field(default_factory=list, repr=False)
    statuses: dict = field(default_factory=dict)
    examples: list = field(default_factory=list, repr=False)

    @property
    def data_lost(self) -> int:
        return self.wrong_output + self.failed

    def summary(self) -> dict:
        return {"requests": self.requests, "admitted": self.admitted, "shed": self.shed,
                "shed_without_retry_after": self.shed_without_retry_after, "server_errors": self.server_errors,
                "client_errors": self.client_errors, "failed": self.failed, "wrong_output": self.wrong_output,
                "data_lost": self.data_lost, "statuses": dict(sorted(self.statuses.items())),
                "tokens_checked": self.tokens_checked, "verify_steps": self.verify_steps,
                "wall_s": round(self.wall_s, 2),
                "admitted_p50_ms": round(pct(self.latencies_ms, 50), 1),
                "admitted_p99_ms": round(pct(self.latencies_ms, 99), 1),
                "admitted_max_ms": round(max(self.latencies_ms), 1) if self.latencies_ms else None,
                "shed_p50_ms": round(pct(self.shed_latencies_ms, 50), 1),
                "shed_p99_ms": round(pct(self.shed_latencies_ms, 99), 1)}


async def _burst(url: str, bodies: list[dict], refs: list[list[int]], n: int, rate: float, concurrency: int,
                 timeout: float) -> BurstResult:
    import aiohttp

    res = BurstResult(requests=n)
    sem = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    path = url + "/v1/chat/completions"

    def classify(i: int, status: int, headers, data: bytes, ms: float) -> None:
        res.statuses[str(status)] = res.statuses.get(str(status), 0) + 1
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        if status == 200:
            res.admitted += 1
            res.latencies_ms.append(ms)
            ref = refs[i % len(refs)]
            ok = isinstance(body, dict) and body["choices"][0].get("token_ids") == ref
            res.tokens_checked += len(ref)
            if isinstance(body, dict):
                res.verify_steps += int((body.get("speculative") or {}).get("steps") or 0)
            if not ok:
                res.wrong_output += 1
                res.examples.append(("wrong", data[:300]))
        elif status in (429, 503) and isinstance(body, dict) and (body.get("error") or {}).get("code") == "overloaded":
            res.shed += 1
            res.shed_latencies_ms.append(ms)
            if not headers.get("Retry-After"):
                res.shed_without_retry_after += 1
        elif status >= 500:
            res.server_errors += 1
            res.examples.append((status, data[:300]))
        else:
            res.client_errors += 1
            res.examples.append((status, data[:300]))

    async def one(session, i: int, start_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - loop.time()))
        async with sem:
            t0 = time.perf_counter()
            try:
                async with session.post(path, json=bodies[i % len(bodies)]) as r:
                    data = await r.read()
                    classify(i, r.status, r.headers, data, 1e3 * (time.perf_counter() - t0))
            except Exception as exc:     # no HTTP answer at all
                res.failed += 1
                res.examples.append(("failed", f"{type(exc).__name__}: {exc}"[:300]))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        t0 = loop.time()
        start = time.perf_counter()
        await asyncio.gather(*(one(session, i, t0 + i / rate) for i in range(n)))
        res.wall_s = time.perf_counter() - start
    return res


def burst(url: str, bodies: list[dict], refs: list[list[int]], n: int, *, seconds: float, concurrency: int,
          timeout: float = 120) -> BurstResult:
    """`n` requests (cycling through `bodies`, whose greedy answers are `refs`) started at a fixed
    rate over `seconds`, at most `concurrency` in flight; every answer classified."""
    return asyncio.run(_burst(url, bodies, refs, n, n / max(seconds, 1e-3), concurrency, timeout))


def recovery_ms(url: str, body: dict, ref: list[int], timeout: float = 60) -> float:
    """Time for one normal request to be answered correctly right after a burst (retrying on
    a shed answer as a client honouring Retry-After would); NaN if it never is."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        r = requests.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=timeout)
        if r.status_code == 200:
            return 1e3 * (time.perf_counter() - t0) if r.json()["choices"][0]["token_ids"] == ref else float("nan")
        time.sleep(float(r.headers.get("Retry-After", 1)))
    return float("nan")


# -- long answers -------------------------------------------------------------------------------


def long_bodies(n: int, max_tokens: int) -> list[dict]:
    """`n` chat bodies for long answers: LONG_PROMPTS in turn, methods alternating."""
    return [chat_body(LONG_PROMPTS[i % len(LONG_PROMPTS)], max_tokens, method=LONG_METHODS[i % len(LONG_METHODS)])
            for i in range(n)]


def engine_reference(bodies: list[dict], app: dict) -> list[list[int]]:
    """Each chat body decoded alone by the engine in this process, as the app `app` (its args)
    would decode it: the request parsed by the server's protocol, the prompt encoded by the
    decoder's own code, the app's model, dtype and torch threads, its index version loaded whole.
    Greedy and strictly verified, a served answer must equal this token for token whatever was
    drafted, sharded or run beside it."""
    import torch

    from decoding.engine import generate
    from decoding.methods import NEEDS_DENSE, NEEDS_SPARSE, Datastores, make_drafter
    from decoding.target import TargetModel
    from serving import protocol
    from serving.config import ServingConfig
    from serving.decoder import Decoder, _resolve_device
    from serving.index_data import load_dense, load_sparse

    cfg = ServingConfig.from_args(app)
    threads = torch.get_num_threads()
    if cfg.model.torch_threads:
        torch.set_num_threads(cfg.model.torch_threads)
    try:
        device, dtype = _resolve_device(cfg.model)
        target = TargetModel.load(cfg.model.path, dtype=dtype, device=device)
        decoder = type("Alone", (), {"model": target, "target": target})()     # what _encode uses
        stores = None
        refs = []
        for body in bodies:
            req = protocol.chat_request(protocol.parse(protocol.ChatRequest, json.dumps(
                {**body, "stream": False}).encode()), cfg)
            if not isinstance(req.budget, int):
                raise ValueError("the reference needs a fixed speculative budget")
            if stores is None and (req.method in NEEDS_SPARSE or req.method in NEEDS_DENSE):
                stores = Datastores(sparse=load_sparse(cfg.index, target), dense=load_dense(cfg.index, target))
            ids = Decoder.func_or_class._encode(decoder, req)
            r = generate(target, ids, params=req.params, drafter=make_drafter(req.method, stores), budget=req.budget,
                         soft=req.soft)
            refs.append(list(r.token_ids))
    finally:
        torch.set_num_threads(threads)
    return refs


def long_round(url: str, bodies: list[dict], refs: list[list[int]], *, timeout: float = 900) -> dict:
    """The long-answer round: every body sent at once (each its own connection), every admitted
    answer checked token for token against its reference (`refs`, from ``engine_reference``)."""
    res = burst(url, bodies, refs, len(bodies), seconds=0.5, concurrency=len(bodies), timeout=timeout)
    for ex in res.examples[:3]:
        log("   example:", ex)
    return {"test": "long_answers", **res.summary(), "max_tokens": max((b["max_tokens"] for b in bodies), default=0),
            "methods": sorted({b["speculative"]["method"] for b in bodies}),
            "faults_injected": 0, "faults_survived": 0}


# -- faults -------------------------------------------------------------------------------------


def _stream_request(url: str, body: dict, out: dict, started: threading.Event, min_chunks: int = 3) -> None:
    """Stream `body`; set `started` once `min_chunks` token chunks arrived; leave the outcome in `out`."""
    ids: list[int] = []
    finish = error = spec = None
    done = False
    try:
        with requests.post(url + "/v1/chat/completions", json={**body, "stream": True}, stream=True,
                           timeout=(10, 120)) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                out.update(outcome="http_error", retry_after=r.headers.get("Retry-After"), body=r.text[:300])
                return
            chunks = 0
            for line in r.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: "):]
                if data == b"[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                if "error" in ev:
                    error = ev["error"]
                    continue
                for c in ev.get("choices") or []:
                    if c.get("token_ids"):
                        ids += c["token_ids"]
                        chunks += 1
                    finish = c.get("finish_reason") or finish
                spec = ev.get("speculative") or spec
                if chunks >= min_chunks:
                    started.set()
    except requests.RequestException as exc:
        error = error or {"code": "connection", "message": type(exc).__name__}
    finally:
        started.set()
    outcome = "complete" if finish and done and not error else "error" if error and done else "truncated"
    out.update(outcome=outcome, ids=ids, finish_reason=finish, error=error, spec=spec)


def _plain_request(url: str, body: dict, out: dict) -> None:
    try:
        r = requests.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=(10, 180))
        out.update(status=r.status_code, retry_after=r.headers.get("Retry-After"))
        if r.status_code == 200:
            out.update(outcome="complete", ids=r.json()["choices"][0]["token_ids"])
        else:
            out.update(outcome="http_error", error=(r.json() if r.headers.get("content-type", "").startswith(
                "application/json") else {}).get("error"))
    except requests.RequestException as exc:
        out.update(outcome="failed", error={"message": type(exc).__name__})


def judge(out: dict, ref: list[int]) -> str:
    """"complete" (right tokens), "clean_error" (a 5xx with Retry-After, a 429, or an error event
    then [DONE]), "server_error" (a 5xx without Retry-After) or "lost" (a 200 with wrong tokens, a
    silently truncated stream, no answer at all)."""
    kind = out.get("outcome")
    if kind == "complete":
        return "complete" if out.get("ids") == ref else "lost"
    if kind == "error":
        return "clean_error"
    if kind == "http_error":
        status = out.get("status", 0)
        if status in (429, 503) and out.get("retry_after"):
            return "clean_error"
        return "server_error" if status >= 500 else "clean_error"
    return "lost"


def wait_for(cond, timeout: float, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    return None


def kill_actor(name: str, pid: int, how: str) -> None:
    import ray

    if how == "ray.kill":
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    else:
        os.kill(pid, signal.SIGKILL)


def kill_decoder_mid_stream(url: str, dashboard_url: str, app: str, *, how: str, stream_body: dict,
                            stream_ref: list[int], plain_body: dict, plain_ref: list[int], others: int = 3,
                            replace_timeout: float = 180) -> dict:
    """Kill the decoder replica (`how`: "ray.kill" or "SIGKILL" of its worker process) while one
    request streams and `others` plain ones are in flight or queued. Returns each request's
    outcome, whether the replica was replaced (a new one RUNNING and a request answered) and
    how long that took."""
    before = serve_processes(dashboard_url, app).get("Decoder", [])
    assert len(before) == 1, f"expected one decoder replica, found {before}"
    victim = before[0]
    stream_out: dict = {}
    started = threading.Event()
    threads = [threading.Thread(target=_stream_request, args=(url, stream_body, stream_out, started))]
    plain_outs = [{} for _ in range(others)]
    threads += [threading.Thread(target=_plain_request, args=(url, plain_body, o)) for o in plain_outs]
    for t in threads:
        t.start()
    started.wait(120)
    time.sleep(0.2)
    t_kill = time.time()
    kill_actor(victim["name"], victim["pid"], how)
    for t in threads:
        t.join(300)
    verdicts = [judge(stream_out, stream_ref)] + [judge(o, plain_ref) for o in plain_outs]

    def replaced():
        now = serve_processes(dashboard_url, app).get("Decoder", [])
        if not now or any(p["name"] == victim["name"] for p in now):
            return None
        try:
            r = requests.post(url + "/v1/chat/completions", json={**plain_body, "stream": False}, timeout=60)
        except requests.RequestException:
            return None
        return r.status_code == 200 and r.json()["choices"][0]["token_ids"] == plain_ref

    ok = bool(wait_for(replaced, replace_timeout, every=1.0))
    return {"test": "fault", "fault": "decoder_kill", "how": how, "requests": len(verdicts),
            "complete": verdicts.count("complete"), "clean_errors": verdicts.count("clean_error"),
            "server_errors": verdicts.count("server_error"), "data_lost": verdicts.count("lost"),
            "stream": stream_out.get("outcome"), "stream_error": (stream_out.get("error") or {}).get("code"),
            "stream_tokens_before_error": len(stream_out.get("ids") or []),
            "plain": [o.get("status") for o in plain_outs],
            "replaced": ok, "replaced_s": round(time.time() - t_kill, 1) if ok else None,
            "faults_injected": 1, "faults_survived": int(ok and "lost" not in verdicts)}


def kill_shards_mid_request(url: str, dashboard_url: str, app: str, *, body: dict, ref: list[int],
                            how: str = "ray.kill", recover_timeout: float = 180) -> dict:
    """Kill every index shard replica while a SENSE request streams: it must complete with the
    reference tokens by PLD fallback (its statistics say so); then a later request must use the
    index again (no fallback, searches answered by every shard)."""
    shards = [p for role, ps in serve_processes(dashboard_url, app).items() if role.startswith("IndexShard")
              for p in ps]
    assert shards, "no index shard replicas"
    out: dict = {}
    started = threading.Event()
    t = threading.Thread(target=_stream_request, args=(url, body, out, started, 1))
    t.start()
    started.wait(120)
    t_kill = time.time()
    for p in shards:
        kill_actor(p["name"], p["pid"], how)
    t.join(300)
    verdict = judge(out, ref)
    spec = out.get("spec") or {}
    fallback = spec.get("fallback")

    def recovered():
        try:
            r = requests.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
        except requests.RequestException:
            return None
        if r.status_code != 200:
            return None
        s = r.json()["speculative"]
        idx = s.get("index") or {}
        good = r.json()["choices"][0]["token_ids"] == ref
        return good and s.get("fallback") is None and idx.get("searches", 0) > 0 and idx.get("partial_searches") == 0

    ok = bool(wait_for(recovered, recover_timeout, every=1.0))
    survived = verdict == "complete" and fallback is not None and ok
    return {"test": "fault", "fault": "shard_kill", "how": how, "shards_killed": len(shards), "requests": 1,
            "complete": int(verdict == "complete"), "clean_errors": int(verdict == "clean_error"),
            "server_errors": int(verdict == "server_error"), "data_lost": int(verdict == "lost"),
            "fallback": (fallback or {}).get("method"), "fallback_from_step": (fallback or {}).get("from_step"),
            "recovered": ok, "recovered_s": round(time.time() - t_kill, 1) if ok else None,
            "faults_injected": 1, "faults_survived": int(survived)}


# -- pipeline faults ----------------------------------------------------------------------------


def _pipeline_cli(corpus: Path, out: str, *extra: str) -> list[str]:
    """The datastore build of tests/test_pipeline_datastore.py (same small settings)."""
    return [sys.executable, "-m", "pipelines.build_datastore", "--corpus", f"gsm={corpus}", "--prompt-field",
            "question", "--response-field", "answer", "--output", out, "--dim", "32", "--value-len", "8",
            "--split-mb", str(2048 / (1 << 20)), "--sample-rows", "200", "--workers", "1", *extra]


def _entries(root: str) -> dict:
    """(doc_id, position) -> value tokens of every entry of a datastore (local or s3://)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from index import storage

    manifest = json.loads(storage.read_bytes(storage.join(root, "manifest.json")))
    tables = []
    for shard in manifest["shards"]:
        fs, path = storage.open_fs(storage.join(root, shard["path"]))
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=["doc_id", "position", "value"]))
    t = pa.concat_tables(tables)
    pairs = list(zip(t.column("doc_id").to_pylist(), t.column("position").to_pylist()))
    values = t.column("value").to_pylist()
    return {"pairs": pairs, "values": dict(zip(pairs, map(tuple, values))), "manifest": manifest}


def pipeline_faults(cluster, s3, workdir: Path, n_docs: int = 10) -> list[dict]:
    """The two pipeline faults of tests/test_pipeline_datastore.py, measured: the extraction node
    removed mid-build (a replacement joins), and the S3 server stopped mid-build (the job must
    fail cleanly, exit 2, no manifest; the rerun completes). The two outputs must each hold every
    entry exactly once and agree with each other."""
    import subprocess

    import boto3

    from index import storage
    from index.corpus import gsm8k, gsm8k_answer_text

    corpus = workdir / "pairs.jsonl"
    with corpus.open("w") as f:
        for r in gsm8k("train")[:n_docs]:
            f.write(json.dumps({"question": r["question"], "answer": gsm8k_answer_text(r["answer"])}) + "\n")
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
    proc = subprocess.Popen(_pipeline_cli(corpus, str(out), "--worker-resources", '{"extract": 1}'), cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
    def client():
        return boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    s3.make_bucket("outage")
    uri = "s3://outage/ds"
    t0 = time.time()
    proc = subprocess.Popen(_pipeline_cli(corpus, uri), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    injected = False
    try:
        while time.time() - t0 < 300 and proc.poll() is None:
            keys = [o["Key"] for o in client().list_objects_v2(Bucket="outage").get("Contents", [])]
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
    rerun = subprocess.run(_pipeline_cli(corpus, uri), cwd=REPO, env=env, capture_output=True, text=True,
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
            "speculative": {"method": "sense", "budget": 4},
            "sampling": {"temperature": 0.0},
            "decoder": {"num_replicas": 1, "max_ongoing_requests": max_ongoing, "max_queued_requests": max_queued,
                        "ray_actor_options": {"num_cpus": 1}, "graceful_shutdown_timeout_s": 5},
            "shards": {"num_shards": 2, "ray_actor_options": {"num_cpus": 0.25}, "search_timeout_s": 1.0,
                       "cooldown_s": 2.0},
            "ingress": {"ray_actor_options": {"num_cpus": 0.25}, "overload_status": overload_status,
                        "retry_after_s": 1}}


def start_cluster(s3_env: dict):
    """A head and one worker node (2 logical CPUs each) with the dashboard, as tests/conftest.py."""
    import ray
    from ray.cluster_utils import Cluster

    port = free_port()
    # Exported before the nodes start: their worker processes (replicas, pipeline actors) inherit it.
    os.environ.update(s3_env)
    os.environ.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
                       "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)})
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_port": port, "resources": {"head": 1},
        "dashboard_agent_listen_port": free_port()})
    cluster.add_node(num_cpus=2, resources={"worker": 1}, dashboard_agent_listen_port=free_port())
    cluster.wait_for_nodes()
    cluster.dashboard_url = f"http://127.0.0.1:{port}"
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    return cluster


def deploy(args: dict, port: int) -> str:
    from ray import serve

    from serving.app import build_app

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
    ap.add_argument("--long-requests", type=int, default=6,
                    help="requests of the long-answer round, sent at once (0: no such round)")
    ap.add_argument("--long-tokens", type=int, default=128, help="new tokens of each long answer")
    ap.add_argument("--long-only", action="store_true",
                    help="only the long-answer round (no warm-up, load rounds or faults); prints, writes nothing")
    ap.add_argument("--max-ongoing", type=int, default=2, help="decoder max_ongoing_requests")
    ap.add_argument("--max-queued", type=int, default=4, help="decoder max_queued_requests")
    ap.add_argument("--decoder-kills", default="ray.kill,SIGKILL")
    ap.add_argument("--shard-kills", default="ray.kill,SIGKILL")
    ap.add_argument("--no-pipeline-faults", action="store_true")
    ap.add_argument("--write", action="store_true",
                    help="with --quick or --long-only: write the results files anyway")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.rounds, args.warmup, args.seconds, args.no_pipeline_faults = 600, 1, 60, 15, True
    if args.long_only:
        if args.long_requests < 1:
            ap.error("--long-only needs --long-requests >= 1")
        args.rounds, args.warmup, args.decoder_kills, args.shard_kills, args.no_pipeline_faults = 0, 0, "", "", True

    from decoding.cli import _quiet_libraries

    _quiet_libraries()
    import ray
    from ray import serve

    from tests.conftest import S3Server

    from decoding.target import TargetModel

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
                                   64, method="sense", budget=4)
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
            import tempfile

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
        try:
            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        cluster.shutdown()
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


def long_round_ok(longs: list[dict], planned: int) -> bool:
    """The long-answer round ran (when planned), admitted answers, and every one was right."""
    if not planned:
        return True
    return len(longs) == 1 and longs[0]["admitted"] > 0 and longs[0]["wrong_output"] == 0 \
        and longs[0]["failed"] == 0 and longs[0]["server_errors"] == 0


def markdown(machine, args, loads, faults, summary, longs=()) -> str:
    md = [f"# Reliability benchmark{' (quick run)' if args.quick else ''}\n",
          f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine['device']}; "
          f"embedded SmolLM2-135M-Instruct, local Ray cluster (head + 1 worker node). One decoder replica "
          f"(max_ongoing_requests {args.max_ongoing}, max_queued_requests {args.max_queued}), two index shards, "
          f"SENSE (budget 4), greedy. Total {summary['seconds']:.0f} s.\n"]
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
