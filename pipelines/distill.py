"""Self-distillation, the pipeline's stage for ID datastores: the target's own greedy answers to
a prompt corpus, stored as documents (prompt + answer, entries for the answer only) whose keys
come from the hidden states the answers' decoding computed, so no second forward runs over them.

    prompt units ──► DistillUnits (actor pool) writes distilled/<unit>.parquet (prompts + answers)
                     and its marker, then the distilled unit's shards and done marker as
                     ``pipelines.stages.write_unit`` writes any unit's

The first pass (``pipelines.first_pass``) answers the first prompts for the key transform's
sample; a unit its sample ends inside is kept as a head (:func:`write_head`) that the pool
finishes from.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np

from decoding.batch_generate import generate_greedy_with_states, generate_with_states
from decoding.dense_extract import states_by_window
from decoding.methods import make_drafter
from index import storage
from index.dense_build import assemble_entries
from index.dense_format import KeyTransform
from index.dense_writer import write_tokens
from index.records import (Document, FieldMap, Unit, _Bad, _format_prompt, _text_field, document_id, iter_records,
                           read_unit)
from pipelines.stages import (DISTILLED, ProgressFile, _fields, _unit, distill_progress_uri, finished_distill,
                              load_target, write_unit)


def distilled_unit(output: str, unit: Unit) -> Unit:
    """The unit of `unit`'s distilled table (prompts + answers): what pass 2 stores."""
    return Unit(unit.corpus, storage.join(output, DISTILLED, f"{unit.name}.parquet"), "tokens", 0, 1,
                unit.file_index)


class Distiller:
    """Self-distillation: the target's own greedy answers to a unit's prompts, with the hidden
    states their decoding computed (``generate_greedy_with_states``, or ``generate_with_states``
    for a drafting method, one prompt at a time; None off the lean forward),
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
            answers, states = [], []
            for p in prompts:
                answer, rows = generate_with_states(self.target, p, self.max_new_tokens, make_drafter(self.method))
                answers.append(answer)
                states.append(rows)
                progress.add(1)
        docs = [Document(doc_id=document_id(unit, k), tokens=p + a, store_from=len(p), corpus=unit.corpus)
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


def write_head(output: str, unit: Unit, docs: list[Document], keys_by_doc: list[list[np.ndarray]], dim: int) -> None:
    """The first prompts of a unit the first pass distilled for its sample (documents and their
    keys of `dim` columns), for the pool to finish the unit from rather than answer them again."""
    keys = [np.concatenate(k) if k else np.zeros((0, dim), np.float32) for k in keys_by_doc]
    buf = io.BytesIO()
    np.savez(buf, doc_id=np.array([d.doc_id for d in docs], np.int64),
             store_from=np.array([d.store_from for d in docs], np.int64),
             lens=np.array([len(d.tokens) for d in docs], np.int64),
             tokens=np.concatenate([np.asarray(d.tokens, np.int64) for d in docs]) if docs else np.zeros(0, np.int64),
             key_rows=np.array([len(k) for k in keys], np.int64),
             keys=np.concatenate(keys) if keys else np.zeros((0, dim), np.float32))
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

    def __init__(self, *, model: str | None, dtype: str, gpu: bool, threads: int, output: str,
                 transform: KeyTransform, eos: int, max_new_tokens: int, method: str, entries: dict,
                 batch_size: int = 16, layer: int = -1) -> None:
        import torch

        if not gpu:
            torch.set_num_threads(max(1, threads))
        self.target = load_target(model, dtype, layer, gpu)
        self.distill = Distiller(self.target, output=output, max_new_tokens=max_new_tokens, method=method,
                                 batch_size=batch_size)
        self.output, self.eos, self.entries = output, eos, entries
        self.transform = transform          # read by the driver: a worker's start reads no storage

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
            if [d.doc_id for d in head] != [document_id(unit, k) for k in keys[: len(head)]]:
                head, head_keys = [], []        # not this unit's first prompts: answer them all
            progress = ProgressFile(distill_progress_uri(self.output, unit.name), len(prompts))
            progress.add(len(head))
            docs, states = self.distill.answer(unit, keys[len(head):], prompts[len(head):], progress)
            summary = self.distill.write(unit, head + docs, bad)
            write_distilled_entries(self.target, self.output, unit, head + docs, states, self.transform,
                                    eos=self.eos, t0=t0, known_keys=head_keys, **self.entries)
            rows.append(json.dumps(summary))
        return {"summary": np.array(rows, dtype=object)}


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
