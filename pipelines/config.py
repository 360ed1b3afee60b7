"""Typed configuration of the datastore build job (one place; the CLI only fills it in)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from index.records import FORMATS, CorpusSpec, FieldMap, InputError


@dataclass(frozen=True)
class SelfDistillConfig:
    """Generate the target's own greedy answers to a prompt corpus, then store those (the ID datastore)."""

    max_new_tokens: int = 256
    # "batched": greedy over batches of prompts (throughput; decoding.batch_generate: exactly the
    # engine's answers on the lean forward, up to float rounding elsewhere); "pld" or "ar": the
    # engine, one prompt at a time (exactly the served answers)
    method: str = "batched"
    batch_size: int = 16         # prompts per batch ("batched" only)

    def validate(self) -> None:
        if self.method not in DISTILL_METHODS:
            raise InputError(f"unknown self-distillation method {self.method!r}; choose one of "
                             f"{', '.join(DISTILL_METHODS)}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise InputError("self-distillation needs max_new_tokens and batch_size of at least 1")


DISTILL_METHODS = ("batched", "pld", "ar")


@dataclass(frozen=True)
class DatastoreJobConfig:
    corpora: tuple[CorpusSpec, ...]
    output: str
    model: str | None = None             # None: the embedded default
    dtype: str = "auto"                  # auto: the faster dtype on the worker, measured
    layer: int = -1                      # hidden layer of the keys (-1: last, after the final norm)
    dim: int = 64                        # key dimension after PCA
    value_len: int = 20                  # next-N tokens per entry
    max_len: int | None = None           # window length (default: min(context, 4096))
    overlap: int | None = None           # window overlap (default: max_len // 2)
    batch_tokens: int = 8192             # padded tokens per forward
    split_bytes: int = 1 << 20           # JSONL bytes per work unit
    workers: int = 1                     # extraction actors
    cpus_per_worker: float | None = None  # None: a node's CPUs shared by the workers (all cores used)
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    worker_resources: dict | None = None  # custom Ray resources per model worker (pin to node types)
    worker_start_timeout_s: float = 900.0  # wait this long for the whole actor pool before feeding it
    sample_rows: int = 20_000            # positions used to fit the key transform
    seed: int = 0
    self_distill: SelfDistillConfig | None = None
    overwrite: bool = False              # replace an existing datastore built with another config
    ray_address: str | None = None

    def validate(self) -> "DatastoreJobConfig":
        if not self.corpora:
            raise InputError("give at least one corpus (--corpus NAME=URI)")
        for c in self.corpora:
            if c.format not in FORMATS:
                raise InputError(f"unknown input format {c.format!r}; choose one of {', '.join(FORMATS)}")
            mode = c.fields.mode()
            if self.self_distill and mode != "prompt":
                raise InputError("self-distillation needs a prompt field and no response field")
            if not self.self_distill and mode == "prompt":
                raise InputError(f"corpus {c.name!r}: a prompt field needs a response field (or --self-distill)")
        if self.self_distill:
            self.self_distill.validate()
        if not self.output:
            raise InputError("give an output location (--output PATH or s3://bucket/prefix)")
        checks = [("dim", self.dim, 1), ("value_len", self.value_len, 1), ("batch_tokens", self.batch_tokens, 2),
                  ("split_bytes", self.split_bytes, 1), ("workers", self.workers, 1),
                  ("sample_rows", self.sample_rows, self.dim)]
        for name, value, low in checks:
            if value < low:
                raise InputError(f"{name} must be at least {low}, got {value}")
        if self.max_len is not None and self.max_len < 2:
            raise InputError(f"max_len must be at least 2, got {self.max_len}")
        if self.overlap is not None and self.max_len is not None and not 0 <= self.overlap < self.max_len:
            raise InputError(f"overlap must be in [0, max_len), got {self.overlap}")
        if (self.cpus_per_worker is not None and self.cpus_per_worker <= 0) or (self.gpus_per_worker is not None and self.gpus_per_worker < 0):
            raise InputError("cpus_per_worker must be positive and gpus_per_worker non-negative")
        if self.worker_start_timeout_s <= 0:
            raise InputError(f"worker_start_timeout_s must be positive, got {self.worker_start_timeout_s}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InputError(f"unknown dtype {self.dtype!r}; choose auto, float32, bfloat16 or float16")
        return self

    def content_key(self) -> str:
        """A hash of everything that changes the stored bytes (not parallelism or addresses):
        a rerun with the same key resumes, a different key needs --overwrite."""
        d = asdict(self)
        for k in ("workers", "cpus_per_worker", "gpus_per_worker", "worker_resources", "worker_start_timeout_s", "overwrite", "ray_address",
                  "output", "batch_tokens"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_corpus(arg: str, fmt: str, fields: FieldMap) -> CorpusSpec:
    """``NAME=URI`` (or a bare URI, named after its last path component)."""
    if "=" in arg and not arg.split("=", 1)[0].count("/"):
        name, uri = arg.split("=", 1)
    else:
        uri = arg
        name = uri.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0] or "corpus"
    if not name or not uri:
        raise InputError(f"bad --corpus {arg!r}: expected NAME=URI")
    return CorpusSpec(name=name, uri=uri, format=fmt, fields=fields)

