"""Where a row's result depends on how many rows share the forward (batch invariance), and what
the invariant forward (decoding/invariant/) costs.

For each product the target runs (the four weight shapes of its linears, the LM head) and each
way of computing it (torch's three orders and the invariant kernel), row 0 of an m-row product is
compared bitwise with the one-row product, for m in 1..64. Then the whole target, per dtype and
per kernel set (``invariant``; ``torch``: MKL + SDPA; float32 also ``small_batch``,
decoding/cpu_kernels.py): the logits of one verified token alone and with 1, 3, 15 and 63 other
tree nodes beside it (a chain and a star), and the time of a decode step and of verifications of
1-32 draft tokens at a 256-token context, the kernel sets measured side by side in rotating order,
medians over rounds.

    python -m bench.invariance [--dtypes float32,bfloat16]

Writes bench/results/invariance.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import machine_info, write_results
from decoding import invariant
from decoding.cost import measure_verify_cost
from decoding.target import TargetModel
from decoding.tree import TokenTree

ROWS = (1, 2, 3, 4, 5, 8, 12, 16, 32, 64)
SIZES = (1, 2, 4, 8, 16, 32)
ROUNDS = 5


def kernels(weight: torch.Tensor) -> dict:
    wt = weight.t().contiguous()
    return {
        "F.linear": lambda x: F.linear(x, weight),
        "W @ x^T": lambda x: torch.matmul(weight, x.t()).t(),
        "x @ W^T (contiguous)": lambda x: x @ wt,
        "invariant": invariant.PackedWeight(weight),
    }


def row_invariance(fn, x: torch.Tensor) -> list[int]:
    """Row counts m whose row 0 differs (bitwise) from the one-row result."""
    ref = fn(x[:1])[0]
    return [m for m in ROWS if not torch.equal(fn(x[:m])[0], ref)]


def timing_ms(fn, x: torch.Tensor, rows: int, repeats: int = 15) -> float:
    xs = x[:rows].contiguous()
    for _ in range(3):
        fn(xs)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(xs)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def linear_rows(target: TargetModel) -> list[dict]:
    layer = target.model.model.layers[0]
    weights = {"q_proj": layer.self_attn.q_proj.weight, "k_proj": layer.self_attn.k_proj.weight,
               "gate_proj": layer.mlp.gate_proj.weight, "down_proj": layer.mlp.down_proj.weight,
               "lm_head": target.model.get_output_embeddings().weight}
    out = []
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name, w in weights.items():
            w = w.detach()
            x = torch.randn(max(ROWS), w.shape[1], generator=gen).to(w.dtype)
            for kname, fn in kernels(w).items():
                out.append({"op": name, "shape": list(w.shape), "kernel": kname, "dtype": str(w.dtype)[6:],
                            "rows_differing": row_invariance(fn, x),
                            "ms": {r: round(timing_ms(fn, x, r), 3) for r in (1, 4, 16)}})
    return out


def target_rows(target: TargetModel, context: int = 96) -> list[dict]:
    """The logits of the pending token verified alone vs with k other nodes (chain / star)."""
    vocab = target.vocab_size
    prompt = [(31 * i + 7) % vocab for i in range(context)]
    root = 11
    out = []
    state, _ = target.prefill(prompt)

    def logits_of(tree: TokenTree) -> torch.Tensor:
        o = target.verify(state, tree)
        target.commit(state, [0])
        state.cache.crop(-1)
        state.n_committed -= 1
        return o.logits[0].clone()

    ref = logits_of(TokenTree.root_only(root))
    for shape in ("chain", "star"):
        for k in (1, 3, 15, 63):
            draft = [(101 + 13 * i) % vocab for i in range(k)]
            tree = TokenTree.chain(root, draft) if shape == "chain" else TokenTree((root, *draft), (-1, *[0] * k))
            got = logits_of(tree)
            diff = (got - ref).abs()
            out.append({"tree": shape, "other_rows": k, "dtype": str(target.dtype)[6:], "bitwise": bool(torch.equal(got, ref)),
                        "max_abs_diff": float(diff.max()), "argmax_same": int(got.argmax()) == int(ref.argmax())})
    return out


KERNEL_SETS = {"invariant": dict(invariant_forward=True),
               "torch": dict(invariant_forward=False, cpu_kernels=False),
               "small_batch": dict(invariant_forward=False, cpu_kernels=True)}


def cost_rows(targets: dict[str, TargetModel], dtype: str) -> list[dict]:
    """Decode step and verification times per kernel set, measured side by side in rotating order."""
    names = list(targets)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(measure_verify_cost(targets[name], SIZES, repeats=3, warmup=1))
    rows = []
    for name in names:
        ms = {n: [run[n] * 1e3 for run in runs[name]] for n in (0, *SIZES)}
        rows.append({"kernels": name, "dtype": dtype,
                     "ms": {n: round(statistics.median(v), 2) for n, v in ms.items()},
                     "spread_ms": {n: round(max(v) - min(v), 2) for n, v in ms.items()}})
    base = next((r for r in rows if r["kernels"] == "torch"), None)
    for r in rows:
        r["vs_torch"] = {n: round(r["ms"][n] / base["ms"][n], 3) for n in r["ms"]} if base else None
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args(argv)
    linear, whole, costs = [], [], []
    for dtype in args.dtypes.split(","):
        sets = [k for k in KERNEL_SETS if dtype == "float32" or k != "small_batch"]
        targets = {k: TargetModel.load(dtype=dtype, **KERNEL_SETS[k]) for k in sets}
        linear += linear_rows(targets["torch"])
        for name, target in targets.items():
            whole += [{**r, "kernels": name} for r in target_rows(target)]
        costs += cost_rows(targets, dtype)
        del targets
    md = ["# Batch invariance: does a row's result depend on the rows beside it?", "",
          f"Kernels built for: {invariant.kernel_id()}.", "",
          "Linears: row 0 of an m-row product vs the one-row product (bitwise); timings in ms.", "",
          "| op | shape | dtype | kernel | row counts that differ | 1 row | 4 rows | 16 rows |",
          "|---|---|---|---|---|---|---|---|"]
    for r in linear:
        md.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['kernel']} | {r['rows_differing'] or 'none'} | "
                  f"{r['ms'][1]} | {r['ms'][4]} | {r['ms'][16]} |")
    md += ["", "Whole target: logits of one token verified alone vs beside k other tree nodes.", "",
           "| dtype | kernels | tree | other rows | bitwise | max abs diff | argmax same |",
           "|---|---|---|---|---|---|---|"]
    for r in whole:
        md.append(f"| {r['dtype']} | {r['kernels']} | {r['tree']} | {r['other_rows']} | {r['bitwise']} | "
                  f"{r['max_abs_diff']:.3g} | {r['argmax_same']} |")
    md += ["", f"Forward time (ms, median of {ROUNDS} rounds side by side, rotating order; 256-token context): "
           "a decode step (0 draft tokens) and verifications of n draft tokens; in brackets the ratio "
           "to torch's kernels in the same dtype.", "",
           "| dtype | kernels | " + " | ".join(f"n={n}" for n in (0, *SIZES)) + " |",
           "|---|---|" + "---|" * (len(SIZES) + 1)]
    for r in costs:
        cells = [f"{r['ms'][n]}" + (f" ({r['vs_torch'][n]:.2f})" if r["vs_torch"] else "") for n in (0, *SIZES)]
        md.append(f"| {r['dtype']} | {r['kernels']} | " + " | ".join(cells) + " |")
    write_results("invariance", machine_info(),
                  [{"method": "linear", **r} for r in linear] + [{"method": "target", **r} for r in whole]
                  + [{"method": "forward_ms", **r} for r in costs],
                  "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
