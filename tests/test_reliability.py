"""Load and faults over real HTTP on the shared 2-node Ray cluster (the app of test_serving.py,
with one decoder replica and a small admission limit).

- Overload: a burst far past the decoder's ``max_ongoing_requests + max_queued_requests`` is
  shed with 503 + Retry-After (never another 5xx, never a lost or wrong answer), admitted
  requests keep a bounded latency, a normal request succeeds right after, and the decoder
  replica's resident memory does not grow by anything like a KV cache per request.
- A decoder replica killed mid-stream (``ray.kill`` and SIGKILL of its process): the stream ends
  with an error event then ``[DONE]`` (never a truncated stream that looks complete), the other
  requests complete or get a 503 with Retry-After, and Serve replaces the replica.
- Every index shard killed mid-request: the request completes with the same tokens by PLD
  fallback, and once Serve has replaced the shards a later request uses the index again.

The load generator and the fault injectors (``support``) are those of ``python -m bench.reliability``.
"""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
import requests

from support.faults import kill_decoder_mid_stream, kill_shards_mid_request
from support.load import answer_ids, burst, chat_body, long_bodies, long_round, long_round_ok, recovery_ms
from support.processes import kv_bytes_per_token, memory
from support.reference import engine_reference
from tests.test_serving import APP, QUESTIONS, app_args, start_server, stores, wait_app_running  # noqa: F401

MAX_ONGOING, MAX_QUEUED = 2, 4


@pytest.fixture(scope="module")
def server(ray_cluster, stores):  # noqa: F811
    from ray import serve

    args = app_args(stores)
    args["decoder"] = {"num_replicas": 1, "max_ongoing_requests": MAX_ONGOING, "max_queued_requests": MAX_QUEUED,
                       "ray_actor_options": {"num_cpus": 1}, "graceful_shutdown_timeout_s": 5}
    srv = start_server(ray_cluster, args)
    srv.dashboard_url = ray_cluster.dashboard_url
    yield srv
    serve.delete(APP)


@pytest.mark.slow
def test_overload_is_shed_latency_stays_bounded_and_memory_flat(server, target):
    url, dash = server.url, server.dashboard_url
    # Two GSM8K questions per prompt (~130 tokens): a KV cache leaked per request would be large.
    bodies = [chat_body(f"{a} {b}", 2, budget=8) for a, b in (QUESTIONS, QUESTIONS[::-1])]
    refs = [answer_ids(url, b) for b in bodies]
    t0 = time.perf_counter()
    alone = answer_ids(url, bodies[0])
    alone_ms = 1e3 * (time.perf_counter() - t0)
    assert alone == refs[0]
    burst(url, bodies, refs, 40, seconds=2, concurrency=16)            # warm-up: threads, allocator pools
    before = memory(dash, APP)
    # 100 requests a second: past what the replica answers even with every prompt kept by the
    # prefix cache (30 a second over 10 s, as before, was all admitted on a fast VM: nothing shed).
    res = burst(url, bodies, refs, 300, seconds=3, concurrency=48)
    rec_ms = recovery_ms(url, bodies[0], refs[0])
    time.sleep(1)
    after = memory(dash, APP)
    s = res.summary()
    print(f"\nburst {s}\nalone {alone_ms:.0f} ms, recovery {rec_ms:.0f} ms, RSS MiB {before} -> {after}")

    assert res.failed == 0 and res.wrong_output == 0, res.examples[:3]          # nothing lost
    assert res.server_errors == 0 and res.client_errors == 0, res.examples[:3]  # shed or answered, nothing else
    assert res.shed > 0 and res.admitted > 0, s
    assert res.shed_without_retry_after == 0
    # Admitted requests wait behind at most max_ongoing + queued_in_replica + max_queued others, so
    # (Little's law) their latency is about slots / throughput; an unbounded queue would make the
    # last of 300 wait for nearly all the others.
    from serving.config import DecoderConfig

    slots = MAX_ONGOING + DecoderConfig().queued_in_replica + MAX_QUEUED
    per_request_ms = 1e3 * res.wall_s / res.admitted
    assert s["admitted_p99_ms"] < max(5000.0, 2.5 * slots * per_request_ms + 1000), (s, per_request_ms)
    assert rec_ms < 10_000                                                      # recovers at once
    # A KV cache kept per admitted request would add this much; the decoder grew far less.
    prompt_tokens = requests.post(url + "/v1/chat/completions", json=bodies[0], timeout=60).json()["usage"][
        "prompt_tokens"]
    leak_mb = res.admitted * (prompt_tokens + 2) * kv_bytes_per_token(target) / 2**20
    assert leak_mb > 40, "the burst admitted too few requests for the memory check to mean anything"
    assert after["decoder"] - before["decoder"] < leak_mb / 4, (before, after, leak_mb)
    assert after["ingress"] - before["ingress"] < 64 and after["proxy"] - before["proxy"] < 64, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_decoder_killed_mid_stream_is_a_clean_error_and_replaced(server, how):
    url = server.url
    wait_app_running(url, 180)
    stream_body = chat_body("Write a very long story about a dragon.", 128, method="pld", stream=True)
    plain_body = chat_body(QUESTIONS[1], 16, method="pld")
    r = kill_decoder_mid_stream(url, server.dashboard_url, APP, how=how, stream_body=stream_body,
                                stream_ref=answer_ids(url, stream_body), plain_body=plain_body,
                                plain_ref=answer_ids(url, plain_body))
    print("\n", r)
    assert r["data_lost"] == 0 and r["server_errors"] == 0, r
    assert r["stream"] == "error" and r["stream_error"] == "replica_failed", r    # not truncated, not 500
    assert r["stream_tokens_before_error"] > 0
    assert all(s in (200, 503) for s in r["plain"]), r
    assert r["replaced"], r
    wait_app_running(url, 180)


@pytest.mark.slow
def test_shards_killed_fall_back_then_the_index_returns(server):
    url = server.url
    wait_app_running(url, 180)
    body = chat_body(QUESTIONS[0], 48, method="sense", budget=8)
    r = kill_shards_mid_request(url, server.dashboard_url, APP, body=body, ref=answer_ids(url, body), how="SIGKILL")
    print("\n", r)
    assert r["shards_killed"] == 2 and r["complete"] == 1 and r["data_lost"] == 0, r   # same tokens
    assert r["fallback"] == "pld", r                                                   # and it says so
    assert r["recovered"], r                # a later request: no fallback, every shard answering
    wait_app_running(url, 180)


# -- the ingress's end of a stream, with a stand-in for the decoder's handle stream ------------


class _Stream:
    """What `decoder.options(stream=True).generate.remote()` gives the ingress: an async
    iterator of events; this one ends early or raises after `events`."""

    def __init__(self, events: list[dict], exc: Exception | None = None) -> None:
        self.events, self.exc, self.cancelled = list(events), exc, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.events:
            return self.events.pop(0)
        if self.exc is not None:
            raise self.exc
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class _NoMetrics:
    def request(self, *a) -> None:
        pass

    def first_token(self, *a) -> None:
        pass


def _sse_lines(*streams: _Stream, **body) -> list:
    from serving import protocol
    from serving.config import ServingConfig
    from serving.ingress import Ingress

    ing = SimpleNamespace(cfg=ServingConfig(), metrics=_NoMetrics())     # what _sse uses of the replica
    req = protocol.parse(protocol.ChatRequest, json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                           "stream": True, "n": len(streams), **body}).encode())
    gens = protocol.choices(protocol.chat_request(req, ing.cfg))

    async def run():
        sse = Ingress.func_or_class._sse(ing, gens, req, list(streams), time.perf_counter(), "/v1/chat/completions")
        return [x async for x in sse]

    out = []
    for message in asyncio.run(run()):          # a message may hold several events
        for line in message.split("\n\n"):
            if line.strip():
                data = line.removeprefix("data: ").strip()
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.mark.parametrize("ending", ["stops", "replica_dies"])
def test_a_stream_never_ends_silently(ending):
    """The decoder's stream ends without its `done` event, or its replica dies: the client gets
    an error event then [DONE], and no chunk with a finish_reason."""
    from ray.exceptions import ActorDiedError

    delta = {"type": "delta", "text": "Hello", "token_ids": [1]}
    exc = ActorDiedError() if ending == "replica_dies" else None
    events = _sse_lines(_Stream([delta, delta], exc))
    assert events[-1] == "[DONE]" and "error" in events[-2], events
    assert events[-2]["error"]["code"] == ("replica_failed" if exc else "internal_error")
    assert not any(c.get("finish_reason") for e in events[:-1] for c in e.get("choices", [])), events
    assert sum(1 for e in events[:-1] if e.get("choices") and e["choices"][0]["delta"].get("content")) == 2


def _done(text: str, tokens: int) -> dict:
    return {"type": "done", "text": text, "token_ids": [], "finish_reason": "stop", "speculative": {"steps": 1},
            "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}}


def test_several_choices_stream_side_by_side_and_one_failing_ends_them_all():
    """n = 2: each choice's chunks carry its index and end with its finish chunk, the usage counts
    the prompt once; a choice whose replica dies ends the stream with an error (no finish chunk
    for it) and cancels the other choice's generation."""
    from ray.exceptions import ActorDiedError

    def delta(text):
        return {"type": "delta", "text": text, "token_ids": [1]}

    events = _sse_lines(_Stream([delta("A"), delta("B"), _done("C", 3)]), _Stream([delta("x"), _done("y", 2)]),
                        stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    text = {0: "", 1: ""}
    for e in events[:-1]:
        for c in e["choices"]:
            text[c["index"]] += c["delta"].get("content") or ""
    assert text == {0: "ABC", 1: "xy"}
    assert sorted(c["index"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]) == [0, 1]
    assert events[-2]["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}

    healthy, dying = _Stream([delta("A")] * 50), _Stream([delta("x")], ActorDiedError())
    events = _sse_lines(healthy, dying)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "replica_failed"
    assert not any(c.get("finish_reason") for e in events[:-2] for c in e.get("choices", []))
    assert healthy.cancelled and dying.cancelled


def test_with_tools_a_call_comes_whole_and_plain_text_still_streams():
    """A request with tools: an answer that is a call comes as one tool_calls chunk with finish
    reason tool_calls; one that starts as plain text streams from the chunk that shows it."""
    tools = [{"type": "function", "function": {"name": "get_time"}}]

    def delta(text):
        return {"type": "delta", "text": text, "token_ids": [1]}

    call = _sse_lines(_Stream([delta('{"name": "get_'), delta('time", "arguments": {}'), _done("}", 3)]),
                      tools=tools)
    chunks = [c for e in call[:-1] for c in e["choices"]]
    assert not any(c["delta"].get("content") for c in chunks)
    calls = [t for c in chunks for t in c["delta"].get("tool_calls") or []]
    assert [(t["index"], t["function"]["name"], t["function"]["arguments"]) for t in calls] == [(0, "get_time", "{}")]
    assert chunks[-1]["finish_reason"] == "tool_calls"

    plain = _sse_lines(_Stream([delta(" "), delta("It is"), delta(" noon"), _done(".", 4)]), tools=tools)
    contents = [c["delta"].get("content") for e in plain[:-1] for c in e["choices"] if c["delta"].get("content")]
    assert contents == [" It is", " noon", "."]
    assert plain[-2]["choices"][0]["finish_reason"] == "stop"


# -- the long-answer round's checks, against a stand-in server (no Ray) ---------------------------


class _FakeServer:
    """A loopback HTTP server answering /v1/chat/completions with the token ids `answers[prompt]`
    (a JSON 200 with 3 verify steps), or a 503 "overloaded" shed for the prompts in `shed`."""

    def __init__(self, answers: dict[str, list[int]], shed=()) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                if prompt in shed:
                    status, out = 503, {"error": {"code": "overloaded", "message": "busy", "type": "x",
                                                  "param": None}}
                else:
                    status, out = 200, {"choices": [{"token_ids": answers[prompt]}], "speculative": {"steps": 3}}
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 503:
                    self.send_header("Retry-After", "1")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_long_round_checks_every_admitted_answer_token_for_token():
    bodies = long_bodies(5, 128)
    assert len({b["messages"][0]["content"] for b in bodies}) == 5
    assert {b["speculative"]["method"] for b in bodies} == {"sense", "pld"}
    assert all(b["max_tokens"] == 128 and b["ignore_eos"] and b["temperature"] == 0 for b in bodies)
    refs = [[(7 * i + j) % 1000 for j in range(128)] for i in range(len(bodies))]
    prompts = [b["messages"][0]["content"] for b in bodies]
    answers = dict(zip(prompts, refs))
    answers[prompts[1]] = refs[1][:100] + [refs[1][100] + 1] + refs[1][101:]    # wrong at token 101 of 128
    answers[prompts[2]] = refs[2][:-1]                                           # one token short
    srv = _FakeServer(answers, shed={prompts[3]})
    try:
        row = long_round(srv.url, bodies, refs, timeout=60)
    finally:
        srv.close()
    assert row["test"] == "long_answers" and row["requests"] == 5 and row["max_tokens"] == 128
    assert row["admitted"] == 4 and row["shed"] == 1 and row["shed_without_retry_after"] == 0
    assert row["wrong_output"] == 2 and row["data_lost"] == 2 and row["failed"] == 0
    assert row["tokens_checked"] == 4 * 128 and row["verify_steps"] == 4 * 3
    assert not long_round_ok([row], 5)
    assert long_round_ok([{**row, "wrong_output": 0, "data_lost": 0}], 5)
    assert not long_round_ok([{**row, "admitted": 0, "wrong_output": 0}], 5)     # nothing checked
    assert not long_round_ok([], 5) and long_round_ok([], 0)

    # the report: a section of its own, beside the load rounds and faults or alone (--long-only)
    from bench.reliability import markdown

    machine = {"cpu": "x", "cores": 2, "torch": "t", "device": "cpu"}
    summary = {"seconds": 1.0, "requests": 5, "shed": 1, "server_errors": 0, "faults_survived": 0,
               "faults_injected": 0, "data_lost": 2, "long_answers_checked": 4}
    for only in (False, True):
        args = SimpleNamespace(quick=True, long_only=only, max_ongoing=2, max_queued=4, requests=10, max_tokens=2,
                               seconds=1.0, concurrency=4, warmup=0, long_requests=5, long_tokens=128)
        md = markdown(machine, args, [], [], summary, [row])
        assert "## Long answers" in md and "| 5 | 4 | 1 | 0 | 0 | 2 | 512 | 12 |" in md
        assert ("## Load" in md) is not only and ("## Faults" in md) is not only
        assert "long answers checked token for token: 4." in md


def test_long_answer_reference_is_the_request_decoded_alone(target):
    """The reference decodes the body as the app would (its request parsing, chat template,
    ignore_eos, budget), in process: for a strict method that is plain greedy decoding."""
    import torch

    from bench.reliability import app_args as bench_app_args
    from decoding.config import SamplingParams
    from decoding.engine import encode_prompt, generate

    bodies = long_bodies(4, 24)[1::2]                  # the PLD ones: no index needed
    threads = torch.get_num_threads()
    app = bench_app_args(2, 4)
    app["model"]["dtype"] = "float32"       # the `target` fixture's ("auto" may measure bfloat16 faster)
    refs = engine_reference(bodies, app)
    assert torch.get_num_threads() == threads                                # restored
    for body, ref in zip(bodies, refs):
        assert "budget" not in body["speculative"]          # the server's default: adaptive
        ids = encode_prompt(target, body["messages"][0]["content"])
        alone = generate(target, ids, params=SamplingParams(max_new_tokens=24, ignore_eos=True)).token_ids
        assert ref == alone and len(ref) == 24
    # A soft answer depends on its drafts: there is no alone-decoded reference for it.
    soft = {**bodies[0], "speculative": {**bodies[0]["speculative"], "verification": "soft"}}
    with pytest.raises(ValueError, match="strictly verified"):
        engine_reference([soft], app)
