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
import math
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
    """Self-distillation: the target's own greedy answers to a unit's prompts, with the hidden
    states their decoding computed (``generate_greedy_with_states``; None off the lean forward),
    so that their entries need no second forward; the documents (prompt + answer, entries for
    the answer only) written as a token-stream table under distilled/, its marker last."""

    def __init__(self, target, *, output: str, max_new_tokens: int, method: str, batch_size: int = 16) -> None:
        self.target, self.output, self.max_new_tokens = target, output, max_new_tokens
        self.method, self.batch_size = method, batch_size

    def prompts(self, unit: Unit, fields: FieldMap) -> tuple[list[int], list[list[int]], dict[str, int]]:
        """The unit's prompts, chat-formatted, with their record keys, and its bad records by reason."""
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

    def answer(self, unit: Unit, keys: list[int], prompts: list[list[int]], progress: ProgressFile
               ) -> tuple[list[Document], list]:
        """The documents of these prompts (ids as a plain build gives their records: unique across
        the build's units) and their states; each answer ends with EOS where the model stopped."""
        if self.method == "batched":
            answers, states = generate_greedy_with_states(self.target, prompts, self.max_new_tokens,
                                                          batch_size=self.batch_size, on_batch=progress.add)
        else:
            params = SamplingParams(max_new_tokens=self.max_new_tokens)
            answers, states = [], [None] * len(prompts)
            for p in prompts:
                answers.append(list(generate(self.target, p, params=params,
                                             drafter=make_drafter(self.method)).token_ids))
                progress.add(1)
        docs = [Document(doc_id=(unit.file_index << 40) | k, tokens=p + a, store_from=len(p), corpus=unit.corpus)
                for k, p, a in zip(keys, prompts, answers)]
        return docs, states

    def write(self, unit: Unit, docs: list[Document], bad: dict[str, int]) -> dict:
        """The distilled table (read back by :func:`read_distilled`), then its marker; its summary."""
        written = write_tokens(self.output, unit.name, [d.doc_id for d in docs], docs, folder=DISTILLED)
        summary = {"unit": unit.name, "path": written["path"], "documents": len(docs), "bad": bad}
        storage.write_bytes_atomic(storage.join(self.output, DISTILLED, f"{unit.name}.json"),
                                   json.dumps(summary).encode())     # the done marker, last
        return summary


def read_distilled(output: str, unit: Unit):
    """A distilled table's documents (``index.records.UnitRecords``), as pass 2 reads them."""
    return read_unit(distilled_unit(output, unit), FieldMap(), None, None)


def head_uri(output: str, unit: Unit) -> str:
    return storage.join(output, DISTILLED, f"{unit.name}.head.npz")


def write_head(output: str, unit: Unit, docs: list[Document], keys_by_doc: list[list[np.ndarray]]) -> None:
    """The first prompts of a unit the first pass distilled for its sample (documents and their
    keys), for the pool to finish the unit from rather than answer them again."""
    keys = [np.concatenate(k) if k else np.zeros((0, 0), np.float32) for k in keys_by_doc]
    dim = max((k.shape[1] for k in keys if k.size), default=0)
    buf = io.BytesIO()
    np.savez(buf, doc_id=np.array([d.doc_id for d in docs], np.int64),
             store_from=np.array([d.store_from for d in docs], np.int64),
             lens=np.array([len(d.tokens) for d in docs], np.int64),
             tokens=np.concatenate([np.asarray(d.tokens, np.int64) for d in docs]) if docs else np.zeros(0, np.int64),
             key_rows=np.array([len(k) for k in keys], np.int64),
             keys=np.concatenate([k.reshape(-1, dim) for k in keys]) if dim else np.zeros((0, 0), np.float32))
    storage.write_bytes_atomic(head_uri(output, unit), buf.getvalue())


def read_head(output: str, unit: Unit) -> tuple[list[Document], list[list[np.ndarray]]]:
    """:func:`write_head`'s documents and keys ([] and [] where there is none)."""
    try:
        data = storage.read_bytes(head_uri(output, unit))
    except FileNotFoundError:
        return [], []
    with np.load(io.BytesIO(data)) as z:
        ends, key_ends = np.cumsum(z["lens"]), np.cumsum(z["key_rows"])
        docs = [Document(doc_id=int(i), tokens=z["tokens"][e - n: e].tolist(), store_from=int(s), corpus=unit.corpus)
                for i, s, n, e in zip(z["doc_id"], z["store_from"], z["lens"], ends)]
        keys = [[z["keys"][e - n: e]] if n else [] for n, e in zip(z["key_rows"], key_ends)]
    return docs, keys


class DistillUnits:
    """Self-distillation stage: each unit's answers (:class:`Distiller`), its distilled table, and
    its entries (pass 2's unit), keyed with the transform the first pass wrote to `output` from
    the hidden states the answers' decoding computed: pass 2 then finds the unit done and runs
    no forward over it. `entries`: pass 2's settings (value_len, max_len, overlap, batch_tokens).
    A unit the first pass began (its sample ended inside it) is finished from that head."""

    def __init__(self, *, model: str | None, dtype: str, gpu: bool, threads: int, output: str, eos: int,
                 max_new_tokens: int, method: str, entries: dict, batch_size: int = 16, layer: int = -1) -> None:
        import torch

        if not gpu:
            torch.set_num_threads(max(1, threads))
        self.target = load_target(model, dtype, layer, gpu)
        self.distill = Distiller(self.target, output=output, max_new_tokens=max_new_tokens, method=method,
                                 batch_size=batch_size)
        self.output, self.eos, self.entries = output, eos, entries
        self.transform = read_transform(output)

    def __call__(self, batch: dict) -> dict:
        rows = []
        for unit_row, fields_row in zip(batch["unit"], batch["fields"]):
            unit, fields = _unit(unit_row), _fields(fields_row)
            if (done := finished_distill(self.output, unit.name)) is not None:   # a retried task: see ExtractUnits
                rows.append(json.dumps(done))
                continue
            t0 = time.perf_counter()
            keys, prompts, bad = self.distill.prompts(unit, fields)
            head, head_keys = read_head(self.output, unit)
            if [d.doc_id for d in head] != [(unit.file_index << 40) | k for k in keys[: len(head)]]:
                head, head_keys = [], []        # not this unit's first prompts: answer them all
            progress = ProgressFile(distill_progress_uri(self.output, unit.name), len(prompts))
            progress.add(len(head))
            docs, states = self.distill.answer(unit, keys[len(head):], prompts[len(head):], progress)
            summary = self.distill.write(unit, head + docs, bad)
            write_distilled_entries(self.target, self.output, unit, head + docs, states, self.transform,
                                    eos=self.eos, t0=t0, known_keys=head_keys, **self.entries)
            rows.append(json.dumps(summary))
        return {"summary": np.array(rows, dtype=object)}


def read_transform(output: str) -> KeyTransform:
    with np.load(io.BytesIO(storage.read_bytes(storage.join(output, TRANSFORM)))) as z:
        return KeyTransform(z["mean"], z["std"], z["components"])


def write_distilled_entries(target, output: str, unit: Unit, docs: list, states: list, transform: KeyTransform, *,
                            value_len: int, eos: int, max_len: int, overlap: int, batch_tokens: int, t0: float,
                            phase: str = "distill", known_keys: list | None = None, forward_tokens: int = 0) -> dict:
    """Write pass 2's unit of a distilled unit (entries, token shard, done marker): the keys of
    its first documents given (`known_keys`, one list of blocks per document), the others' from
    their hidden states (`states`, one per document after those; a forward for any without)."""
    known = list(known_keys or [])
    counter: list[int] = []
    rest = docs[len(known):]
    keys_by_doc = known + states_by_window(target, rest, states if states else [None] * len(rest), max_len=max_len,
                                           overlap=overlap, batch_tokens=batch_tokens, fn=transform,
                                           on_tokens=counter.append)
    ex = assemble_entries(docs, [d.doc_id for d in docs], keys_by_doc, dim=transform.dim, value_len=value_len,
                          eos=eos, forward_tokens=forward_tokens + sum(counter))
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
    are prompt units, self-distilled here in order (a unit distilled before is read back) only
    until their answers give `sample_rows` entry positions, whatever the units' size: the states
    come from the answers' own decoding; the units answered whole are written (their distilled
    tables' entries), and the first prompts of a unit the sample ended in are kept with their
    keys (:func:`write_head`) for the pool to finish it from."""
    import torch

    if not gpu:
        torch.set_num_threads(max(1, threads))
    target = load_target(model, dtype, layer, gpu)
    eos = min(target.eos_token_ids) if target.eos_token_ids else 0
    max_len, overlap = window_defaults(target, max_len, overlap)
    t0 = time.perf_counter()
    taken, total = [], 0           # (unit, documents, bad, records or None for a head, rows per document, forward tokens)
    progress = ProgressFile(fit_progress_uri(output))      # tokens through the model so far
    counter: list[int] = []

    def ran(n: int) -> None:
        counter.append(n)
        progress.add(n)

    def rows_of(docs, states=None) -> list:
        return states_by_window(target, docs, states or [None] * len(docs), max_len=max_len, overlap=overlap,
                                batch_tokens=batch_tokens, on_tokens=ran)

    for unit in units:
        counter.clear()
        if distill is None:
            recs = read_unit(unit, fields[unit.corpus], target.tokenizer, eos)
            rows = rows_of(recs.documents)
            taken.append((unit, recs.documents, dict(recs.bad), recs.records, rows, sum(counter)))
        elif finished_distill(output, unit.name) is not None:
            docs = read_distilled(output, unit).documents
            rows = rows_of(docs)
            taken.append((unit, docs, {}, len(docs), rows, sum(counter)))
        else:
            docs, rows, whole = _distill_for_sample(Distiller(target, output=output, **distill), unit,
                                                    fields[unit.corpus], sample_rows - total, rows_of)
            taken.append((unit, docs, whole, len(docs) if whole is not None else None, rows, sum(counter)))
        total += sum(sum(len(r) for r in doc_rows) for doc_rows in taken[-1][4])
        if total >= sample_rows:
            break
    docs = [d for _, unit_docs, *_ in taken for d in unit_docs]
    by_doc = [np.concatenate(r) if r else None for *_, rows, _ in taken for r in rows]
    sample = sample_rows_for_fit(docs, by_doc, sample_rows, seed)
    if len(sample) < dim:
        raise DatastoreError(f"the corpus has {len(sample)} positions, fewer than the key dimension {dim}")
    transform = KeyTransform.fit(sample, dim=dim)
    write_transform(output, transform)
    units_done = 0
    for unit, unit_docs, bad, records, rows, fwd in taken:
        keys = [[transform(h) for h in doc_rows] for doc_rows in rows]
        if distill is None:
            ex = assemble_entries(unit_docs, [d.doc_id for d in unit_docs], keys, dim=dim, value_len=value_len,
                                  eos=eos, forward_tokens=fwd)
            write_unit(output, unit, unit_docs, ex, bad, records, t0, phase="fit")
        elif records is None:               # the sample ended inside this unit: the pool finishes it
            write_head(output, unit, unit_docs, keys)
            continue
        else:
            write_distilled_entries(target, output, unit, unit_docs, [], transform, value_len=value_len, eos=eos,
                                    max_len=max_len, overlap=overlap, batch_tokens=batch_tokens, t0=t0,
                                    phase="fit", known_keys=keys, forward_tokens=fwd)
        units_done += 1
        t0 = time.perf_counter()
    return {"fingerprint": asdict(model_fingerprint(target)), "key_dtype": str(target.dtype).removeprefix("torch."),
            "eos": int(eos), "max_len": int(max_len),
            "overlap": int(overlap), "sample_documents": len(docs), "units_done": units_done}


def _distill_for_sample(distiller: Distiller, unit: Unit, fields: FieldMap, need: int, rows_of
                        ) -> tuple[list[Document], list, dict | None]:
    """Answer a unit's prompts in order, a batch's worth at a time, until their entry positions
    reach `need` (then the answers are a head of the unit) or the prompts end (the unit is
    written whole). Returns (documents, hidden rows per document, the unit's bad records if it
    was answered whole, else None)."""
    keys, prompts, bad = distiller.prompts(unit, fields)
    progress = ProgressFile(distill_progress_uri(distiller.output, unit.name), len(prompts))
    docs, rows, got, i = [], [], 0, 0
    while i < len(prompts) and got < need:
        # Enough prompts for what is missing at the answers' length so far (the longest at first),
        # at least one batch: the continuous batch stays full.
        per = (sum(len(d.tokens) - d.store_from for d in docs) / len(docs)) if docs else distiller.max_new_tokens
        n = max(distiller.batch_size, math.ceil((need - got) / max(per, 1.0)))
        part, states = distiller.answer(unit, keys[i: i + n], prompts[i: i + n], progress)
        part_rows = rows_of(part, states)
        docs, rows, i = docs + part, rows + part_rows, i + len(part)
        got += sum(sum(len(r) for r in doc_rows) for doc_rows in part_rows)
    if i < len(prompts):
        return docs, rows, None
    distiller.write(unit, docs, bad)
    return docs, rows, bad
