"""Small corpora for datastores: JSONL readers and the shared data sets."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

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


def spec_bench() -> list[dict]:
    return list(read_jsonl(shared_data_dir() / "spec_bench" / "question.jsonl"))
