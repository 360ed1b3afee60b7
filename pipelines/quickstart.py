"""The main job's first half (`make demo` runs it, then ``python -m serving.quickstart``), on one
machine with the embedded default model:

    1. a datastore from a slice of GSM8K train, built by the Ray Data pipeline: the model's own
       answers to those questions (self-distillation: the drafts then sound like the model)
    2. the index artifact (FAISS + the REST suffix index) built from it on Ray

    python -m pipelines.quickstart [--docs 200] [--distill-tokens 128] [--workdir DIR]

Both steps are cached in the work directory (a rerun resumes or reuses them); the index's path
goes to ``WORKDIR/index.txt``, where ``serving.quickstart`` (steps 3-5) finds it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from decoding.model_loader import cache_root
from index.artifact import list_versions, read_artifact_manifest, resolve_version
from index.artifact_build import BuildConfig
from index.corpus import gsm8k, gsm8k_answer_text
from index.records import CorpusSpec, FieldMap
from pipelines.build_datastore import build_datastore
from pipelines.build_index import build_artifact
from pipelines.config import DatastoreJobConfig, SelfDistillConfig

INDEX_POINTER = "index.txt"     # in the work directory: the path of the index steps 1-2 built


def default_workdir() -> Path:
    return cache_root() / "quickstart"


def _say(step: str, msg: str) -> None:
    print(f"[quickstart {step}] {msg}", file=sys.stderr, flush=True)


def _corpus(path: Path, docs: int) -> None:
    rows = gsm8k("train")[:docs]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"question": r["question"], "answer": gsm8k_answer_text(r["answer"])}) + "\n"
                           for r in rows))
    tmp.replace(path)


def build_datastore_step(workdir: Path, docs: int, distill_tokens: int = 0) -> Path:
    """The datastore of `docs` GSM8K train pairs: the model's own greedy answers of up to
    `distill_tokens` tokens to the questions, or (0) the dataset's answers."""
    corpus = workdir / f"gsm8k-train-{docs}.jsonl"
    if not corpus.is_file():
        _corpus(corpus, docs)
    out = workdir / (f"datastore-{docs}-id{distill_tokens}" if distill_tokens else f"datastore-{docs}")
    config = DatastoreJobConfig(
        corpora=(CorpusSpec("gsm8k_train", str(corpus), "jsonl",
                            FieldMap(prompt="question", response=None if distill_tokens else "answer")),),
        output=str(out), split_bytes=max(4096, -(-corpus.stat().st_size // 4)), workers=1,
        self_distill=SelfDistillConfig(max_new_tokens=distill_tokens) if distill_tokens else None)
    build_datastore(config)
    return out


def build_index_step(datastore: Path, workdir: Path) -> Path:
    root = workdir / f"index-{datastore.name}"
    m = json.loads((datastore / "manifest.json").read_text())
    content = {k: m[k] for k in ("shards", "token_shards", "transform_sha256", "fingerprint")}
    ds_sha = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    # Hidden: an artifact root holds only versions, CURRENT and hidden files (check_artifact_root).
    stamp = root / ".quickstart-datastore.sha256"
    if (root / stamp.name[1:]).is_file() and not stamp.exists():     # where earlier releases kept it
        (root / stamp.name[1:]).rename(stamp)
    if list_versions(root) and stamp.is_file() and stamp.read_text() == ds_sha:
        version = resolve_version(root)
        _say("2/5", f"reusing the index {version} (built from this datastore)")
        read_artifact_manifest(version)
        return root
    result = build_artifact(BuildConfig(datastore=str(datastore), output=str(root)),
                            progress=lambda m: _say("2/5", m))
    stamp.write_text(ds_sha)
    _say("2/5", result.summary().replace("\n", "\n    "))
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=200, help="GSM8K train questions in the datastore")
    p.add_argument("--distill-tokens", type=int, default=128,
                   help="store the model's own answers to them, up to this many tokens each "
                        "(self-distillation; 0: store the dataset's answers)")
    p.add_argument("--workdir", default=None, help="where the corpus, datastore and index go "
                   "(default: $SENSE_CACHE_DIR/quickstart)")
    a = p.parse_args(argv)
    if a.docs < 1 or a.distill_tokens < 0:
        print("error: --docs must be positive, --distill-tokens not negative", file=sys.stderr)
        return 2

    import ray

    workdir = Path(a.workdir) if a.workdir else default_workdir()
    workdir.mkdir(parents=True, exist_ok=True)
    # A Ray instance of its own (address "local"), as serving.quickstart starts its own: never a
    # cluster that happens to run on this machine.
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        what = (f"the model's own answers to {a.docs} GSM8K train questions (up to {a.distill_tokens} tokens each)"
                if a.distill_tokens else f"{a.docs} GSM8K train pairs")
        _say("1/5", f"building the datastore from {what} with the Ray Data pipeline")
        datastore = build_datastore_step(workdir, a.docs, a.distill_tokens)
        _say("2/5", "building the index artifact (FAISS + REST) on Ray")
        index = build_index_step(datastore, workdir)
    finally:
        ray.shutdown()
    tmp = workdir / (INDEX_POINTER + ".tmp")
    tmp.write_text(str(index) + "\n")
    tmp.replace(workdir / INDEX_POINTER)
    _say("2/5", f"index ready: {index} (next: python -m serving.quickstart serves it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
