"""HTTP load on the served app: chat request bodies, the load generator (requests started at a
fixed rate, a bounded number in flight) and the classification of every answer."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import requests

STORY = "Write a very long story about a dragon who learns to bake bread."
# Long answers (ignore_eos: every one runs its full max_tokens), alternately SENSE and PLD.
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
    """The `q`-th percentile of `xs` (nearest rank; NaN for none)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


def chat_body(text: str, max_tokens: int, *, method: str = "sense", budget: int | str | None = None,
              stream: bool = False) -> dict:
    """A greedy chat request for exactly `max_tokens` tokens (ignore_eos) returning its token ids;
    `budget` None: the server's default (adaptive)."""
    spec = {"method": method, "return_token_ids": True}
    if budget is not None:
        spec["budget"] = budget
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream, "speculative": spec}


def answer_ids(url: str, body: dict, timeout: float = 300) -> list[int]:
    """The token ids of one non-streamed answer (the reference for later checks)."""
    r = requests.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=timeout)
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


def long_bodies(n: int, max_tokens: int) -> list[dict]:
    """`n` chat bodies for long answers: LONG_PROMPTS in turn, methods alternating."""
    return [chat_body(LONG_PROMPTS[i % len(LONG_PROMPTS)], max_tokens, method=LONG_METHODS[i % len(LONG_METHODS)])
            for i in range(n)]


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


def long_round(url: str, bodies: list[dict], refs: list[list[int]], *, timeout: float = 900) -> dict:
    """The long-answer round: every body sent at once (each its own connection), every admitted
    answer checked token for token against its reference (`refs`, from
    ``support.reference.engine_reference``)."""
    res = burst(url, bodies, refs, len(bodies), seconds=0.5, concurrency=len(bodies), timeout=timeout)
    for ex in res.examples[:3]:
        log("   example:", ex)
    return {"test": "long_answers", **res.summary(), "max_tokens": max((b["max_tokens"] for b in bodies), default=0),
            "methods": sorted({b["speculative"]["method"] for b in bodies}),
            "faults_injected": 0, "faults_survived": 0}


def long_round_ok(longs: list[dict], planned: int) -> bool:
    """The long-answer round ran (when planned), admitted answers, and every one was right."""
    if not planned:
        return True
    return len(longs) == 1 and longs[0]["admitted"] > 0 and longs[0]["wrong_output"] == 0 \
        and longs[0]["failed"] == 0 and longs[0]["server_errors"] == 0
