"""`sense`: the command line of the decoding engine.

    sense generate --method pld "question"     speculative decoding of one prompt, with statistics
    sense demo                                 one question with every method, side by side
    sense build-sparse --out DIR FILE.jsonl    a REST datastore from a JSONL corpus
    sense build-dense --out DIR FILE.jsonl     a dense (hidden-state) datastore from a JSONL corpus
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from decoding.config import check_prompt_text
from decoding.methods import METHODS, check_method, make_drafter

# The heavy modules (torch, transformers, the index builders) are imported inside the commands that
# need them: `sense --help` and argument errors answer without loading torch.

DEFAULT_QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                    "in May. How many clips did Natalia sell altogether in April and May?")


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    # transformers reads the two settings above when it is imported; importing it here only to
    # set them would cost every command (an argument error included) a second.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def load_stores(methods, target, args):
    """The datastores the methods need (decoding.stores.load_datastores): the published index
    artifact (--index, --version), store folders (--sparse-store, --dense-store; these win over
    --index for their kind), else the GSM8K defaults."""
    from decoding.stores import load_datastores

    return load_datastores(target, index=args.index, version=args.version, sparse=args.sparse_store or "auto",
                           dense=args.dense_store or "auto", methods=methods)


def _params(args):
    from decoding.config import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()),
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          logit_bias=dict(args.logit_bias or ()))


def _soft(args):
    if not args.soft:
        return None
    from decoding.config import SoftGateConfig

    return SoftGateConfig(theta=args.soft_theta, top_k=args.soft_top_k, lam=args.soft_lam, window=args.soft_window,
                          tau=None if args.soft_tau is None or args.soft_tau > 1 else args.soft_tau)


def _bias_arg(text: str) -> tuple[int, float]:
    token, _, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS, e.g. 1234=-100, got {text!r}") from None


def _budget_arg(text: str):
    if text == "adaptive":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'adaptive' or an integer >= 0, got {text!r}")
    return value


def _loaded(target) -> None:
    print(f"model: {target.config._name_or_path or 'target'} on {target.device}, dtype {target.dtype_choice.reason}, "
          f"batch-invariant forward {target.invariant_note}, lean forward {target.lean_note}"
          f"{'' if target.takes_trees else ', draft trees verified as their best path (the model takes no tree mask)'}", file=sys.stderr)


def _check_sources(args) -> None:
    """Fail fast, before torch is imported and a model loaded, on a named local source that does
    not exist (a remote one is checked when it is read)."""
    from index import storage
    from index.artifact_format import ArtifactError
    from index.dense_format import DatastoreError
    from index.sparse import SparseIndexError

    named = ((args.index, ArtifactError, "index artifact"),
             (args.sparse_store, SparseIndexError, "REST datastore or index artifact"),
             (args.dense_store, DatastoreError, "dense datastore or index artifact"))
    for source, error, what in named:
        if source and source not in ("auto", "artifact", "default") and not storage.is_remote(source) \
                and not Path(source).exists():
            raise error(f"{source}: no such {what}")


def _grammar(args):
    """--json-object / --json-schema (inline JSON or a file) as a ``decoding.structured.Grammar``."""
    from decoding.errors import InvalidRequestError

    if args.json_object and args.json_schema:
        raise InvalidRequestError("give --json-object or --json-schema, not both")
    if not args.json_object and args.json_schema is None:
        return None
    from decoding.structured import Grammar

    if args.json_object:
        return Grammar.json_object()
    text = args.json_schema
    if not text.lstrip().startswith("{"):
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise InvalidRequestError(f"--json-schema: cannot read {args.json_schema}: {exc.strerror}") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"--json-schema is not valid JSON: {exc}") from None
    return Grammar.json_schema(schema)


def cmd_generate(args) -> int:
    # Validated before torch is imported (seconds) and the model loaded: a bad argument is
    # answered at once.
    params, soft = _params(args), _soft(args)
    check_method(args.method)
    check_prompt_text(args.prompt)
    _check_sources(args)
    grammar = _grammar(args)
    from decoding.engine import encode_prompt, generate
    from decoding.target import TargetModel

    target = TargetModel.load(args.model, dtype=args.dtype, device=args.device)
    _loaded(target)
    stores = load_stores([args.method], target, args)
    ids = encode_prompt(target, args.prompt, chat=not args.raw)
    drafter = make_drafter(args.method, stores)
    if args.prediction:
        from decoding.drafters.prediction import PredictionDrafter

        drafter = PredictionDrafter(drafter, target.tokenizer(args.prediction, add_special_tokens=False)["input_ids"])
    result = generate(target, ids, params=params, drafter=drafter, budget=args.budget, soft=soft, grammar=grammar)
    if args.json:
        print(json.dumps({"text": result.text, "stats": result.stats.to_dict()}))
    else:
        print(result.text)
        print(f"\n[{result.stats.summary()}]", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    params = _params(args)
    methods = [check_method(m) for m in args.methods.split(",")]
    check_prompt_text(args.prompt)
    _check_sources(args)
    from decoding.engine import encode_prompt, generate
    from decoding.target import TargetModel

    print("loading the target model (the first run converts the embedded GGUF) ...", file=sys.stderr)
    target = TargetModel.load(args.model, dtype=args.dtype, device=args.device)
    _loaded(target)
    stores = load_stores(methods, target, args)
    ids = encode_prompt(target, args.prompt)
    runs = [(m, None) for m in methods]
    if args.soft:
        runs.append(("sense" if "sense" in methods else methods[-1], _soft(args)))
    results = []
    for method, soft in runs:
        r = generate(target, ids, params=params, drafter=make_drafter(method, stores), budget=args.budget, soft=soft)
        results.append((method + ("-soft" if soft else ""), r))
    ar = next((r for m, r in results if m == "ar"), results[0][1])
    print(f"Q: {args.prompt}\nA: {ar.text}\n")
    print(f"{'method':11} {'tokens':>6} {'steps':>5} {'MAT':>5} {'accept':>7} {'tok/s':>6} {'speedup':>7}  same as ar")
    for name, r in results:
        s = r.stats
        print(f"{name:11} {s.new_tokens:6d} {s.steps:5d} {s.mat:5.2f} {s.acceptance_rate:7.1%} "
              f"{s.tokens_per_s:6.1f} {s.tokens_per_s / ar.stats.tokens_per_s:6.2f}x  {r.token_ids == ar.token_ids}")
    return 0


def _read_texts(paths, field):
    from index.corpus import read_jsonl

    texts, skipped = [], 0
    for path in paths:
        for rec in read_jsonl(path):
            text = rec.get(field) if isinstance(rec, dict) else None
            if not isinstance(text, str) or not text.strip():
                skipped += 1
                continue
            texts.append(text)
    if not texts:
        from index.corpus import CorpusError

        raise CorpusError(f"no record has a non-empty {field!r} field ({skipped} read): nothing to build; "
                          f"--field names the records' text field")
    return texts, skipped


def _skipped(n: int, field: str) -> str:
    """The records a build left out, and why (only when there were some)."""
    return f"{n} record{'s' if n != 1 else ''} skipped (no non-empty {field!r} field)" if n else "no record skipped"


def cmd_build_sparse(args) -> int:
    texts, skipped = _read_texts(args.corpus, args.field)     # a bad corpus fails before torch loads
    from decoding.model_loader import load_tokenizer
    from index.sparse import SparseIndex

    tokenizer = load_tokenizer(args.model)
    index = SparseIndex.build(tokenizer(t)["input_ids"] for t in texts)
    index.save(args.out)
    print(f"wrote {args.out}: {index.n_docs} documents, {index.n_tokens} tokens, {_skipped(skipped, args.field)}")
    return 0


def cmd_build_dense(args) -> int:
    texts, skipped = _read_texts(args.corpus, args.field)     # a bad corpus fails before torch loads
    from decoding.dense_extract import build_dense_datastore
    from decoding.target import TargetModel
    from index.dense_build import Document

    target = TargetModel.load(args.model, dtype=args.dtype, device=args.device)
    docs = [Document(target.tokenizer(t)["input_ids"], corpus=args.corpus_name) for t in texts]
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"  {done}/{total} documents, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    m = build_dense_datastore(target, docs, args.out, dim=args.dim, value_len=args.value_len, progress=progress)
    print(f"wrote {args.out}: {m.documents} documents, {m.entries} entries, {_skipped(skipped, args.field)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sense", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_opts(p):
        p.add_argument("--model", default=None,
                       help="HF model directory, hub id or .gguf file (converted once into the cache; "
                            "default: the embedded SmolLM2-135M GGUF)")
        p.add_argument("--dtype", default="auto",
                       help="auto (default: the faster of float32/bfloat16 on CPU, bfloat16/float16 on GPU, "
                            "measured once per machine), float32, bfloat16 or float16")
        p.add_argument("--device", default="cpu")

    def decode_opts(p):
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--stop", action="append", help="stop string (repeatable)")
        p.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2, as OpenAI's")
        p.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2, as OpenAI's")
        p.add_argument("--logit-bias", action="append", type=_bias_arg, metavar="TOKEN_ID=BIAS",
                       help="add BIAS (-100..100) to a token's logit (repeatable)")
        p.add_argument("--budget", type=_budget_arg, default="adaptive",
                       help="draft tree nodes per step: adaptive (default: from this machine's measured verify "
                            "cost and the acceptance so far; 0 when drafts do not pay) or an integer")
        p.add_argument("--index", default=None, metavar="URI",
                       help="published index artifact (pipelines.build_index output; local dir or s3://): "
                            "the sparse and dense stores of one version")
        p.add_argument("--version", default=None, metavar="V",
                       help="artifact version (vNNNN) of --index; default CURRENT")
        p.add_argument("--sparse-store", "--datastore", dest="sparse_store", default=None,
                       help="REST datastore folder, or an index artifact or its sparse/ folder "
                            "(default: --index, else GSM8K train answers)")
        p.add_argument("--dense-store", default=None,
                       help="dense datastore folder or index artifact (default: --index, else GSM8K train)")
        p.add_argument("--soft", action="store_true", help="soft-gated (lossy) verification")
        p.add_argument("--soft-theta", type=float, default=0.3, help="entropy gate (nats over top-k)")
        p.add_argument("--soft-top-k", type=int, default=3)
        p.add_argument("--soft-lam", type=float, default=0.5, help="ratio gate p(d)/p(argmax)")
        p.add_argument("--soft-window", type=int, default=6, help="deferred window W")
        p.add_argument("--soft-tau", type=float, default=0.8,
                       help="cosine stand-in where the draft ends inside the window (above 1: off)")

    g = sub.add_parser("generate", help="generate an answer with speculative decoding")
    g.add_argument("prompt")
    g.add_argument("--method", default="pld", help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()))
    g.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    g.add_argument("--json", action="store_true", help="print text and statistics as JSON")
    g.add_argument("--json-object", action="store_true", help="answer with a JSON object (constrained decoding)")
    g.add_argument("--json-schema", default=None, metavar="SCHEMA",
                   help="answer with JSON following this schema (inline JSON or a .json file)")
    g.add_argument("--prediction", default=None, metavar="TEXT",
                   help="predicted output (most of the answer, e.g. the text being edited): drafted from first; "
                        "the answer is the same, only faster where it matches")
    model_opts(g)
    decode_opts(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="one question with several methods, side by side")
    d.add_argument("prompt", nargs="?", default=DEFAULT_QUESTION)
    d.add_argument("--methods", default="ar,pld,rest", help=f"comma-separated, from {', '.join(METHODS)}")
    model_opts(d)
    decode_opts(d)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("build-sparse", help="build a REST datastore from JSONL files")
    b.add_argument("corpus", nargs="+", help="JSONL files")
    b.add_argument("--field", default="text", help="record field holding the text")
    b.add_argument("--out", required=True)
    b.add_argument("--model", default=None, help="whose tokenizer: HF directory, hub id or .gguf file")
    b.set_defaults(func=cmd_build_sparse)

    e = sub.add_parser("build-dense", help="build a dense datastore from JSONL files (single process)")
    e.add_argument("corpus", nargs="+", help="JSONL files")
    e.add_argument("--field", default="text", help="record field holding the text")
    e.add_argument("--corpus-name", default="default")
    e.add_argument("--out", required=True)
    e.add_argument("--dim", type=int, default=64)
    e.add_argument("--value-len", type=int, default=20)
    model_opts(e)
    e.set_defaults(func=cmd_build_dense)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from decoding.errors import SenseError, run_command
    from index.corpus import CorpusError
    from index.dense_format import DatastoreError
    from index.sparse import SparseIndexError
    from index.storage import StorageError

    return run_command(lambda: args.func(args), (SenseError, CorpusError, SparseIndexError, DatastoreError, StorageError),
                       prefix="sense: error: ", interrupted="sense: interrupted")


if __name__ == "__main__":
    sys.exit(main())
