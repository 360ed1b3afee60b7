"""Where a row's result depends on how many rows share the forward (batch invariance).

For each product the target runs (the four weight shapes of its linears, the LM head) and each
way of computing it, row 0 of an m-row product is compared bitwise with the one-row product, for
m in 1..64; then the whole target: the logits of one verified token alone and with 1, 3, 15 and
63 other tree nodes beside it (a chain and a star), in each dtype. Timings (median of repeats)
show what each kernel costs at 1, 4 and 16 rows.

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
from decoding.target import TargetModel
from decoding.tree import TokenTree

ROWS = (1, 2, 3, 4, 5, 8, 12, 16, 32, 64)


def kernels(weight: torch.Tensor) -> dict:
    wt = weight.t().contiguous()
    return {
        "F.linear": lambda x: F.linear(x, weight),
        "W @ x^T": lambda x: torch.matmul(weight, x.t()).t(),
        "x @ W^T (contiguous)": lambda x: x @ wt,
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args(argv)
    linear, whole = [], []
    for dtype in args.dtypes.split(","):
        variants = (True, False) if dtype == "float32" else (False,)    # float32: with and without the CPU kernels
        for cpu_kernels in variants:
            target = TargetModel.load(dtype=dtype, cpu_kernels=cpu_kernels)
            if cpu_kernels == variants[0]:
                linear += linear_rows(target)
            whole += [{**r, "cpu_kernels": target.cpu_kernels} for r in target_rows(target)]
    md = ["# Batch invariance: does a row's result depend on the rows beside it?", "",
          "Linears: row 0 of an m-row product vs the one-row product (bitwise); timings in ms.", "",
          "| op | shape | dtype | kernel | row counts that differ | 1 row | 4 rows | 16 rows |",
          "|---|---|---|---|---|---|---|---|"]
    for r in linear:
        md.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['kernel']} | {r['rows_differing'] or 'none'} | "
                  f"{r['ms'][1]} | {r['ms'][4]} | {r['ms'][16]} |")
    md += ["", "Whole target: logits of one token verified alone vs beside k other tree nodes.", "",
           "| dtype | cpu kernels | tree | other rows | bitwise | max abs diff | argmax same |",
           "|---|---|---|---|---|---|---|"]
    for r in whole:
        md.append(f"| {r['dtype']} | {r.get('cpu_kernels', '')} | {r['tree']} | {r['other_rows']} | {r['bitwise']} | "
                  f"{r['max_abs_diff']:.3g} | {r['argmax_same']} |")
    write_results("invariance", machine_info(),
                  [{"method": "linear", **r} for r in linear] + [{"method": "target", **r} for r in whole],
                  "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
