"""Datastore pipeline benchmark: extraction throughput against the bare model forward on the same
batches, scaling from one worker node to two, and self-distillation against bare batched
generation, on a local multi-node Ray cluster.

    python -m bench.pipeline [--docs 150] [--distill-docs 48] [--repeats 2] [--quick]

One run, side by side, alternating: (a) the bare forward (`window_states` over exactly the
batches the pipeline forms, one thread, no Ray), (b) the pipeline with one extraction worker,
(c) the pipeline with two workers on two nodes (one CPU and one thread each); (d) bare batched
greedy generation of `--distill-docs` questions' answers, unit by unit as the pipeline cuts them
(one thread, no Ray), timed with the forward over prompt + answer that self-distillation no
longer runs, (e) the pipeline with `--self-distill` over the same questions, one worker. Writes
bench/results/pipeline.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import machine_info, median, write_results
from decoding.batch_generate import generate_greedy_with_states
from decoding.dense_extract import run_windows, window_defaults
from decoding.target import TargetModel
from index.corpus import gsm8k, gsm8k_answer_text
from index.dense_build import Document
from index.records import CorpusSpec, FieldMap, plan_units, read_unit
from pipelines.build_datastore import build_datastore
from pipelines.config import DatastoreJobConfig, SelfDistillConfig
from pipelines.distill import Distiller


def _corpus(path: Path, n: int) -> None:
    with path.open("w") as f:
        for r in gsm8k("train")[:n]:
            f.write(json.dumps({"question": r["question"], "answer": gsm8k_answer_text(r["answer"])}) + "\n")


SAMPLE_ROWS = 2048          # the first pass then stores about one unit (--quick: fewer)


def _config(corpus: Path, out: Path, workers: int, split_bytes: int):
    return DatastoreJobConfig(corpora=(CorpusSpec("gsm8k", str(corpus), "jsonl",
                                                  FieldMap(prompt="question", response="answer")),),
                              output=str(out), workers=workers, cpus_per_worker=1.0,
                              worker_resources={"extract": 1}, split_bytes=split_bytes,
                              sample_rows=SAMPLE_ROWS)


def _bare_forward(corpus: Path, split_bytes: int) -> dict:
    """Tokens/s of the model forward alone over the pipeline's own batches (same units, same
    windows, same batch_tokens), one thread."""
    import torch

    torch.set_num_threads(1)
    target = TargetModel.load()
    cfg = _config(corpus, Path("/unused"), 1, split_bytes)
    fields = cfg.corpora[0].fields
    units = plan_units(list(cfg.corpora), split_bytes)
    docs_by_unit = [read_unit(u, fields, target.tokenizer, 2).documents for u in units]
    max_len, overlap = window_defaults(target, None, None)
    tokens = sum(len(d.tokens) for docs in docs_by_unit for d in docs)
    t0 = time.perf_counter()
    for docs in docs_by_unit:
        run_windows(target, docs, max_len=max_len, overlap=overlap, batch_tokens=cfg.batch_tokens, fn=lambda h: None)
    dt = time.perf_counter() - t0
    torch.set_num_threads(2)
    return {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt, "dtype": str(target.dtype).removeprefix("torch.")}


def _pipeline(corpus: Path, workers: int, split_bytes: int, tmp: Path) -> dict:
    out = tmp / f"ds-{workers}-{time.time_ns()}"
    manifest = build_datastore(_config(corpus, out, workers, split_bytes))
    timing = manifest.build["timing"]
    summaries = [json.loads(p.read_text()) for p in (out / "units").glob("*.json")]
    unit_seconds = sum(s["seconds"] for s in summaries if s.get("phase") == "extract")
    shutil.rmtree(out, ignore_errors=True)
    tokens = timing["extract_tokens"]
    return {"tokens": tokens, "extract_s": timing["extract_s"], "total_s": timing["total_s"],
            "fit_s": timing["fit_s"], "fit_units": timing["fit_units"], "tokens_per_s": tokens / timing["extract_s"],
            "end_to_end_tokens_per_s": timing["tokens_this_run"] / timing["total_s"],
            "unit_compute_s": unit_seconds,
            "nodes_used": len(timing["peak_rss_mb_by_node"]),
            "peak_rss_mb": max(timing["peak_rss_mb_by_node"].values())}


def _questions(path: Path, n: int) -> None:
    with path.open("w") as f:
        for r in gsm8k("train")[:n]:
            f.write(json.dumps({"question": r["question"]}) + "\n")


def _distill_config(corpus: Path, out: Path, split_bytes: int, max_new_tokens: int):
    return DatastoreJobConfig(corpora=(CorpusSpec("gsm8k", str(corpus), "jsonl", FieldMap(prompt="question")),),
                              output=str(out), workers=1, cpus_per_worker=1.0, worker_resources={"extract": 1},
                              split_bytes=split_bytes, sample_rows=SAMPLE_ROWS,
                              self_distill=SelfDistillConfig(max_new_tokens=max_new_tokens))


def _bare_generate(corpus: Path, split_bytes: int, max_new_tokens: int) -> dict:
    """Answer tokens/s of batched greedy generation alone over the pipeline's prompts (same
    units, prompts formatted by its own code), one thread; and the seconds of the forward over
    prompt + answer that stored their keys before the answers' own states did."""
    import torch

    torch.set_num_threads(1)
    target = TargetModel.load()
    cfg = _distill_config(corpus, Path("/unused"), split_bytes, max_new_tokens)
    prompts_of = Distiller(target, output="/unused", max_new_tokens=max_new_tokens, method="batched").prompts
    units = plan_units(list(cfg.corpora), split_bytes)
    max_len, overlap = window_defaults(target, None, None)
    gen_s = fwd_s = 0.0
    answer_tokens = 0
    for u in units:
        _, prompts, _ = prompts_of(u, cfg.corpora[0].fields)
        if not prompts:
            continue
        t0 = time.perf_counter()
        answers, _ = generate_greedy_with_states(target, prompts, max_new_tokens, batch_size=16)
        t1 = time.perf_counter()
        docs = [Document(p + a, store_from=len(p)) for p, a in zip(prompts, answers)]
        run_windows(target, docs, max_len=max_len, overlap=overlap, batch_tokens=cfg.batch_tokens, fn=lambda h: None)
        gen_s, fwd_s = gen_s + (t1 - t0), fwd_s + (time.perf_counter() - t1)
        answer_tokens += sum(len(a) for a in answers)
    torch.set_num_threads(2)
    return {"tokens": answer_tokens, "generate_s": gen_s, "tokens_per_s": answer_tokens / gen_s,
            "second_forward_s": fwd_s, "dtype": str(target.dtype).removeprefix("torch.")}


def _pipeline_distill(corpus: Path, split_bytes: int, max_new_tokens: int, tmp: Path) -> dict:
    out = tmp / f"id-{time.time_ns()}"
    manifest = build_datastore(_distill_config(corpus, out, split_bytes, max_new_tokens))
    timing = manifest.build["timing"]
    phases = [json.loads(p.read_text())["phase"] for p in (out / "units").glob("*.json")]
    shutil.rmtree(out, ignore_errors=True)
    # manifest.entries: one entry per answer token (the positions whose next token is one)
    return {"tokens": manifest.entries, "total_s": timing["total_s"], "tokens_per_s": manifest.entries / timing["total_s"],
            "units_extracted": phases.count("extract")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline")
    p.add_argument("--docs", type=int, default=150)
    p.add_argument("--distill-docs", type=int, default=48, help="questions self-distilled (rows d, e)")
    p.add_argument("--distill-tokens", type=int, default=128, help="answer tokens at most, each")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 16 documents, 1 repeat, no results file")
    a = p.parse_args(argv)
    if a.quick:
        global SAMPLE_ROWS
        a.docs, a.distill_docs, a.distill_tokens, a.repeats, SAMPLE_ROWS = 16, 8, 16, 1, 128
    import ray
    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    corpus = tmp / "gsm8k-train.jsonl"
    _corpus(corpus, a.docs)
    split_bytes = max(2048, corpus.stat().st_size // 8)          # about 8 units
    questions = tmp / "gsm8k-questions.jsonl"
    _questions(questions, a.distill_docs)
    distill_split = -(-questions.stat().st_size // 3)              # 3 units: the first pass, then the pool
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        # 2 CPUs (one extraction actor a node all the same: "extract"): the tokenizing actor (0.25
        # CPU) may land beside an extraction worker, which then still starts
        cluster.add_node(num_cpus=2, resources={"extract": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    runs = {"bare": [], "pipe1": [], "pipe2": [], "gen": [], "distill": []}
    jobs = {"bare": lambda: _bare_forward(corpus, split_bytes),
            "pipe1": lambda: _pipeline(corpus, 1, split_bytes, tmp),
            "pipe2": lambda: _pipeline(corpus, 2, split_bytes, tmp),
            "gen": lambda: _bare_generate(questions, distill_split, a.distill_tokens),
            "distill": lambda: _pipeline_distill(questions, distill_split, a.distill_tokens, tmp)}
    try:
        for r in range(a.repeats):
            order = list(jobs)
            order = order[r % len(order):] + order[: r % len(order)]      # rotated each repeat
            for k in order:
                runs[k].append(jobs[k]())
            print(f"repeat {r + 1}: bare {runs['bare'][-1]['tokens_per_s']:.0f} tok/s, "
                  f"pipeline x1 {runs['pipe1'][-1]['tokens_per_s']:.0f}, x2 {runs['pipe2'][-1]['tokens_per_s']:.0f}; "
                  f"generate {runs['gen'][-1]['tokens_per_s']:.0f} (+{runs['gen'][-1]['second_forward_s']:.1f} s "
                  f"forward), self-distill pipeline {runs['distill'][-1]['tokens_per_s']:.0f}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: {m: median([x[m] for x in v]) if not isinstance(v[0][m], str) else v[0][m] for m in v[0]}
           for k, v in runs.items()}
    bare, p1, p2, gen, dist = med["bare"], med["pipe1"], med["pipe2"], med["gen"], med["distill"]
    rows = [
        {"method": "pipeline", "vs": "bare_forward", "ratio": round(p1["tokens_per_s"] / bare["tokens_per_s"], 3),
         "tokens_per_s": round(p1["tokens_per_s"], 1), "bare_tokens_per_s": round(bare["tokens_per_s"], 1),
         "workers": 1, "measure": "extraction phase wall time (actor start and model load included)"},
        {"method": "pipeline_steady", "vs": "bare_forward",
         "ratio": round((p1["tokens"] / p1["unit_compute_s"]) / bare["tokens_per_s"], 3),
         "tokens_per_s": round(p1["tokens"] / p1["unit_compute_s"], 1), "workers": 1,
         "measure": "sum of per-unit times inside the workers (read, tokenize excluded, forward, transform, write)"},
        {"method": "pipeline_end_to_end", "vs": "bare_forward",
         "ratio": round(p1["end_to_end_tokens_per_s"] / bare["tokens_per_s"], 3),
         "tokens_per_s": round(p1["end_to_end_tokens_per_s"], 1), "workers": 1,
         "measure": "whole job: planning, first-pass transform fit, extraction, manifest"},
        {"method": "pipeline_2_nodes", "vs": "pipeline_1_node", "ratio": round(p2["tokens_per_s"] / p1["tokens_per_s"], 3),
         "tokens_per_s": round(p2["tokens_per_s"], 1), "workers": 2, "nodes_used": p2["nodes_used"]},
        {"method": "pipeline_self_distill", "vs": "bare_generate",
         "ratio": round(dist["tokens_per_s"] / gen["tokens_per_s"], 3), "tokens_per_s": round(dist["tokens_per_s"], 1),
         "bare_tokens_per_s": round(gen["tokens_per_s"], 1), "workers": 1, "dtype": gen["dtype"],
         "units_extracted": dist["units_extracted"],
         "measure": "whole self-distilling job (answers + stored keys) per answer token"},
        {"method": "second_forward", "vs": "bare_generate", "ratio": round(gen["second_forward_s"] / gen["generate_s"], 3),
         "seconds": round(gen["second_forward_s"], 2), "generate_s": round(gen["generate_s"], 2),
         "measure": "the forward over prompt + answer that no longer runs, against the generation's time"},
        {"method": "peak_memory", "workers": 1, "peak_rss_mb_per_worker": p1["peak_rss_mb"]},
        {"method": "peak_memory", "workers": 2, "peak_rss_mb_per_worker": p2["peak_rss_mb"]},
    ]
    if a.quick:
        print(json.dumps(rows, indent=2))
        return
    machine = machine_info()
    machine["cluster"] = ("local: head (1 CPU) + 2 worker nodes (2 CPUs, one extraction worker of 1 CPU and 1 torch "
                          "thread each) on this machine")
    md = ["# Datastore pipeline benchmark\n",
          f"{a.docs} GSM8K train question/answer pairs ({int(bare['tokens']):,} tokens), about 8 units; "
          f"{a.repeats} repeats, medians, each repeat's order rotated; embedded SmolLM2-135M {bare['dtype']} on CPU "
          f"(dtype auto), one thread per worker. "
          f"Machine: {machine['cpu']}, {machine['cores']} cores.\n",
          "| measure | tokens/s | ratio | vs |", "|---|---|---|---|",
          f"| bare forward, same batches (1 thread) | {bare['tokens_per_s']:.0f} | | |"]
    for r in rows[:4]:
        md.append(f"| {r['method']} ({r.get('measure', str(r['workers']) + ' workers')}) | {r['tokens_per_s']:.0f} | "
                  f"{r['ratio']:.3f} | {r['vs']} |")
    md += ["", f"Self-distillation: {a.distill_docs} GSM8K train questions, answers of up to {a.distill_tokens} "
           f"tokens ({int(gen['tokens']):,} answer tokens), 3 units, {gen['dtype']}, one thread:", "",
           "| measure | answer tokens/s | ratio | vs |", "|---|---|---|---|",
           f"| bare batched generation (`generate_greedy_with_states`, same prompts and units) | "
           f"{gen['tokens_per_s']:.0f} | | |",
           f"| the pipeline with `--self-distill` (whole job, 1 worker; units extracted by a second forward: "
           f"{dist['units_extracted']:.0f}) | {dist['tokens_per_s']:.0f} | {rows[4]['ratio']:.3f} | bare_generate |",
           "", f"The forward over prompt + answer that stored the keys until the answers' own decode steps did "
           f"took {gen['second_forward_s']:.1f} s beside {gen['generate_s']:.1f} s of generation "
           f"({rows[5]['ratio']:.0%} more), on the same documents.", ""]
    md.append(f"\nPeak resident memory per extraction worker: {p1['peak_rss_mb']:.0f} MB (1 worker), "
              f"{p2['peak_rss_mb']:.0f} MB (2 workers). Two nodes on one 2-core machine share its memory "
              f"bandwidth, so node scaling here is a lower bound of what separate machines give.\n")
    write_results("pipeline", machine, rows, "\n".join(md) + "\n", extra={"runs": runs})


if __name__ == "__main__":
    main()
