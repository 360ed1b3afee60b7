"""Fault injection on a served app: the decoder replica or every index shard killed while
requests are in flight, and the verdict on each request (complete, clean error, or lost)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import ray
import requests

from support.net import wait_for
from support.processes import serve_processes


def stream_request(url: str, body: dict, out: dict, started: threading.Event, min_chunks: int = 3) -> None:
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


def plain_request(url: str, body: dict, out: dict) -> None:
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


def kill_actor(name: str, pid: int, how: str) -> None:
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
    threads = [threading.Thread(target=stream_request, args=(url, stream_body, stream_out, started))]
    plain_outs = [{} for _ in range(others)]
    threads += [threading.Thread(target=plain_request, args=(url, plain_body, o)) for o in plain_outs]
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
    t = threading.Thread(target=stream_request, args=(url, body, out, started, 1))
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
