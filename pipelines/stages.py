"""The datastore build's stages: plain callables that Ray Data runs (thin over `decoding` and
`index`: keys from ``decoding.dense_extract``, every file written by ``index.dense_writer``).

    units ──► TokenizeUnits (CPU tasks) ──► ExtractUnits (actor pool, one model per actor)
                                                │ writes shards/<unit>.parquet, tokens/<unit>.parquet,
                                                ▼ then units/<unit>.json (the done marker)
                                           one summary row per unit

    self-distillation: prompt units ──► DistillUnits (actor pool) writes distilled/<unit>.parquet
    (prompts + answers) and its marker, then the distilled unit's shards and done marker as
    above, the keys from the hidden states the answers' decoding computed (no second forward)

Every write is whole-object atomic and names derive from the unit (input file + offset), so a
retried or rerun unit rewrites the same bytes under the same names: no duplicates, no partial files.
The done marker is written last; a unit without one is recomputed on the next run.
"""

from __future__ import annotations

import io
import json
import os
import resource
import time
from dataclasses import asdict

import numpy as np

from decoding.batch_generate import generate_greedy_with_states
from decoding.config import SamplingParams
from decoding.dense_extract import extract_entries, states_by_window, window_defaults
from decoding.engine import generate
from decoding.fingerprint import model_fingerprint
from decoding.methods import make_drafter
from decoding import model_loader
from decoding.target import TargetModel
from index import storage
from index.dense_build import assemble_entries, sample_rows_for_fit
from index.dense_format import TRANSFORM, DatastoreError, KeyTransform
from index.dense_writer import write_entries, write_tokens, write_transform
from index.records import (Document, FieldMap, Unit, _Bad, _format_prompt, _text_field, decode_documents,
                           encode_documents, iter_records, read_unit)

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
                 value_len: int, eos: int, max_len: int, overlap: int, batch_tokens: int) -> None:
        import torch

        if not gpu:
            torch.set_num_threads(max(1, threads))
        self.target = load_target(model, dtype, layer, gpu)
        self.transform = read_transform(output)
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


def distilled_unit(output: str, unit: Unit) -> Unit:
    """The unit of `unit`'s distilled table (prompts + answers): what pass 2 stores."""
    return Unit(unit.corpus, storage.join(output, DISTILLED, f"{unit.name}.parquet"), "tokens", 0, 1,
                unit.file_index)


class Distiller:
    """Self-distillation of one unit at a time: the target's own greedy answers to the unit's
    prompts, written as a token-stream table (prompt + answer; entries for the answer only) under
    distilled/, its marker last. Returns the stored documents, with the hidden states the answers' decoding computed (``generate_greedy_with_states``), so their
    entries need no second forward."""

    def __init__(self, target, *, output: str, max_new_tokens: int, method: str, batch_size: int = 16) -> None:
        self.target, self.output, self.max_new_tokens = target, output, max_new_tokens
        self.method, self.batch_size = method, batch_size

    def _answers(self, prompts: list[list[int]], unit: str) -> tuple[list[list[int]], list]:
        progress = ProgressFile(distill_progress_uri(self.output, unit), len(prompts))
        if self.method == "batched":
            return generate_greedy_with_states(self.target, prompts, self.max_new_tokens,
                                               batch_size=self.batch_size, on_batch=progress.add)
        params = SamplingParams(max_new_tokens=self.max_new_tokens)
        answers = []
        for p in prompts:
            answers.append(list(generate(self.target, p, params=params, drafter=make_drafter(self.method)).token_ids))
            progress.add(1)
        return answers, [None] * len(answers)

    def _prompts(self, unit: Unit, fields: FieldMap) -> tuple[list[int], list[list[int]], dict[str, int]]:
        keys, prompts, bad = [], [], {}
        for key, rec, reason in iter_records(unit):
            try:
                if rec is None:
                    raise _Bad(reason)
                if not isinstance(rec, dict):
                    raise _Bad("plain text where a structured record was expected")
                prompt = _format_prompt(self.target.tokenizer,
                                        [{"role": "user", "content": _text_field(rec, fields.prompt)}],
                                        fields.chat_template)
                if len(prompt) + self.max_new_tokens > self.target.context_window:
                    raise _Bad("prompt too long for the context")
            except _Bad as why:
                bad[str(why)] = bad.get(str(why), 0) + 1
                continue
            keys.append(key)
            prompts.append(prompt)
        return keys, prompts, bad

    def __call__(self, unit: Unit, fields: FieldMap) -> tuple[dict, list[Document], list]:
        """(the distilled table's summary, its documents, their hidden states or None)."""
        keys, prompts, bad = self._prompts(unit, fields)
        answers, states = self._answers(prompts, unit.name)   # each ends with EOS when the model stopped by itself
        # Ids as a plain build gives the prompt records (read_unit): unique across the build's units.
        docs = [Document(doc_id=(unit.file_index << 40) | k, tokens=p + a, store_from=len(p), corpus=unit.corpus)
                for k, p, a in zip(keys, prompts, answers)]
        written = write_tokens(self.output, unit.name, [d.doc_id for d in docs], docs, folder=DISTILLED)
        summary = {"unit": unit.name, "path": written["path"], "documents": len(docs), "bad": bad}
        storage.write_bytes_atomic(storage.join(self.output, DISTILLED, f"{unit.name}.json"),
                                   json.dumps(summary).encode())     # the done marker, last
        return summary, docs, states       # as read_distilled reads them back


def read_distilled(output: str, unit: Unit):
    """A distilled table's documents (``index.records.UnitRecords``), as pass 2 reads them (ids
    by row)."""
    return read_unit(distilled_unit(output, unit), FieldMap(), None, None)


class DistillUnits:
    """Self-distillation stage (:class:`Distiller` on each unit). With `entries` (pass 2's
    settings: value_len, max_len, overlap, batch_tokens), each distilled unit's entries are
    written too, with the key transform the first pass wrote to `output`, from the hidden
    states its answers' decoding computed: pass 2 then finds the unit done and runs no forward
    over it."""

    def __init__(self, *, model: str | None, dtype: str, gpu: bool, threads: int, output: str, eos: int,
                 max_new_tokens: int, method: str, batch_size: int = 16, layer: int = -1,
                 entries: dict | None = None) -> None:
        import torch

        if not gpu:
            torch.set_num_threads(max(1, threads))
        self.target = load_target(model, dtype, layer, gpu)
        self.distill = Distiller(self.target, output=output, max_new_tokens=max_new_tokens, method=method,
                                 batch_size=batch_size)
        self.output, self.eos, self.entries = output, eos, entries
        self.transform = read_transform(output) if entries is not None else None

    def __call__(self, batch: dict) -> dict:
        rows = []
        for unit_row, fields_row in zip(batch["unit"], batch["fields"]):
            unit, fields = _unit(unit_row), _fields(fields_row)
            if (done := finished_distill(self.output, unit.name)) is not None:   # a retried task: see ExtractUnits
                rows.append(json.dumps(done))
                continue
            t0 = time.perf_counter()
            summary, docs, states = self.distill(unit, fields)
            if self.transform is not None:
                write_distilled_entries(self.target, self.output, unit, docs, states, self.transform,
                                        eos=self.eos, t0=t0, **self.entries)
            rows.append(json.dumps(summary))
        return {"summary": np.array(rows, dtype=object)}


def read_transform(output: str) -> KeyTransform:
    with np.load(io.BytesIO(storage.read_bytes(storage.join(output, TRANSFORM)))) as z:
        return KeyTransform(z["mean"], z["std"], z["components"])


def write_distilled_entries(target, output: str, unit: Unit, docs: list, states: list, transform: KeyTransform, *,
                            value_len: int, eos: int, max_len: int, overlap: int, batch_tokens: int, t0: float,
                            phase: str = "distill", keys_by_doc: list | None = None,
                            forward_tokens: int = 0) -> dict:
    """Write pass 2's unit of a distilled unit (entries, token shard, done marker) from the hidden
    states at hand (a forward for the documents without them), or from `keys_by_doc` given."""
    if keys_by_doc is None:
        counter: list[int] = []
        keys_by_doc = states_by_window(target, docs, states, max_len=max_len, overlap=overlap,
                                       batch_tokens=batch_tokens, fn=transform, on_tokens=counter.append)
        forward_tokens = sum(counter)
    ex = assemble_entries(docs, [d.doc_id for d in docs], keys_by_doc, dim=transform.dim, value_len=value_len,
                          eos=eos, forward_tokens=forward_tokens)
    return write_unit(output, distilled_unit(output, unit), docs, ex, {}, len(docs), t0, phase=phase)


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


def fit_sample(*, model: str | None, dtype: str, layer: int, gpu: bool, threads: int, units: list[Unit],
               fields: dict[str, FieldMap], dim: int, sample_rows: int, seed: int, max_len: int | None,
               overlap: int | None, batch_tokens: int, output: str, value_len: int,
               distill: dict | None = None) -> dict:
    """First pass (a Ray task on a model worker): the model's fingerprint, EOS and context; the
    key transform fitted on the documents of the first units (read in order until `sample_rows`
    entry positions are available, then sampled as the single-process builder samples), written
    to the output first; then those units' shards, from the hidden states already computed, so
    the first pass costs no extra forward.

    With `distill` (:class:`Distiller`'s settings: max_new_tokens, method, batch_size), `units`
    are prompt units, self-distilled here in order (a unit distilled before is read back) until
    their answers give `sample_rows` entry positions: the hidden states come from the answers'
    own decoding, and the units written are their distilled tables' (pass 2's)."""
    import torch

    if not gpu:
        torch.set_num_threads(max(1, threads))
    target = load_target(model, dtype, layer, gpu)
    eos = min(target.eos_token_ids) if target.eos_token_ids else 0
    max_len, overlap = window_defaults(target, max_len, overlap)
    distiller = Distiller(target, output=output, **distill) if distill is not None else None
    t0 = time.perf_counter()
    taken, total = [], 0           # (unit, documents, bad, records, hidden rows per document, forward tokens)
    progress = ProgressFile(fit_progress_uri(output))      # tokens through the model so far
    for unit in units:
        states = None
        if distiller is None:
            recs = read_unit(unit, fields[unit.corpus], target.tokenizer, eos)
            docs, bad, records = recs.documents, dict(recs.bad), recs.records
        else:
            if finished_distill(output, unit.name) is not None:
                docs = read_distilled(output, unit).documents
            else:
                _, docs, states = distiller(unit, fields[unit.corpus])
            bad, records = {}, len(docs)
        counter: list[int] = []

        def ran(n: int) -> None:
            counter.append(n)
            progress.add(n)

        rows = states_by_window(target, docs, states or [None] * len(docs), max_len=max_len, overlap=overlap,
                                batch_tokens=batch_tokens, on_tokens=ran)
        taken.append((unit, docs, bad, records, rows, sum(counter)))
        total += sum(sum(len(r) for r in doc_rows) for doc_rows in rows)
        if total >= sample_rows:
            break
    docs = [d for _, unit_docs, _, _, _, _ in taken for d in unit_docs]
    by_doc = [np.concatenate(r) if r else None for *_, rows, _ in taken for r in rows]
    sample = sample_rows_for_fit(docs, by_doc, sample_rows, seed)
    if len(sample) < dim:
        raise DatastoreError(f"the corpus has {len(sample)} positions, fewer than the key dimension {dim}")
    transform = KeyTransform.fit(sample, dim=dim)
    write_transform(output, transform)
    for unit, unit_docs, bad, records, rows, fwd in taken:
        keys = [[transform(h) for h in doc_rows] for doc_rows in rows]
        if distiller is None:
            ex = assemble_entries(unit_docs, [d.doc_id for d in unit_docs], keys, dim=dim, value_len=value_len,
                                  eos=eos, forward_tokens=fwd)
            write_unit(output, unit, unit_docs, ex, bad, records, t0, phase="fit")
        else:
            write_distilled_entries(target, output, unit, unit_docs, [], transform, value_len=value_len, eos=eos,
                                    max_len=max_len, overlap=overlap, batch_tokens=batch_tokens, t0=t0,
                                    phase="fit", keys_by_doc=keys, forward_tokens=fwd)
        t0 = time.perf_counter()
    return {"fingerprint": asdict(model_fingerprint(target)), "key_dtype": str(target.dtype).removeprefix("torch."),
            "eos": int(eos), "max_len": int(max_len),
            "overlap": int(overlap), "sample_documents": len(docs), "units_done": len(taken)}
