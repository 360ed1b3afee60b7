"""The demo's datastores, built from GSM8K train into the local cache on first use.

Used by ``sense generate``/``sense demo``, by serving's "default" index source and by the
benchmarks: here, below both, because building the dense one runs the target model.
"""

from __future__ import annotations

import sys
from pathlib import Path

from decoding.dense_extract import build_dense_datastore
from decoding.engine import encode_prompt
from decoding.fingerprint import model_fingerprint
from decoding.model_loader import cache_root
from index.corpus import gsm8k, gsm8k_answer_text, gsm8k_sparse_index
from index.dense_build import Document
from index.dense_format import MANIFEST
from index.dense_store import DenseStore
from index.sparse import SparseIndex


def _cache_dir(target, kind: str) -> Path:
    name = Path(str(target.config._name_or_path)).name or "model"
    return cache_root() / "datastores" / f"{kind}-gsm8k-train-{name}-v{target.vocab_size}"


def encode_text(target):
    """The target's plain text -> token ids (no chat template)."""
    return lambda text: target.tokenizer(text)["input_ids"]


def default_sparse_index(target, path: str | Path | None = None) -> SparseIndex:
    """REST datastore over the GSM8K train answers."""
    if path:                      # a given datastore is loaded as is, never built in its place
        return SparseIndex.load(path)
    path = _cache_dir(target, "sparse")
    if not (path / "meta.json").is_file():
        print(f"building the REST datastore from GSM8K train answers into {path} ...", file=sys.stderr)
        gsm8k_sparse_index(encode_text(target)).save(path)
    return SparseIndex.load(path)


def gsm8k_documents(target, n: int, offset: int = 0) -> list[Document]:
    """GSM8K train question/answer pairs as chat documents; entries only for the answers."""
    docs = []
    for r in gsm8k("train")[offset: offset + n]:
        prompt = encode_prompt(target, r["question"])
        answer = target.tokenizer(gsm8k_answer_text(r["answer"]))["input_ids"]
        docs.append(Document(prompt + answer + sorted(target.eos_token_ids)[:1], corpus="gsm8k_train",
                             store_from=len(prompt)))
    return docs


# GSM8K train pairs in the default dense store (the CLI's; serving's `index.dense_default_docs` too).
# 200, not 1,000: a first `sense generate --method sense` built the 1,000 for about 3.5 minutes on
# the 2-core Zen 4 EPYC, and over 24 GSM8K test questions SENSE ran 1.44x `ar` (MAT 2.05) with
# them against 1.41x (MAT 2.03) with 200.
DEFAULT_DENSE_DOCS = 200


def default_dense_store(target, path: str | Path | None = None, n_docs: int = DEFAULT_DENSE_DOCS) -> DenseStore:
    """Dense datastore over the first `n_docs` GSM8K train question/answer pairs."""
    if path:
        return DenseStore.load(path, expect=model_fingerprint(target))
    path = _cache_dir(target, f"dense{n_docs}")
    if not (path / MANIFEST).is_file():
        print(f"building the dense datastore from {n_docs} GSM8K train answers into {path} "
              f"(one forward per answer) ...", file=sys.stderr)
        build_dense_datastore(target, gsm8k_documents(target, n_docs), path,
                              progress=lambda i, n: print(f"  {i}/{n} documents", file=sys.stderr, flush=True))
    return DenseStore.load(path, expect=model_fingerprint(target))
