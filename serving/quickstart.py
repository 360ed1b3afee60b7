"""The main job's second half (`make demo` runs ``python -m pipelines.quickstart`` first, which
builds the datastore and its index: steps 1-2), on one machine with the embedded default model:

    3. Ray Serve with the OpenAI-compatible HTTP API, serving that index
    4. one GSM8K test question answered over HTTP with SENSE and with plain decoding
    5. both answers, the speedup and the mean accepted tokens (MAT)

    python -m serving.quickstart [--workdir DIR | --index PATH] [--question 0] [--max-tokens 128]
                                 [--repeats 3] [--port 8000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from decoding.model_loader import cache_root
from index.corpus import gsm8k
from serving.app import build_app, reset_prefix_caches, stop_handle_polls
from serving.config import EMBEDDED_NAME, ServingConfig
from serving.control_plane import init_local_ray
from serving.run import local_torch_threads, wait_ready


def _say(step: str, msg: str) -> None:
    print(f"[quickstart {step}] {msg}", file=sys.stderr, flush=True)


def _post(url: str, body: dict, timeout: float = 600) -> tuple[dict, float]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None
    return out, time.perf_counter() - t0


def ask(url: str, question: str, method: str, max_tokens: int) -> dict:
    body = {"model": EMBEDDED_NAME, "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0,
            "speculative": {"method": method, "verification": "strict"}}
    out, seconds = _post(url + "/v1/chat/completions", body)
    return {"text": out["choices"][0]["message"]["content"], "stats": out.get("speculative", {}),
            "tokens": out["usage"]["completion_tokens"], "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="the work directory of python -m pipelines.quickstart "
                   "(default: $SENSE_CACHE_DIR/quickstart), whose index it serves")
    p.add_argument("--index", default=None, help="serve this index artifact instead")
    p.add_argument("--question", type=int, default=0, help="which GSM8K test question to ask")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3, help="timed requests per method (the median is reported)")
    a = p.parse_args(argv)
    if a.max_tokens < 1 or a.repeats < 1:
        print("error: --max-tokens and --repeats must be positive", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    pointer = (Path(a.workdir) if a.workdir else cache_root() / "quickstart") / "index.txt"
    if a.index is None and not pointer.is_file():
        print(f"error: no index at {pointer}: run python -m pipelines.quickstart first (make demo runs both), "
              "or give --index", file=sys.stderr)
        return 2
    index = a.index or pointer.read_text().strip()
    questions = gsm8k("test")
    if not 0 <= a.question < len(questions):
        print(f"error: --question must be in 0..{len(questions) - 1}", file=sys.stderr)
        return 2
    question = questions[a.question]["question"]
    t_start = time.perf_counter()
    init_local_ray(dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        _say("3/5", f"starting Ray Serve on http://127.0.0.1:{a.port} with the index {index}")
        serve.start(http_options={"host": "127.0.0.1", "port": a.port})
        app_args: dict = {"index": {"uri": str(index)}}
        # This machine is the decoder's: its cores, as `python -m serving.run` gives them (Ray alone
        # would give the replica one thread per num_cpus: one; a 16-token verification took 2x as long).
        threads = local_torch_threads(ServingConfig.from_args(app_args))
        if threads is not None:
            app_args["model"] = {"torch_threads": threads}
        serve.run(build_app(app_args), name="sense", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{a.port}"
        wait_ready(url, 900)
        with urllib.request.urlopen(url + "/health", timeout=60) as r:
            decoder = json.loads(r.read())["decoder"]
        cost = decoder.get("verify_cost") or {}
        _say("3/5", f"model dtype: {decoder['dtype']['reason']}; {decoder['threads']['torch']} torch thread(s)")
        _say("3/5", f"draft budget: {decoder['budget']} (verify cost in decode steps: "
                    + ", ".join(f"c({n})={c}" for n, c in cost.items() if n in ("4", "8", "16", "32")) + ")")
        _say("4/5", f"asking over HTTP: {question[:90]}{'...' if len(question) > 90 else ''}")
        ask(url, "Say hi.", "sense", 8)                       # warm-up: loads the index, first forwards
        reset_prefix_caches("sense")                          # (and the handle this makes, untimed)
        runs = {"ar": [], "sense": []}
        for r in range(a.repeats):
            for method in ("ar", "sense"):                   # alternate, so drift hits both alike
                reset_prefix_caches("sense")                  # each run the question anew (the template kept)
                ask(url, "Say hi.", method, 1)
                runs[method].append(ask(url, question, method, a.max_tokens))
                s = runs[method][-1]
                _say("4/5", f"  {method:5s} run {r + 1}: {s['tokens']} tokens in {s['seconds']:.2f}s")
        _say("5/5", "results")
        med = {m: sorted(v, key=lambda x: x["seconds"])[len(v) // 2] for m, v in runs.items()}
        ar, sense = med["ar"], med["sense"]
        st = sense["stats"]
        print("\n=== plain decoding (ar) ===\n" + ar["text"].strip())
        print("\n=== SENSE ===\n" + sense["text"].strip())
        print(f"\nidentical answers: {ar['text'] == sense['text']} (strict verification is lossless)")
        print(f"ar:    {ar['tokens']} tokens in {ar['seconds']:.2f}s ({ar['tokens'] / ar['seconds']:.1f} tok/s)")
        print(f"sense: {sense['tokens']} tokens in {sense['seconds']:.2f}s ({sense['tokens'] / sense['seconds']:.1f} "
              f"tok/s), MAT {st.get('mat', float('nan')):.2f}, acceptance {st.get('acceptance_rate', float('nan')):.0%}, "
              f"{st.get('steps')} steps")
        print(f"speedup over plain decoding: {ar['seconds'] / sense['seconds']:.2f}x "
              f"(median of {a.repeats}; whole run {time.perf_counter() - t_start:.0f}s)")
        return 0
    finally:
        # The local instance this started, Serve with it. Not serve.shutdown() first: it killed
        # the controller under the driver's own handle's pending long poll, and every run ended
        # with two "(raylet) Task ServeController... failed" lines. That poll is stopped instead.
        stop_handle_polls()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
