"""The datastore build's stages: plain callables that Ray Data runs (thin over `decoding` and
`index`: keys from ``decoding.dense_extract``, every file written by ``index.dense_writer``).

    units ──► TokenizeUnits (CPU tasks) ──► ExtractUnits (actor pool, one model per actor)
                                                │ writes shards/<unit>.parquet, tokens/<unit>.parquet,
                                                ▼ then units/<unit>.json (the done marker)
                                           one summary row per unit

Every write is whole-object atomic and names derive from the unit (input file + offset), so a
retried or rerun unit rewrites the same bytes under the same names: no duplicates, no partial files.
The done marker is written last; a unit without one is recomputed on the next run. The first pass
is ``pipelines.first_pass``, self-distillation's stage ``pipelines.distill``.
"""

from __future__ import annotations

import io
import json
import os
import resource
import time
from dataclasses import asdict

import numpy as np

from decoding.dense_extract import extract_entries
from decoding import model_loader
from decoding.target import TargetModel
from index import storage
from index.dense_format import TRANSFORM, KeyTransform
from index.dense_writer import write_entries, write_tokens
from index.records import FieldMap, Unit, decode_documents, encode_documents, read_unit

UNITS, DISTILLED = "units", "distilled"
# Fault hook for tests (as faiss's on-disk tests use crash_at): an extraction actor started with
# this variable set to N in its environment stops making progress after writing N units, as if its
# node hung, so a test can kill the node at a known point of the build. Unset in real runs.
STALL_AFTER_UNITS_ENV = "SENSE_FAULT_STALL_AFTER_UNITS"


def _stall_forever() -> None:
    while True:
        time.sleep(3600)


def unit_to_row(unit: Unit, fields: FieldMap) -> dict:
    return {"unit": json.dumps(asdict(unit)), "fields": json.dumps(asdict(fields))}


def _unit(row) -> Unit:
    return Unit(**json.loads(row))


def _fields(row) -> FieldMap:
    return FieldMap(**json.loads(row))


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def done_marker(output: str, unit_name: str) -> str:
    return storage.join(output, UNITS, f"{unit_name}.json")


def finished_unit(output: str, unit_name: str) -> dict | None:
    """The unit's summary if it finished (done marker present and its shard files exist)."""
    try:
        summary = json.loads(storage.read_bytes(done_marker(output, unit_name)))
    except FileNotFoundError:
        return None
    for key in ("shard", "token_shard"):
        if summary.get(key) and not storage.exists(storage.join(output, summary[key]["path"])):
            return None
    return summary


def finished_distill(output: str, unit_name: str) -> dict | None:
    """The distilled unit's summary if its table was written (the marker is written last)."""
    try:
        return json.loads(storage.read_bytes(storage.join(output, DISTILLED, f"{unit_name}.json")))
    except FileNotFoundError:
        return None


def load_target(model: str | None, dtype: str, layer: int, gpu: bool):
    """The target model in a worker; dtype "auto": the dtype measured fastest on the worker's
    machine (decoding.dtype_choice; remembered per machine, so each node measures once)."""
    return TargetModel.load(model, dtype=dtype, device="cuda" if gpu else "cpu", hidden_layer=layer)


def load_tokenizer(model: str | None):
    """The model's tokenizer (HF directory, hub id or .gguf file: decoding.model_loader)."""
    return model_loader.load_tokenizer(model)


class TokenizeUnits:
    """CPU stage: read a unit's records, apply the field mapping and chat template, tokenize."""

    def __init__(self, model: str | None, eos: int) -> None:
        self.tokenizer = load_tokenizer(model)
        self.eos = eos

    def __call__(self, batch: dict) -> dict:
        out = {"unit": [], "docs": [], "bad": [], "records": []}
        for unit_row, fields_row in zip(batch["unit"], batch["fields"]):
            recs = read_unit(_unit(unit_row), _fields(fields_row), self.tokenizer, self.eos)
            out["unit"].append(unit_row)
            out["docs"].append(encode_documents(recs.documents))
            out["bad"].append(json.dumps(dict(recs.bad)))
            out["records"].append(recs.records)
        return {k: np.array(v, dtype=object) for k, v in out.items()}


class ExtractUnits:
    """Model stage (one actor per GPU, or per CPU slot): hidden states -> keys, values -> shards."""

    def __init__(self, *, model: str | None, dtype: str, layer: int, gpu: bool, threads: int, output: str,
                 transform: KeyTransform, value_len: int, eos: int, max_len: int, overlap: int,
                 batch_tokens: int) -> None:
        """`transform`: the build's key transform, read by the driver (a worker's start reads no storage)."""
        import torch

        if not gpu:
            torch.set_num_threads(max(1, threads))
        self.target = load_target(model, dtype, layer, gpu)
        self.transform = transform
        self.output, self.value_len, self.eos = output, value_len, eos
        self.max_len, self.overlap, self.batch_tokens = max_len, overlap, batch_tokens
        stall = os.environ.get(STALL_AFTER_UNITS_ENV)
        self.stall_after, self.written = (int(stall) if stall else None), 0

    def __call__(self, batch: dict) -> dict:
        rows = []
        for unit_row, docs_blob, bad, records in zip(batch["unit"], batch["docs"], batch["bad"], batch["records"]):
            t0 = time.perf_counter()
            unit = _unit(unit_row)
            # Ray retries a task whose node died after the unit was written, and re-runs one whose
            # output object was lost with its node: the finished unit stands, its work is not redone.
            if (done := finished_unit(self.output, unit.name)) is not None:
                rows.append(json.dumps(done))
                continue
            if self.stall_after is not None and self.written >= self.stall_after:
                _stall_forever()
            docs = decode_documents(docs_blob)
            ex = extract_entries(self.target, self.transform, docs, [d.doc_id for d in docs],
                                 value_len=self.value_len, eos=self.eos, max_len=self.max_len,
                                 overlap=self.overlap, batch_tokens=self.batch_tokens)
            summary = write_unit(self.output, unit, docs, ex, json.loads(bad), int(records), t0)
            self.written += 1
            rows.append(json.dumps(summary))
        return {"summary": np.array(rows, dtype=object)}


def write_unit(output: str, unit: Unit, docs: list, ex, bad: dict, records: int, t0: float,
               phase: str = "extract") -> dict:
    """Write a unit's entry shard and token shard, then its done marker (last); return the summary."""
    summary = {"unit": unit.name, "corpus": unit.corpus, "records": records, "bad": bad, "documents": len(docs),
               "tokens": int(sum(len(d.tokens) for d in docs)), "entries": int(len(ex.keys)),
               "forward_tokens": int(ex.forward_tokens), "shard": None, "token_shard": None, "phase": phase}
    if len(ex.keys):
        summary["shard"] = write_entries(output, unit.name, ex.keys, ex.values, ex.doc_ids, ex.positions, ex.corpus)
    if docs:
        summary["token_shard"] = write_tokens(output, unit.name, [d.doc_id for d in docs], docs)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["node"] = _node_id()
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    storage.write_bytes_atomic(done_marker(output, unit.name), json.dumps(summary).encode())
    return summary


def read_transform(output: str) -> KeyTransform:
    with np.load(io.BytesIO(storage.read_bytes(storage.join(output, TRANSFORM)))) as z:
        return KeyTransform(z["mean"], z["std"], z["components"])


class ProgressFile:
    """How far a long task in a worker is, written to `uri` (at most every `every_s` seconds) for
    the driver's progress lines: a distilled unit of hundreds of prompts, or the first pass over
    a large sample, takes minutes. `total` None: a running count only."""

    def __init__(self, uri: str, total: int | None = None, every_s: float = 10.0) -> None:
        self.uri, self.total, self.done, self.every_s = uri, total, 0, every_s
        self.t0 = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            try:
                storage.write_bytes_atomic(self.uri, json.dumps(
                    {"done": self.done, "total": self.total, "seconds": round(now - self.t0, 1)}).encode())
            except Exception:       # progress is best effort: a storage hiccup must not fail the work
                pass


def read_progress(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except Exception:       # not written yet (or being replaced): no line this time
        return None


def distill_progress_uri(output: str, unit: str) -> str:
    return storage.join(output, DISTILLED, f"{unit}.progress.json")


def fit_progress_uri(output: str) -> str:
    return storage.join(output, "first-pass.progress.json")
