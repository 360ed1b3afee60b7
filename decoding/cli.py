"""`sense`: the command line of the decoding engine.

    sense generate --method pld "question"     speculative decoding of one prompt, with statistics
    sense demo                                 one question with ar, pld and rest side by side
    sense build-sparse --out DIR FILE.jsonl    a REST datastore from a JSONL corpus
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

METHODS = ("ar", "pld", "rest")
DEFAULT_QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                    "in May. How many clips did Natalia sell altogether in April and May?")


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def default_sparse_datastore(target) -> Path:
    """The demo's REST datastore (GSM8K train answers), built into the cache on first use."""
    from decoding.model_loader import cache_root
    from index.corpus import gsm8k, gsm8k_answer_text
    from index.sparse import SparseIndex

    name = Path(str(target.config._name_or_path)).name or "model"
    path = cache_root() / "datastores" / f"sparse-gsm8k-train-{name}-v{target.vocab_size}"
    if not (path / "meta.json").is_file():
        print(f"building the REST datastore from GSM8K train answers into {path} ...", file=sys.stderr)
        docs = [target.tokenizer(gsm8k_answer_text(r["answer"]))["input_ids"] for r in gsm8k("train")]
        SparseIndex.build(docs).save(path)
    return path


def make_drafter(method: str, target=None, datastore: str | None = None):
    from decoding.drafters import NoDrafter, PromptLookupDrafter, SparseDrafter
    from decoding.errors import InvalidRequestError

    if method == "ar":
        return NoDrafter()
    if method == "pld":
        return PromptLookupDrafter()
    if method == "rest":
        from index.sparse import SparseIndex

        path = Path(datastore) if datastore else default_sparse_datastore(target)
        return SparseDrafter(SparseIndex.load(path))
    raise InvalidRequestError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _params(args):
    from decoding.config import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()))


def cmd_generate(args) -> int:
    from decoding.engine import encode_prompt, generate
    from decoding.target import TargetModel

    params = _params(args)                      # validate before the slow model load
    if args.method not in METHODS:
        make_drafter(args.method)
    target = TargetModel.load(args.model, dtype=args.dtype, device=args.device)
    drafter = make_drafter(args.method, target, args.datastore)
    ids = encode_prompt(target, args.prompt, chat=not args.raw)
    result = generate(target, ids, params=params, drafter=drafter, budget=args.budget)
    if args.json:
        print(json.dumps({"text": result.text, "stats": result.stats.to_dict()}))
    else:
        print(result.text)
        print(f"\n[{result.stats.summary()}]", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from decoding.engine import encode_prompt, generate
    from decoding.target import TargetModel

    params = _params(args)
    print("loading the target model (first run converts the embedded GGUF, ~20 s) ...", file=sys.stderr)
    target = TargetModel.load(args.model, dtype=args.dtype, device=args.device)
    ids = encode_prompt(target, args.prompt)
    results = {}
    for method in METHODS:
        drafter = make_drafter(method, target, args.datastore)
        results[method] = generate(target, ids, params=params, drafter=drafter, budget=args.budget)
    ar = results["ar"]
    print(f"Q: {args.prompt}\nA: {ar.text}\n")
    print(f"{'method':8} {'tokens':>6} {'steps':>5} {'MAT':>5} {'accept':>7} {'tok/s':>6} {'speedup':>7}  same as ar")
    for method, r in results.items():
        s = r.stats
        print(f"{method:8} {s.new_tokens:6d} {s.steps:5d} {s.mat:5.2f} {s.acceptance_rate:7.1%} "
              f"{s.tokens_per_s:6.1f} {s.tokens_per_s / ar.stats.tokens_per_s:6.2f}x  {r.token_ids == ar.token_ids}")
    return 0


def cmd_build_sparse(args) -> int:
    from decoding.model_loader import load_model_and_tokenizer
    from index.corpus import read_jsonl
    from index.sparse import SparseIndex

    _, tokenizer = load_model_and_tokenizer(args.model)
    docs, skipped = [], 0
    for path in args.corpus:
        for rec in read_jsonl(path):
            text = rec.get(args.field) if isinstance(rec, dict) else None
            if not isinstance(text, str) or not text.strip():
                skipped += 1
                continue
            docs.append(tokenizer(text)["input_ids"])
    index = SparseIndex.build(docs)
    index.save(args.out)
    print(f"wrote {args.out}: {index.n_docs} documents, {index.n_tokens} tokens, {skipped} records skipped "
          f"(no non-empty {args.field!r} field)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sense", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_opts(p):
        p.add_argument("--model", default=None, help="HF model directory or id (default: embedded SmolLM2-135M)")
        p.add_argument("--dtype", default="float32", help="float32 (CPU default) or bfloat16 (GPU)")
        p.add_argument("--device", default="cpu")

    def decode_opts(p):
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--stop", action="append", help="stop string (repeatable)")
        p.add_argument("--budget", type=int, default=64, help="draft tree node budget")
        p.add_argument("--datastore", default=None, help="REST datastore directory (default: GSM8K train answers)")

    g = sub.add_parser("generate", help="generate an answer with speculative decoding")
    g.add_argument("prompt")
    g.add_argument("--method", default="pld", help=f"one of {', '.join(METHODS)}")
    g.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    g.add_argument("--json", action="store_true", help="print text and statistics as JSON")
    model_opts(g)
    decode_opts(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="one question with every method, side by side")
    d.add_argument("prompt", nargs="?", default=DEFAULT_QUESTION)
    model_opts(d)
    decode_opts(d)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("build-sparse", help="build a REST datastore from JSONL files")
    b.add_argument("corpus", nargs="+", help="JSONL files")
    b.add_argument("--field", default="text", help="record field holding the text")
    b.add_argument("--out", required=True)
    b.add_argument("--model", default=None)
    b.set_defaults(func=cmd_build_sparse)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from decoding.errors import SenseError
    from index.corpus import CorpusError
    from index.sparse import SparseIndexError

    try:
        return args.func(args)
    except (SenseError, CorpusError, SparseIndexError) as exc:
        print(f"sense: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sense: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
