"""Build a dense datastore (and the token streams for the sparse index) with Ray Data.

    python -m pipelines.build_datastore --corpus gsm8k=../shared/data/gsm8k/train.jsonl \\
        --prompt-field question --response-field answer --output /tmp/ds

    ray job submit --working-dir . -- python -m pipelines.build_datastore ... --output s3://bucket/ds

Plan (driver): list the input files and cut them into deterministic units; fit the key transform
on a first-pass sample (a task on a model worker); then stream the units that have no done marker
through tokenization (CPU tasks) and extraction (an actor pool, one model per actor); finally write
the manifest, atomically and last. A rerun resumes: finished units are skipped, interrupted ones
recomputed under the same names. The output is the format of ``index.dense_format``.

With self-distillation (``--self-distill``) the stored documents are the prompts plus the model's
own answers, and no second forward runs over them: the first pass distills prompts in order only
until their answers give the transform's sample and fits it on their hidden states (the decode
steps' own, bitwise a forward's on the lean forward; a unit the sample ends inside is kept as a
head, its first prompts and their keys), then the actor pool distills the rest and writes each
unit's entries from its answers' hidden states. Pass 2 extracts only what that left (a unit whose
entries a crash cut off).
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, replace


from index import storage
from index.dense_format import MANIFEST, TRANSFORM, DatastoreError, KeyTransform, Manifest, ModelFingerprint
from index.dense_writer import write_manifest
from index.records import FieldMap, InputError, Unit, plan_units
from pipelines.config import DISTILL_METHODS, DatastoreJobConfig, SelfDistillConfig, parse_corpus
from pipelines.distill import DistillUnits, distilled_unit
from pipelines.first_pass import fit_sample
from pipelines.stages import (DISTILLED, ExtractUnits, TokenizeUnits, distill_progress_uri, finished_distill,
                              finished_unit, fit_progress_uri, read_progress, read_transform, unit_to_row)

BUILD_INFO = "build.json"


class JobError(RuntimeError):
    """The build could not finish (a worker kept failing, storage unreachable)."""


def _log(msg: str) -> None:
    print(f"[build_datastore] {msg}", file=sys.stderr, flush=True)


def _init_ray(address: str | None, worker_start_timeout_s: float) -> None:
    import logging

    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    # Our own progress lines replace Ray Data's periodic operator dumps.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Start the whole actor pool before feeding it: otherwise the first actor up takes every unit
    # of a short job while the others still load the model, and a pool the cluster cannot place
    # would wait forever instead of failing with a clear error.
    ctx.wait_for_min_actors_s = max(1, int(worker_start_timeout_s))
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data.exceptions").addFilter(_QuietPoolStartTimeout())


class _QuietPoolStartTimeout:
    """Drops Ray Data's internal-error stack dump for a pool that did not start in time: the job
    reports that case itself in one line (the filter runs inside Ray's except block, so
    sys.exc_info() is the exception being logged)."""

    def filter(self, record) -> bool:
        import sys

        return not _worker_start_timeout(record.exc_info[1] if record.exc_info else sys.exc_info()[1])


def _use_gpu(config: DatastoreJobConfig) -> float:
    import ray

    if config.gpus_per_worker is not None:
        return float(config.gpus_per_worker)
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


TOKENIZER_CPUS = 0.25      # the tokenizing actor's share: it must still fit beside the model workers


def _worker_cpus(config: DatastoreJobConfig, gpus: float) -> DatastoreJobConfig:
    """Fill in cpus_per_worker when not given: the workers share the cluster's CPUs (each runs
    that many intra-op threads, rounded), leaving room on a node for the tokenizing actor and
    never more than a node has. A one-worker build on a 2-core machine gets both cores. GPU
    workers run the model on the GPU: one CPU each."""
    import ray

    if config.cpus_per_worker is not None:
        return config
    if gpus > 0:
        return replace(config, cpus_per_worker=1.0)
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources().get("CPU", 1)
    share = min((total - TOKENIZER_CPUS) / config.workers, max(nodes, default=1) - TOKENIZER_CPUS)
    return replace(config, cpus_per_worker=max(1.0, math.floor(share * 4) / 4))


def _threads(config: DatastoreJobConfig) -> int:
    """Intra-op threads of a model worker: the CPUs it holds, rounded (1.75 CPUs: 2 threads)."""
    return max(1, round(config.cpus_per_worker))


def _prepare_output(config: DatastoreJobConfig) -> dict | None:
    """The previous build's info if this run resumes it; refuse to mix settings or clobber data."""
    info_uri = storage.join(config.output, BUILD_INFO)
    existing = storage.list_files(config.output)
    if not existing:
        return None
    ours = BUILD_INFO in existing or MANIFEST in existing
    if not ours:
        raise InputError(f"{config.output} exists and is not a datastore: refusing to write into it")
    if config.overwrite:
        fs, path = storage.open_fs(config.output)
        fs.rm(path, recursive=True)
        _log(f"--overwrite: removed the previous contents of {config.output}")
        return None
    if BUILD_INFO not in existing:
        raise InputError(f"{config.output} holds a datastore from another builder; pass --overwrite to replace it")
    info = json.loads(storage.read_bytes(info_uri))
    if info.get("content_key") != config.content_key():
        raise InputError(f"{config.output} holds a datastore built with other settings (model, fields, "
                         f"dimensions or corpora); pass --overwrite to rebuild it, or choose another --output")
    return info


def _remote(fn_or_cls, config: DatastoreJobConfig, gpus: float):
    import ray

    return ray.remote(fn_or_cls).options(num_cpus=config.cpus_per_worker, num_gpus=gpus, max_retries=2,
                                         resources=config.worker_resources or {})


def _fit(config: DatastoreJobConfig, units: list[Unit], fields: dict[str, FieldMap], gpus: float) -> dict:
    """Fit the key transform on a sample and record the model's fingerprint (first pass). With
    self-distillation, `units` are the prompt units: their first prompts are answered here, their
    answers' own hidden states giving the sample (see ``fit_sample``)."""
    distill = config.self_distill
    _log(f"first pass: {'answering the first prompts and ' if distill else ''}fitting the key transform on up to "
         f"{config.sample_rows} positions")
    t0 = time.perf_counter()
    ref = _remote(fit_sample, config, gpus).remote(
        model=config.model, dtype=config.dtype, layer=config.layer, gpu=gpus > 0,
        threads=_threads(config), units=units, fields=fields, dim=config.dim,
        sample_rows=config.sample_rows, seed=config.seed, max_len=config.max_len, overlap=config.overlap,
        batch_tokens=config.batch_tokens, output=config.output, value_len=config.value_len,
        distill=None if distill is None else dict(max_new_tokens=distill.max_new_tokens, method=distill.method,
                                                  batch_size=distill.batch_size))
    fit = _wait_with_progress(ref, config.output, units if distill else [])
    info = {"content_key": config.content_key(), "fingerprint": fit["fingerprint"], "key_dtype": fit["key_dtype"],
            "eos": fit["eos"],
            "max_len": fit["max_len"], "overlap": fit["overlap"], "config": _config_dict(config)}
    storage.write_bytes_atomic(storage.join(config.output, BUILD_INFO), json.dumps(info, indent=2).encode())
    _log(f"first pass done in {time.perf_counter() - t0:.1f}s: transform fitted on {fit['sample_documents']} "
         f"documents, whose {fit['units_done']} unit(s) are stored too")
    return info


def _wait_with_progress(ref, output: str, distilling: list[Unit], every_s: float = 30.0):
    """ray.get(ref) for the first pass, with a line every `every_s` seconds meanwhile: how far
    the worker is (its progress files): prompts answered in the unit it distills (of
    `distilling`), then tokens run through the model."""
    import ray

    t0 = time.perf_counter()
    while not ray.wait([ref], timeout=every_s)[0]:
        dt = time.perf_counter() - t0
        seen = [(u, q) for u in distilling if (q := read_progress(distill_progress_uri(output, u.name)))]
        answered = sum(q["done"] for _, q in seen)
        p = read_progress(fit_progress_uri(output))
        if answered:
            units = sum(q["done"] == q["total"] for _, q in seen)
            _log(f"  first pass ({dt:.0f}s): distilling: {answered:,} prompts answered ({units} unit(s) whole)"
                 + "".join(f", {u.name} {q['done']}/{q['total']}" for u, q in seen if q["done"] < q["total"]))
        elif p and p["done"]:
            _log(f"  first pass ({dt:.0f}s): {p['done']:,} tokens through the model, "
                 f"{p['done'] / max(p['seconds'], 1e-9):.0f} tok/s")
        else:
            _log(f"  first pass ({dt:.0f}s): loading the model")
    return ray.get(ref)


def _config_dict(config: DatastoreJobConfig) -> dict:
    d = asdict(config)
    d.pop("ray_address", None)
    return json.loads(json.dumps(d, default=str))


def _consume_with_progress(ds, output: str, todo: list[Unit], every_s: float = 30.0) -> None:
    """Run the distillation dataset to the end, logging each finished unit and, every `every_s`
    seconds meanwhile, how far the units in progress are (from their progress files)."""
    finished: queue.Queue = queue.Queue()

    def consume() -> None:
        try:
            for row in ds.iter_rows():
                finished.put(json.loads(row["summary"]))
        except BaseException as exc:     # re-raised in the driver's thread below
            finished.put(exc)
        finished.put(None)

    threading.Thread(target=consume, name="distill-consumer", daemon=True).start()
    done: set[str] = set()
    t0 = time.perf_counter()
    while True:
        try:
            item = finished.get(timeout=every_s)
        except queue.Empty:
            parts = [f"{u.name} {p['done']}/{p['total']}" for u in todo if u.name not in done
                     and (p := read_progress(distill_progress_uri(output, u.name))) and p["done"] < p["total"]]
            if parts:
                _log(f"  distilling ({time.perf_counter() - t0:.0f}s): prompts answered: " + ", ".join(parts))
            continue
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        done.add(item["unit"])
        _log(f"  distilled {len(done)}/{len(todo)} units ({item['documents']} answers in {item['unit']})")


def _distill(config: DatastoreJobConfig, units: list[Unit], fields: dict[str, FieldMap], gpus: float,
             info: dict, transform: KeyTransform) -> tuple[list[Unit], dict[str, dict]]:
    """Self-distillation: generate answers for every prompt unit the first pass did not
    (resumably), each unit's entries written with them (from the answers' own hidden states);
    returns the units of the distilled token tables, which pass 2 extracts where a unit's entries
    are missing, and the prompts' bad records by pass-2 unit name."""
    import ray

    todo = [u for u in units if finished_distill(config.output, u.name) is None]
    _log(f"self-distillation: {len(units) - len(todo)}/{len(units)} units already generated")
    if todo:
        ds = ray.data.from_items([unit_to_row(u, fields[u.corpus]) for u in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(DistillUnits, batch_size=1, compute=ray.data.ActorPoolStrategy(size=config.workers),
                            num_cpus=config.cpus_per_worker, resources=config.worker_resources,
                            num_gpus=gpus, fn_constructor_kwargs=dict(
                                model=config.model, dtype=config.dtype, gpu=gpus > 0,
                                threads=_threads(config), output=config.output, transform=transform,
                                eos=info["eos"], max_new_tokens=config.self_distill.max_new_tokens,
                                method=config.self_distill.method, batch_size=config.self_distill.batch_size,
                                layer=config.layer, entries=dict(
                                    value_len=config.value_len, max_len=info["max_len"], overlap=info["overlap"],
                                    batch_tokens=config.batch_tokens)))
        _consume_with_progress(ds, config.output, todo)
    out, bad_by_unit = [], {}
    for u in units:
        # Pass 2 reads the distilled table; the prompts' bad records carry over into its summary.
        bad = json.loads(storage.read_bytes(storage.join(config.output, DISTILLED, f"{u.name}.json")))["bad"]
        out.append(distilled_unit(config.output, u))
        bad_by_unit[out[-1].name] = bad
    return out, bad_by_unit


def _extract(config: DatastoreJobConfig, info: dict, todo: list[Unit], fields: dict[str, FieldMap],
             gpus: float, transform: KeyTransform) -> None:
    import ray

    ds = ray.data.from_items([unit_to_row(u, fields[u.corpus]) for u in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(TokenizeUnits, batch_size=1, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25,
                        fn_constructor_kwargs=dict(model=config.model, eos=info["eos"]))
    ds = ds.map_batches(
        ExtractUnits, batch_size=1, compute=ray.data.ActorPoolStrategy(size=config.workers),
        num_cpus=config.cpus_per_worker, num_gpus=gpus, resources=config.worker_resources,
        fn_constructor_kwargs=dict(model=config.model, dtype=config.dtype, layer=config.layer, gpu=gpus > 0,
                                   threads=_threads(config), output=config.output, transform=transform,
                                   value_len=config.value_len, eos=info["eos"], max_len=info["max_len"],
                                   overlap=info["overlap"], batch_tokens=config.batch_tokens))
    t0, tokens, entries = time.perf_counter(), 0, 0
    _log(f"extracting {len(todo)} units")
    for i, row in enumerate(ds.iter_rows(), 1):
        s = json.loads(row["summary"])
        tokens += s["tokens"]
        entries += s["entries"]
        dt = time.perf_counter() - t0
        _log(f"  {i}/{len(todo)} units  {entries:,} entries  {tokens:,} tokens  {tokens / max(dt, 1e-9):,.0f} tok/s"
             + (f"  ({sum(s['bad'].values())} bad records in {s['unit']})" if s["bad"] else ""))


def _peak_rss(summaries: list[dict]) -> dict:
    peak: dict[str, float] = {}
    for s in summaries:
        node = str(s.get("node"))
        peak[node] = max(peak.get(node, 0.0), float(s.get("peak_rss_mb", 0.0)))
    return peak


def _write_manifest(config: DatastoreJobConfig, info: dict, summaries: list[dict], timing: dict,
                    extra_bad: dict[str, dict]) -> Manifest:
    transform_bytes = storage.read_bytes(storage.join(config.output, TRANSFORM))
    import hashlib

    bad = Counter()
    for s in summaries:
        bad.update(s["bad"])
        bad.update(extra_bad.get(s["unit"], {}))
    corpora = [c.name for c in config.corpora]
    manifest = Manifest(
        fingerprint=ModelFingerprint(**info["fingerprint"]), key_dim=config.dim, value_len=config.value_len,
        eos_token_id=info["eos"], entries=sum(s["entries"] for s in summaries),
        documents=sum(s["documents"] for s in summaries), tokens=sum(s["tokens"] for s in summaries),
        corpora=corpora, shards=sorted((s["shard"] for s in summaries if s["shard"]), key=lambda d: d["path"]),
        token_shards=sorted((s["token_shard"] for s in summaries if s["token_shard"]), key=lambda d: d["path"]),
        transform_sha256=hashlib.sha256(transform_bytes).hexdigest(), skipped=sum(bad.values()),
        skipped_reasons=dict(sorted(bad.items())), key_dtype=info.get("key_dtype", ""),
        build={"builder": "pipelines.build_datastore", "content_key": info["content_key"],
               "units": len(summaries), "records": sum(s["records"] for s in summaries),
               "forward_tokens": sum(s["forward_tokens"] for s in summaries), "max_len": info["max_len"],
               "overlap": info["overlap"], "timing": timing, "config": info["config"]})
    write_manifest(config.output, manifest)
    return manifest


_REMOTE_STORAGE_ERROR = re.compile(r"^\s*(?:[\w.]+\.)?StorageError: (.+)$", re.MULTILINE)


def _storage_failure(exc: BaseException) -> BaseException | None:
    """The storage error behind a failed Ray task or dataset, if that is what it was: the innermost
    one (a ``RayTaskError(StorageError)`` is one too, its message the worker's traceback; its
    cause is the error itself). Where Ray kept only the text (Ray Data wraps a stage's error in a
    ``UserCodeException``, which reaches the driver without its cause; an actor whose creation
    failed is an ``ActorDiedError`` holding the worker's traceback as a string), the last
    ``StorageError: ...`` line of that text, as a StorageError."""
    from index.storage import StorageError

    chain, seen, found = [], 0, None
    while exc is not None and seen < 10:
        chain.append(exc)
        if isinstance(exc, (StorageError, InputError, DatastoreError)):
            found = exc
        cause = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
        exc, seen = cause, seen + 1
    if found is None:
        lines = [m for e in chain for m in _REMOTE_STORAGE_ERROR.findall(str(e))]
        found = StorageError(lines[-1].strip()) if lines else None
    return found


def _worker_start_timeout(exc: BaseException) -> bool:
    """Whether Ray Data gave up waiting for the actor pool to start."""
    import ray.exceptions

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ray.exceptions.GetTimeoutError) and "starting actors" in str(exc):
            return True
        exc, seen = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__, seen + 1
    return False


def build_datastore(config: DatastoreJobConfig) -> Manifest:
    """Run the whole build (see the module docstring); returns the manifest written. A storage
    failure that outlasts the retries ends it with a JobError: finished units are kept and the
    same command resumes."""
    try:
        return _build(config)
    except (InputError, DatastoreError, JobError):
        raise
    except Exception as exc:
        if _worker_start_timeout(exc):
            raise JobError(f"the {config.workers} model worker(s) did not all start within "
                           f"{config.worker_start_timeout_s:g} s: the cluster lacks the resources asked for "
                           f"(--cpus-per-worker, --gpus-per-worker, --worker-resources) or loading the model "
                           f"is slower (--worker-start-timeout); finished units are kept") from None
        cause = _storage_failure(exc)
        if cause is None:
            raise
        if isinstance(cause, (InputError, DatastoreError)):
            raise cause from None
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise JobError(f"storage failed during the build ({detail}); finished units are kept: rerun the same "
                       f"command to resume") from None


def _build(config: DatastoreJobConfig) -> Manifest:
    config.validate()
    t0 = time.perf_counter()
    fields = {c.name: c.fields for c in config.corpora}
    try:                    # before Ray starts: a corpus it cannot read fails at once, nothing written
        units = plan_units(list(config.corpora), config.split_bytes)
    except storage.StorageError as exc:
        raise InputError(f"the corpus cannot be read: {exc}") from None
    _init_ray(config.ray_address, config.worker_start_timeout_s)
    gpus = _use_gpu(config)
    config = _worker_cpus(config, gpus)
    _log(f"{len(units)} units from {len({u.uri for u in units})} files in {len(config.corpora)} corpora; "
         f"{config.workers} extraction worker(s) on {'GPU' if gpus else f'{config.cpus_per_worker:g} CPU(s) each'}"
         f"; output {config.output}")
    info = _prepare_output(config)
    if info is None:        # claim the output first: a crash from here on leaves a resumable build
        storage.write_bytes_atomic(storage.join(config.output, BUILD_INFO),
                                   json.dumps({"content_key": config.content_key()}).encode())
    distill_bad: dict[str, dict] = {}
    # The units whose entries pass 2 writes: with self-distillation, each prompt unit's distilled table.
    stored = [distilled_unit(config.output, u) for u in units] if config.self_distill else units
    t_fit = time.perf_counter()
    done_before: set[str] = set()
    if info is None or "fingerprint" not in info or not storage.exists(storage.join(config.output, TRANSFORM)):
        info = _fit(config, units, fields, gpus)
    else:
        done_before = {u.name for u in stored if finished_unit(config.output, u.name) is not None}
        _log(f"resuming: reusing the key transform; {len(done_before)} of {len(units)} units already done")
    # Read once here and handed to the model workers with their arguments: a worker's start then
    # touches no storage, so an outage there fails a task (its StorageError kept, one line), not an
    # actor's creation (which Ray reports as the actor's death, the error object lost).
    transform = read_transform(config.output)
    t_distill = time.perf_counter()
    if config.self_distill:
        units, distill_bad = _distill(config, units, fields, gpus, info, transform)
    summaries, todo = {}, []
    for u in units:
        s = finished_unit(config.output, u.name)
        if s is None:
            todo.append(u)
        else:
            summaries[u.name] = s
    # Units written this run before pass 2: by the first pass, and by distillation with their answers.
    fit_units = [u for u in units if u.name in summaries and u.name not in done_before]
    t_extract = time.perf_counter()
    if todo:
        _extract(config, info, todo, fields, gpus, transform)
    t_end = time.perf_counter()
    for u in todo:
        s = finished_unit(config.output, u.name)
        if s is None:
            raise JobError(f"unit {u.name} did not finish; rerun the same command to resume")
        summaries[u.name] = s
    seconds = time.perf_counter() - t0
    extract_tokens = sum(summaries[u.name]["tokens"] for u in todo)
    fit_tokens = sum(summaries[u.name]["tokens"] for u in fit_units)
    tokens = extract_tokens + fit_tokens
    timing = {"total_s": round(seconds, 3), "fit_s": round(t_distill - t_fit, 3),
              "distill_s": round(t_extract - t_distill, 3),
              "extract_s": round(t_end - t_extract, 3), "fit_units": len(fit_units), "fit_tokens": fit_tokens,
              "extract_units": len(todo), "extract_tokens": extract_tokens, "tokens_this_run": tokens,
              "peak_rss_mb_by_node": _peak_rss([summaries[u.name] for u in todo + fit_units])}
    manifest = _write_manifest(config, info, [summaries[u.name] for u in units], timing, distill_bad)
    reasons = ", ".join(f"{k}: {v}" for k, v in manifest.skipped_reasons.items())
    _log(f"done: {manifest.documents:,} documents, {manifest.tokens:,} tokens, {manifest.entries:,} entries, "
         f"{manifest.skipped} skipped{f' ({reasons})' if reasons else ''}; {seconds:.1f}s, "
         f"{tokens / max(seconds, 1e-9):,.0f} tokens/s this run")
    return manifest


def parse_args(argv: list[str] | None = None) -> DatastoreJobConfig:
    p = argparse.ArgumentParser(prog="python -m pipelines.build_datastore", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", action="append", required=True, metavar="NAME=URI",
                   help="a corpus: file or prefix, local or s3:// (repeat for several)")
    p.add_argument("--format", default="auto", help="auto (by extension), jsonl, parquet, text")
    p.add_argument("--text-field", default="text", help="raw-text field (default: text)")
    p.add_argument("--prompt-field", help="instruction data: the prompt field (chat-formatted, context only)")
    p.add_argument("--response-field", help="instruction data: the response field (stored)")
    p.add_argument("--messages-field", help="chat data: a list of {role, content}; the last assistant turn is stored")
    p.add_argument("--no-chat-template", action="store_true", help="do not wrap prompts in the chat template")
    p.add_argument("--output", required=True, help="datastore location, local path or s3://bucket/prefix")
    p.add_argument("--model", help="HF model directory or id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--layer", type=int, default=-1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--value-len", type=int, default=20)
    p.add_argument("--max-len", type=int)
    p.add_argument("--overlap", type=int)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--split-mb", type=float, default=1.0, help="JSONL megabytes per work unit")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs (and intra-op threads) per model worker; default: the cluster's CPUs shared by the workers")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--worker-resources", type=json.loads, metavar="JSON",
                   help='custom Ray resources per model worker, e.g. \'{"gpu_extract": 1}\'')
    p.add_argument("--worker-start-timeout", type=float, default=900.0, metavar="S",
                   help="seconds to wait for all model workers to start before failing")
    p.add_argument("--sample-rows", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--self-distill", action="store_true",
                   help="store the model's own greedy answers to the prompts (the ID datastore)")
    p.add_argument("--distill-max-tokens", type=int, default=256)
    p.add_argument("--distill-method", choices=DISTILL_METHODS, default="batched",
                   help="batched greedy (throughput), or the engine one prompt at a time (pld, ar)")
    p.add_argument("--distill-batch-size", type=int, default=16)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--ray-address", help="join this cluster (default: $RAY_ADDRESS, else a local Ray)")
    a = p.parse_args(argv)
    fields = FieldMap(text=a.text_field, prompt=a.prompt_field, response=a.response_field,
                      messages=a.messages_field, chat_template=not a.no_chat_template)
    if a.self_distill:
        fields = replace(fields, response=None)
    corpora = tuple(parse_corpus(c, a.format, fields) for c in a.corpus)
    return DatastoreJobConfig(
        corpora=corpora, output=a.output, model=a.model, dtype=a.dtype, layer=a.layer, dim=a.dim,
        value_len=a.value_len, max_len=a.max_len, overlap=a.overlap, batch_tokens=a.batch_tokens,
        split_bytes=max(1, int(a.split_mb * (1 << 20))), workers=a.workers, cpus_per_worker=a.cpus_per_worker,
        gpus_per_worker=a.gpus_per_worker, worker_resources=a.worker_resources,
        worker_start_timeout_s=a.worker_start_timeout, sample_rows=a.sample_rows, seed=a.seed,
        self_distill=SelfDistillConfig(max_new_tokens=a.distill_max_tokens, method=a.distill_method,
                                       batch_size=a.distill_batch_size) if a.self_distill else None,
        overwrite=a.overwrite, ray_address=a.ray_address)


def main(argv: list[str] | None = None) -> int:
    from decoding.errors import SenseError, run_command
    from index.storage import StorageError

    def body() -> int:
        build_datastore(parse_args(argv))
        return 0

    return run_command(body, (InputError, DatastoreError, StorageError, JobError, SenseError), prefix="error: ",
                       interrupted="interrupted: rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
