"""The datastore build's first pass: the key transform fitted on a sample of the corpus's hidden
states, on a model worker, and the units whose states the sample took written with it (no
forward twice); with self-distillation, the first prompts answered for that sample."""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import numpy as np

from decoding.dense_extract import states_by_window, window_defaults
from decoding.fingerprint import model_fingerprint
from index.dense_build import assemble_entries, sample_rows_for_fit
from index.dense_format import DatastoreError, KeyTransform
from index.dense_writer import write_transform
from index.records import Document, FieldMap, Unit, read_unit
from pipelines.distill import Distiller, read_distilled, write_distilled_entries, write_head
from pipelines.stages import (ProgressFile, distill_progress_uri, finished_distill, fit_progress_uri, load_target,
                              write_unit)


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
    distiller = Distiller(target, output=output, **distill) if distill is not None else None
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
            docs, rows, whole = _distill_for_sample(distiller, unit, fields[unit.corpus], sample_rows - total,
                                                    rows_of)
            taken.append((unit, docs, whole, len(docs) if whole is not None else None, rows, sum(counter)))
        total += sum(sum(len(r) for r in doc_rows) for doc_rows in taken[-1][4])
        if total >= sample_rows:
            break
    docs = [d for _, unit_docs, *_ in taken for d in unit_docs]
    by_doc = [np.concatenate(r) if r else None for *_, rows, _ in taken for r in rows]
    sample = sample_rows_for_fit(docs, by_doc, sample_rows, seed)
    if len(sample) < dim:
        raise DatastoreError(f"the corpus has {len(sample)} positions, fewer than the key dimension {dim}"
                             + _skipped_note([bad for _, _, bad, *_ in taken]))
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
            write_head(output, unit, unit_docs, keys, dim)
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


def _skipped_note(bads: list[dict | None]) -> str:
    """" (N records skipped: reason: count, ...)" for the records the sample's units skipped, else
    "": a corpus too small because its records lack the fields asked for says so."""
    counts: dict[str, int] = {}
    for bad in bads:
        for reason, n in (bad or {}).items():
            counts[reason] = counts.get(reason, 0) + n
    if not counts:
        return ""
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f" ({sum(counts.values())} records skipped: {reasons})"


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
