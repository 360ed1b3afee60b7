"""Corpus input for datastore builds: files -> deterministic work units -> records -> documents.

Pure Python (no Ray): the Ray Data pipeline and the single-process tools share it.

- **Inputs** are named corpora, each a local path or ``s3://`` URI of a file or a prefix
  (directory): JSONL, Parquet or plain text (``format="auto"`` goes by extension).
- **Units**: each file is cut into deterministic work units (JSONL: byte ranges aligned to line
  starts; Parquet: row groups; text: the whole file). A unit's name derives from its corpus, file
  and offset, never from task order, so reruns find the same names (resume) and never duplicate.
- **Records -> documents**: a field mapping turns a record into token ids: raw text, a
  prompt/response pair (the prompt formatted with the model's chat template; only the response
  gets datastore entries), or chat ``messages`` (the last assistant turn is stored).
- **Bad records** (invalid JSON, missing field, wrong type, empty text) are counted per reason
  and reported, never silently dropped and never fatal.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from index import storage
from index.dense_build import Document

UNREADABLE = -1        # Unit.start of a file whose structure could not be read
FORMATS = ("auto", "jsonl", "parquet", "text", "tokens")   # tokens: token-stream tables (dense_writer)
_EXT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet",
        ".txt": "text", ".text": "text", ".md": "text"}


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, UnicodeDecodeError)


_CORRUPT = _corrupt_errors()


class InputError(ValueError):
    """An input corpus is missing, empty or of an unknown format (a user error, not a bad record)."""


@dataclass(frozen=True)
class FieldMap:
    """How a record becomes a document. Exactly one mode applies, chosen by which fields are set:
    `messages` (chat), else `prompt` + `response` (instruction pair), else `prompt` alone (the
    prompts of a self-distillation), else `text` (raw)."""

    text: str = "text"
    prompt: str | None = None
    response: str | None = None
    messages: str | None = None
    chat_template: bool = True          # format prompts with the tokenizer's chat template

    def mode(self) -> str:
        if self.messages:
            return "messages"
        if self.response and not self.prompt:
            raise InputError("a response field needs a prompt field too (--prompt-field)")
        if self.prompt:
            return "pair" if self.response else "prompt"     # prompt only: for self-distillation
        return "text"


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    uri: str
    format: str = "auto"
    fields: FieldMap = field(default_factory=FieldMap)


@dataclass(frozen=True)
class Unit:
    """A deterministic slice of one input file."""

    corpus: str
    uri: str
    format: str
    start: int          # JSONL: byte offset; Parquet: first row group; text: 0
    end: int            # JSONL: byte offset (exclusive); Parquet: row group end; text: 0
    file_index: int     # global index of the file across all corpora (sorted), for document ids

    @property
    def name(self) -> str:
        digest = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
        return f"{_safe(self.corpus)}-{digest}-{self.start:012d}"


@dataclass
class UnitRecords:
    documents: list[Document]
    bad: Counter            # reason -> count
    records: int            # records read (good + bad)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "corpus"


def file_format(uri: str, declared: str) -> str:
    if declared != "auto":
        if declared not in FORMATS:
            raise InputError(f"unknown input format {declared!r}; choose one of {', '.join(FORMATS)}")
        return declared
    lower = uri.lower()
    for ext, fmt in _EXT.items():
        if lower.endswith(ext) or lower.endswith(ext + ".gz"):
            return fmt
    raise InputError(f"{uri}: cannot tell the format from the name; pass --format jsonl|parquet|text")


def list_input_files(spec: CorpusSpec) -> list[str]:
    """The files of a corpus (one file, or every file under a prefix), sorted."""
    # Through storage (remote errors retried, then one StorageError), never a botocore traceback.
    if not storage.exists(spec.uri):
        raise InputError(f"corpus {spec.name!r}: {spec.uri} does not exist")
    if storage.list_names(spec.uri) is None:
        return [spec.uri]
    rels = [r for r in storage.list_files(spec.uri) if not r.rsplit("/", 1)[-1].startswith((".", "_"))]
    if spec.format == "auto":
        rels = [r for r in rels if any(r.lower().endswith(e) for e in _EXT)]
    if not rels:
        raise InputError(f"corpus {spec.name!r}: no input files under {spec.uri}")
    return [storage.join(spec.uri, r) for r in rels]


def plan_units(specs: list[CorpusSpec], split_bytes: int = 1 << 20) -> list[Unit]:
    """Cut every input file into units of about `split_bytes` (JSONL) or one row group (Parquet)."""
    if split_bytes < 1:
        raise InputError("split size must be positive")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InputError(f"corpus names must be unique, got {names}")
    files = sorted((s.name, f, s) for s in specs for f in list_input_files(s))
    units: list[Unit] = []
    for file_index, (_, uri, spec) in enumerate(files):
        fmt = file_format(uri, spec.format)
        fs, path = storage.open_fs(uri)
        if fmt == "jsonl":
            size = fs.size(path)
            for start in range(0, max(size, 1), split_bytes):
                units.append(Unit(spec.name, uri, fmt, start, min(start + split_bytes, size), file_index))
        elif fmt in ("parquet", "tokens"):
            import pyarrow.parquet as pq

            try:
                with fs.open(path, "rb") as f:
                    n_groups = pq.ParquetFile(f).metadata.num_row_groups
            except _CORRUPT + (OSError,) as exc:
                if isinstance(exc, FileNotFoundError):
                    raise InputError(f"{uri}: input file disappeared") from None
                # A corrupt file is one bad input, reported by the unit that reads it; not fatal.
                units.append(Unit(spec.name, uri, fmt, UNREADABLE, 0, file_index))
                continue
            units.extend(Unit(spec.name, uri, fmt, g, g + 1, file_index) for g in range(max(n_groups, 1)))
        else:
            units.append(Unit(spec.name, uri, fmt, 0, 0, file_index))
    return units


# -- reading a unit --------------------------------------------------------------------------

def _jsonl_lines(unit: Unit) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of each line that *starts* in [start, end): a line straddling the
    boundary belongs to the unit where it starts, so every line is read exactly once."""
    fs, path = storage.open_fs(unit.uri)
    with fs.open(path, "rb") as f:
        pos = unit.start
        if pos > 0:
            f.seek(pos - 1)
            if f.read(1) != b"\n":          # we are mid-line: it belongs to the previous unit
                pos += len(f.readline())
        else:
            f.seek(0)
        while pos < unit.end:
            line = f.readline()
            if not line:
                break
            yield pos, line
            pos += len(line)


def iter_records(unit: Unit) -> Iterator[tuple[int, dict | str | None, str | None]]:
    """(record key, record, bad reason) for each record of a unit; record None when bad.
    The key is unique within the file (byte offset or row number)."""
    if unit.format == "jsonl":
        for offset, line in _jsonl_lines(unit):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield offset, None, "invalid JSON"
                continue
            if not isinstance(rec, dict):
                yield offset, None, "not a JSON object"
                continue
            yield offset, rec, None
    elif unit.format == "parquet":
        import pyarrow.parquet as pq

        fs, path = storage.open_fs(unit.uri)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if pf.metadata.num_row_groups == 0:
                return
            first = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start))
            for i, rec in enumerate(pf.read_row_group(unit.start).to_pylist()):
                yield first + i, rec, None
    else:
        raw = storage.read_bytes(unit.uri)
        try:
            yield 0, raw.decode("utf-8"), None
        except UnicodeDecodeError:
            yield 0, None, "not UTF-8 text"


def _text_field(rec: dict, name: str) -> str:
    if name not in rec or rec[name] is None:
        raise _Bad(f"missing field {name!r}")
    value = rec[name]
    if not isinstance(value, str):
        raise _Bad(f"field {name!r} is not a string")
    if not value.strip():
        raise _Bad(f"empty {name!r}")
    return value


class _Bad(Exception):
    pass


def record_to_document(rec: dict | str, fields: FieldMap, tokenizer, eos: int | None) -> tuple[list[int], int]:
    """(tokens, store_from) of one record. Raises _Bad with the reason for a bad record."""
    mode = fields.mode()
    if isinstance(rec, str):                       # a plain-text file
        if mode != "text":
            raise _Bad("plain text where a structured record was expected")
        if not rec.strip():
            raise _Bad("empty text")
        return tokenizer(rec)["input_ids"], 0
    if mode == "text":
        return tokenizer(_text_field(rec, fields.text))["input_ids"], 0
    if mode == "prompt":
        raise InputError("a prompt-only corpus needs --self-distill (or a --response-field)")
    if mode == "pair":
        prompt_text = _text_field(rec, fields.prompt)
        response = tokenizer(_text_field(rec, fields.response))["input_ids"]
        prompt = _format_prompt(tokenizer, [{"role": "user", "content": prompt_text}], fields.chat_template)
    else:
        msgs = rec.get(fields.messages)
        if not isinstance(msgs, list) or not msgs:
            raise _Bad(f"missing or empty {fields.messages!r} list")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in msgs):
            raise _Bad("a message lacks a string role or content")
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise _Bad("the last message is not a non-empty assistant turn")
        prompt = _format_prompt(tokenizer, msgs[:-1], fields.chat_template)
        response = tokenizer(msgs[-1]["content"])["input_ids"]
    if not response:
        raise _Bad("empty response")
    tail = [eos] if eos is not None else []
    return prompt + response + tail, len(prompt)


def _format_prompt(tokenizer, messages: list[dict], chat_template: bool) -> list[int]:
    """Token ids the model reads before answering: the chat template with the generation prompt
    (exactly what decoding.engine.encode_prompt produces), or the plain concatenated text."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer("\n".join(m["content"] for m in messages) + "\n")["input_ids"]


def document_id(unit: Unit, key: int) -> int:
    """A record's document id: its file's index across the build, then its key within the file
    (``iter_records``: a JSONL byte offset, a Parquet row), unique across the build's units."""
    return (unit.file_index << 40) | key


def read_unit(unit: Unit, fields: FieldMap, tokenizer, eos: int | None, *, min_tokens: int = 2) -> UnitRecords:
    """Documents of one unit; bad records counted by reason (never raised)."""
    docs, bad, n = [], Counter(), 0
    if unit.format == "tokens":
        return _read_token_unit(unit)
    if unit.start == UNREADABLE:
        return UnitRecords([], Counter({"unreadable Parquet file": 1}), 1)
    try:
        records = list(iter_records(unit))
    except FileNotFoundError:
        raise InputError(f"{unit.uri}: input file disappeared during the build") from None
    except _CORRUPT as exc:  # corrupt content (a bad Parquet row group): a bad record, not a failure;
        # storage errors (network, credentials) propagate so the task is retried or the job fails.
        bad[f"unreadable input ({type(exc).__name__})"] += 1
        return UnitRecords([], bad, 1)
    if not records and unit.start == 0:
        bad["empty file"] += 1          # reported once, by the file's first unit
    for key, rec, reason in records:
        n += 1
        if rec is None:
            bad[reason] += 1
            continue
        try:
            tokens, store_from = record_to_document(rec, fields, tokenizer, eos)
        except _Bad as why:
            bad[str(why)] += 1
            continue
        if len(tokens) < min_tokens:
            bad["too short (under 2 tokens)"] += 1
            continue
        docs.append(Document(doc_id=document_id(unit, key), tokens=list(tokens), store_from=store_from,
                             corpus=unit.corpus))
    return UnitRecords(docs, bad, n)


def encode_documents(docs: list[Document]) -> bytes:
    """Compact bytes for passing a unit's documents between pipeline stages."""
    import numpy as np

    buf = io.BytesIO()
    lens = np.array([len(d.tokens) for d in docs], dtype=np.int64)
    np.savez(buf, doc_id=np.array([d.doc_id for d in docs], dtype=np.int64), lens=lens,
             store_from=np.array([d.store_from for d in docs], dtype=np.int64),
             tokens=np.concatenate([np.asarray(d.tokens, dtype=np.int64) for d in docs]) if docs
             else np.zeros(0, np.int64),
             corpus=np.array([d.corpus for d in docs], dtype=str))
    return buf.getvalue()


def decode_documents(data: bytes) -> list[Document]:
    import numpy as np

    with np.load(io.BytesIO(data)) as z:
        bounds = np.concatenate([[0], np.cumsum(z["lens"])])
        toks = z["tokens"]
        return [Document(doc_id=int(i), tokens=toks[a:b].tolist(), store_from=int(s), corpus=str(c))
                for i, a, b, s, c in zip(z["doc_id"], bounds[:-1], bounds[1:], z["store_from"], z["corpus"])]


def _read_token_unit(unit: Unit) -> UnitRecords:
    """A row group of a token-stream table (``index.dense_writer.tokens_table``): documents as is,
    with the ids they were written with (a self-distilled document keeps its prompt record's id,
    so the tables of a file's several units never share one)."""
    import pyarrow.parquet as pq

    fs, path = storage.open_fs(unit.uri)
    with fs.open(path, "rb") as f:
        table = pq.ParquetFile(f).read_row_group(unit.start)
    docs = [Document(doc_id=int(i), tokens=list(t), store_from=int(s), corpus=unit.corpus)
            for i, t, s in zip(table.column("doc_id").to_pylist(), table.column("tokens").to_pylist(),
                               table.column("store_from").to_pylist())]
    return UnitRecords(docs, Counter(), len(docs))
