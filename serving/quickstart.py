"""The main job, end to end on one machine with the embedded default model:

    1. a datastore from a slice of GSM8K train, built by the Ray Data pipeline: the model's own
       answers to those questions (self-distillation: the drafts then sound like the model)
    2. the index artifact (FAISS + the REST suffix index) built from it on Ray
    3. Ray Serve with the OpenAI-compatible HTTP API, serving that index
    4. one GSM8K test question answered over HTTP with SENSE and with plain decoding
    5. both answers, the speedup and the mean accepted tokens (MAT)

    python -m serving.quickstart [--docs 200] [--distill-tokens 128] [--workdir DIR] [--question 0]
                                   [--max-tokens 128]

Steps 1 and 2 are cached in the work directory (a rerun resumes or reuses them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from decoding.model_loader import cache_root
from index.artifact import list_versions, read_artifact_manifest, resolve_version
from index.artifact_build import BuildConfig
from index.corpus import gsm8k, gsm8k_answer_text
from index.records import CorpusSpec, FieldMap
from pipelines.build_datastore import build_datastore
from pipelines.build_index import build_artifact
from pipelines.config import DatastoreJobConfig, SelfDistillConfig
from serving.app import build_app, reset_prefix_caches
from serving.config import ServingConfig
from serving.control_plane import init_local_ray
from serving.run import local_torch_threads, wait_ready


def _say(step: str, msg: str) -> None:
    print(f"[quickstart {step}] {msg}", file=sys.stderr, flush=True)


def _corpus(path: Path, docs: int) -> None:
    rows = gsm8k("train")[:docs]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"question": r["question"], "answer": gsm8k_answer_text(r["answer"])}) + "\n"
                           for r in rows))
    tmp.replace(path)


def build_datastore_step(workdir: Path, docs: int, distill_tokens: int = 0) -> Path:
    """The datastore of `docs` GSM8K train pairs: the model's own greedy answers of up to
    `distill_tokens` tokens to the questions, or (0) the dataset's answers."""
    corpus = workdir / f"gsm8k-train-{docs}.jsonl"
    if not corpus.is_file():
        _corpus(corpus, docs)
    out = workdir / (f"datastore-{docs}-id{distill_tokens}" if distill_tokens else f"datastore-{docs}")
    config = DatastoreJobConfig(
        corpora=(CorpusSpec("gsm8k_train", str(corpus), "jsonl",
                            FieldMap(prompt="question", response=None if distill_tokens else "answer")),),
        output=str(out), split_bytes=max(4096, corpus.stat().st_size // 4), workers=1,
        self_distill=SelfDistillConfig(max_new_tokens=distill_tokens) if distill_tokens else None)
    build_datastore(config)
    return out


def build_index_step(datastore: Path, workdir: Path) -> Path:
    root = workdir / f"index-{datastore.name}"
    m = json.loads((datastore / "manifest.json").read_text())
    content = {k: m[k] for k in ("shards", "token_shards", "transform_sha256", "fingerprint")}
    ds_sha = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    stamp = root / "quickstart-datastore.sha256"
    if list_versions(root) and stamp.is_file() and stamp.read_text() == ds_sha:
        version = resolve_version(root)
        _say("2/5", f"reusing the index {version} (built from this datastore)")
        read_artifact_manifest(version)
        return root
    result = build_artifact(BuildConfig(datastore=str(datastore), output=str(root)),
                            progress=lambda m: _say("2/5", m))
    stamp.write_text(ds_sha)
    _say("2/5", result.summary().replace("\n", "\n    "))
    return root


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
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0,
            "speculative": {"method": method, "verification": "strict"}}
    out, seconds = _post(url + "/v1/chat/completions", body)
    return {"text": out["choices"][0]["message"]["content"], "stats": out.get("speculative", {}),
            "tokens": out["usage"]["completion_tokens"], "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=200, help="GSM8K train questions in the datastore")
    p.add_argument("--distill-tokens", type=int, default=128,
                   help="store the model's own answers to them, up to this many tokens each "
                        "(self-distillation; 0: store the dataset's answers)")
    p.add_argument("--workdir", default=None, help="where the corpus, datastore and index go "
                   "(default: $SENSE_CACHE_DIR/quickstart)")
    p.add_argument("--question", type=int, default=0, help="which GSM8K test question to ask")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3, help="timed requests per method (the median is reported)")
    a = p.parse_args(argv)
    if a.docs < 1 or a.max_tokens < 1 or a.repeats < 1 or a.distill_tokens < 0:
        print("error: --docs, --max-tokens and --repeats must be positive, --distill-tokens not negative",
              file=sys.stderr)
        return 2

    import ray
    from ray import serve

    workdir = Path(a.workdir) if a.workdir else cache_root() / "quickstart"
    workdir.mkdir(parents=True, exist_ok=True)
    questions = gsm8k("test")
    if not 0 <= a.question < len(questions):
        print(f"error: --question must be in 0..{len(questions) - 1}", file=sys.stderr)
        return 2
    question = questions[a.question]["question"]
    t_start = time.perf_counter()
    init_local_ray(dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        what = (f"the model's own answers to {a.docs} GSM8K train questions (up to {a.distill_tokens} tokens each)"
                if a.distill_tokens else f"{a.docs} GSM8K train pairs")
        _say("1/5", f"building the datastore from {what} with the Ray Data pipeline")
        datastore = build_datastore_step(workdir, a.docs, a.distill_tokens)
        _say("2/5", "building the index artifact (FAISS + REST) on Ray")
        index = build_index_step(datastore, workdir)
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
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
