"""Decoding speed by model family: the lean forward against the target's transformers forward and
``transformers`` ``generate()``, on models of real families' shapes with random weights.

    python -m bench.families            # writes bench/results/families.{json,md}
    python -m bench.families --quick    # one repeat, 16 tokens: prints only

Nothing can be downloaded here, so each family is its published config's shape (sizes, layer
types, windows, caps, vocabulary) with random weights; speed depends on the shapes, not on the
values. For each: plain greedy decoding (``ar``) of ``--new-tokens`` tokens after a
``--prompt-tokens`` prompt, EOS ignored, on our lean forward (the default where the family is
supported), on the target's transformers forward (``SENSE_LEAN_FORWARD=0``: transformers'
modules with the invariant linears and attention), and with ``generate()`` on a copy of the model
(its own kernels); the three in rotated order, ``--repeats`` times, tokens/s medians and the
ratios of each repeat's runs (median [min, max]). "same" counts the repeats whose lean tokens
equal the transformers forward's (bitwise equal only where both run the same norm and activation
code; the lean forward runs its own C code for them, within rounding of torch's).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

from bench.common import machine_info, median, method_order, write_results

# Published configs' shapes (random weights): SmolLM2-135M (the embedded model's), Gemma 3 270M,
# and Gemma 2's layer kinds at Gemma 3 270M's size (Gemma 2's smallest, 2B, takes minutes a token
# to initialize and run here).
FAMILIES = {
    "smollm2-135m (llama)": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                 num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                 max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
    "gemma-3-270m (gemma3_text)": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640,
                                       intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                                       num_key_value_heads=1, head_dim=256, sliding_window=512,
                                       query_pre_attn_scalar=256, max_position_embeddings=32768,
                                       layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3),
    "gemma 2 layers at 270M (gemma2)": dict(model_type="gemma2", vocab_size=256000, hidden_size=640,
                                            intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                                            num_key_value_heads=1, head_dim=256, sliding_window=4096,
                                            query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                                            final_logit_softcapping=30.0, max_position_embeddings=8192),
}
VARIANTS = ("lean", "transformers_forward", "hf_generate")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def build(spec: dict, dtype: torch.dtype):
    """The family's model with random weights (seeded), and a copy with a config of its own for
    ``generate()`` (a target's install switches its model's attention implementation)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    peer = AutoModelForCausalLM.from_config(copy.deepcopy(config)).to(dtype).eval()
    peer.load_state_dict(model.state_dict())
    return model, peer


def targets(model):
    """(lean target or None, transformers-forward target) on one model."""
    from decoding import lean_forward
    from decoding.target import TargetModel

    before = os.environ.get(lean_forward.ENV)
    try:
        os.environ[lean_forward.ENV] = "0"
        plain = TargetModel(model, None, prefix_cache_mb=0)
        os.environ[lean_forward.ENV] = "1"
        lean = TargetModel(model, None, prefix_cache_mb=0)
    finally:
        if before is None:
            os.environ.pop(lean_forward.ENV, None)
        else:
            os.environ[lean_forward.ENV] = before
    return (lean if lean.lean is not None else None), plain, lean.lean_note


def run(variant: str, lean, plain, peer, prompt: list[int], new: int) -> tuple[float, list[int]]:
    from decoding.config import SamplingParams
    from decoding.engine import generate

    t0 = time.perf_counter()
    if variant == "hf_generate":
        with torch.no_grad():
            out = peer.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
        ids = out[0, len(prompt):].tolist()
    else:
        target = lean if variant == "lean" else plain
        ids = generate(target, prompt, params=SamplingParams(max_new_tokens=new, ignore_eos=True), budget=0).token_ids
    return new / (time.perf_counter() - t0), ids


def render(payload: dict) -> str:
    m, a = payload["machine"], payload["args"]
    lines = ["# Decoding speed by model family (`python -m bench.families`)", "",
             f"Machine: {m.get('cpu')}, {m.get('cpu_family_model')}, {m.get('cores')} cores, {m.get('torch_threads')} "
             f"torch threads, torch {m.get('torch')}, transformers {m.get('transformers')}, {a['dtype']}. "
             f"Random weights in each family's published shape; `ar` (greedy, EOS ignored) of {a['new_tokens']} "
             f"tokens after a {a['prompt_tokens']}-token prompt; {a['repeats']} repeats, order rotated; tokens/s "
             "medians, ratios median [min, max] of each repeat's runs. *transformers forward*: the target on "
             "transformers' modules (`SENSE_LEAN_FORWARD=0`: the invariant linears and attention, transformers' "
             "norms, activations and cache); *generate()*: transformers' own, on a copy of the model.", "",
             "| family | lean forward | lean tok/s | transformers forward tok/s | generate() tok/s | "
             "lean / transformers forward | lean / generate() | same tokens as transformers forward |",
             "|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        if r["vs"] != "transformers_forward":
            continue
        g = next(x for x in payload["rows"] if x["family"] == r["family"] and x["vs"] == "hf_generate")
        lines.append(f"| {r['family']} | {r['lean_note']} | {r['tokens_per_s']} | {r['peer_tokens_per_s']} | "
                     f"{g['peer_tokens_per_s']} | {r['ratio']:.2f}x [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] | "
                     f"{g['ratio']:.2f}x [{g['ratio_min']:.2f}, {g['ratio_max']:.2f}] | {r['same']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from decoding.cli import _quiet_libraries

    _quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, 16 tokens, prints only")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.new_tokens = 1, 16
    dtype = getattr(torch, args.dtype)
    rows = []
    for family, spec in FAMILIES.items():
        log(f"{family}: building ...")
        model, peer = build(spec, dtype)
        lean, plain, note = targets(model)
        variants = [v for v in VARIANTS if v != "lean" or lean is not None]
        prompt = [(37 * i + 11) % (spec["vocab_size"] - 10) + 10 for i in range(args.prompt_tokens)]
        for v in variants:                                  # warm-up: kernels, packing, caches
            run(v, lean, plain, peer, prompt, 4)
        tps: dict[str, list[float]] = {v: [] for v in variants}
        same = 0
        for rep in range(args.repeats):
            ids = {}
            for v in method_order(variants, rep):
                rate, ids[v] = run(v, lean, plain, peer, prompt, args.new_tokens)
                tps[v].append(rate)
            same += ids.get("lean") == ids["transformers_forward"]
            log(f"  repeat {rep}: " + ", ".join(f"{v} {tps[v][-1]:.1f}" for v in variants))
        if lean is None:
            log(f"  lean forward: {note}")
            continue
        for vs in ("transformers_forward", "hf_generate"):
            ratios = [a / b for a, b in zip(tps["lean"], tps[vs])]
            rows.append({"benchmark": "families", "method": "ar", "family": family, "dtype": args.dtype,
                         "vs": vs, "ratio": round(median(ratios), 3), "ratio_min": round(min(ratios), 3),
                         "ratio_max": round(max(ratios), 3), "tokens_per_s": round(median(tps["lean"]), 1),
                         "peer_tokens_per_s": round(median(tps[vs]), 1), "lean_note": note,
                         "same": f"{same}/{args.repeats}"})
        del model, peer, lean, plain
    payload = {"machine": machine_info() | {"dtype": args.dtype}, "args": vars(args), "rows": rows}
    text = render(payload)
    print(text)
    if not args.quick:
        write_results("families", payload["machine"], rows, text, extra={"args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
