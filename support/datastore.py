"""The datastore pipeline's small build, as the tests and the reliability benchmark run it: its
corpus (GSM8K train pairs), its command line (small settings) and the entries it wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index import storage
from index.corpus import gsm8k, gsm8k_answer_text


def write_gsm8k_corpus(path: Path, n: int, bad: bool = True) -> list[dict]:
    """The first `n` GSM8K train pairs as JSONL records {"question", "answer"} at `path`; with
    `bad`, three bad records among them (invalid JSON, no answer, a blank answer). Returns the
    good records."""
    rows = [{"question": r["question"], "answer": gsm8k_answer_text(r["answer"])} for r in gsm8k("train")[:n]]
    with path.open("w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps(r) + "\n")
            if bad and i == 2:
                f.write("{not json\n")
            if bad and i == 4:
                f.write(json.dumps({"question": "no answer here"}) + "\n")
            if bad and i == 6:
                f.write(json.dumps({"question": "q", "answer": "   "}) + "\n")
    return rows


def build_cli(corpus: Path, out, *extra: str) -> list[str]:
    """The command line of a small datastore build of `corpus` (a write_gsm8k_corpus file) into
    `out` (a local path or s3:// URI): 32-dimensional keys, 8-token values, 2 KiB units, float32
    (as the tests' in-process builds, which the CLI builds are compared with)."""
    return [sys.executable, "-m", "pipelines.build_datastore", "--corpus", f"gsm={corpus}", "--prompt-field",
            "question", "--response-field", "answer", "--output", str(out), "--dim", "32", "--value-len", "8",
            "--split-mb", str(2048 / (1 << 20)), "--sample-rows", "200", "--dtype", "float32",
            *extra]


def read_entries(root: str) -> dict[str, np.ndarray]:
    """All entries of a datastore (local or s3://), sorted by (doc_id, position): arrays
    "doc_id", "position", "key" [N, dim], "value" [N, value_len], "first_token", and its "manifest"."""
    manifest = json.loads(storage.read_bytes(storage.join(root, "manifest.json")))
    tables = []
    for shard in manifest["shards"]:
        fs, path = storage.open_fs(storage.join(root, shard["path"]))
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    t = pa.concat_tables(tables)
    doc = t.column("doc_id").to_numpy()
    pos = t.column("position").to_numpy()
    order = np.lexsort((pos, doc))
    d = manifest["key_dim"]
    n = manifest["value_len"]
    return {"doc_id": doc[order], "position": pos[order],
            "key": t.column("key").combine_chunks().flatten().to_numpy().reshape(-1, d)[order],
            "value": t.column("value").combine_chunks().flatten().to_numpy().reshape(-1, n)[order],
            "first_token": t.column("first_token").to_numpy()[order], "manifest": manifest}
