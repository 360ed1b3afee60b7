"""Analysis of speculative decoding runs: where drafts come from and where they fail.

A run is recorded as a list of :class:`Step` (the verified token tree and the accepted path),
captured by :class:`RecordingVerifier` around the engine's own verifier, so recording changes
nothing in the decode. Everything else here is pure functions over steps, generation
statistics and the committed benchmark files (``bench/results/*.json``), plus small plotting
helpers that draw on a given matplotlib axis. Used by ``notebooks/analysis.ipynb``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from decoding.tree import TokenTree

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = ("pld", "rest", "dense", "dynamic")     # the proposers of the SENSE hybrid, in plot order


@dataclass(frozen=True)
class Step:
    """One verification step: the tree sent to the target and the accepted root-to-node path."""

    tree: TokenTree
    path: tuple[int, ...]

    @property
    def n_accepted(self) -> int:
        return len(self.path) - 1


@dataclass
class RecordingVerifier:
    """Wraps a verifier and records every verified tree with its accepted path.

    Pass it to ``decoding.engine.generate(verifier=...)``; the verdicts are the inner
    verifier's, untouched. Other attributes (e.g. soft-gate ``stats``) are the inner one's.
    """

    inner: object
    steps: list[Step] = field(default_factory=list)

    def first_token(self, logits):
        return self.inner.first_token(logits)

    def verify(self, tree: TokenTree, logits):
        verdict = self.inner.verify(tree, logits)
        self.steps.append(Step(tree, tuple(verdict.path)))
        return verdict

    def __getattr__(self, name):
        if name == "inner":             # not yet set (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def run_recorded(target, prompt_ids: list[int], drafter, *, params, budget, soft=None):
    """``generate`` with a recording verifier: returns (GenerationResult, list of Step)."""
    from decoding.engine import generate
    from decoding.verifiers import make_verifier

    rec = RecordingVerifier(make_verifier(params, soft))
    result = generate(target, prompt_ids, params=params, drafter=drafter, verifier=rec, budget=budget, soft=soft)
    return result, rec.steps


# -- acceptance tables --------------------------------------------------------------------------


def acceptance_by_depth(steps: Iterable[Step]) -> dict[int, dict[str, float]]:
    """Per draft depth d >= 1 (distance from the pending root):

    drafted / accepted: draft nodes at depth d, and those on the accepted path (at most one per
    step, so accepted is also the number of steps that accepted d tokens or more);
    rate: accepted / drafted (how much of the tree's width at depth d was useful);
    tried: steps whose accepted path reached depth d - 1 at a node with children to verify;
    conditional: accepted / tried, the chance that depth d is accepted once d - 1 is (where
    the tree went on).
    """
    table: dict[int, Counter] = defaultdict(Counter)
    for s in steps:
        t = s.tree
        for i in range(1, len(t)):
            table[t.depths[i]]["drafted"] += 1
        for d, node in enumerate(s.path):
            table[d + 1]["tried"] += bool(t.children(node))
            if d + 1 < len(s.path):
                table[d + 1]["accepted"] += 1
    out = {}
    for d in sorted(table):
        c = table[d]
        if not c["drafted"]:
            continue
        out[d] = {"drafted": c["drafted"], "accepted": c["accepted"], "rate": c["accepted"] / c["drafted"],
                  "tried": c["tried"], "conditional": c["accepted"] / c["tried"] if c["tried"] else 0.0}
    return out


def acceptance_by_source(steps: Iterable[Step], sources: Sequence[str] = SOURCES) -> dict[str, dict[str, float]]:
    """Per proposer label (``TokenTree.sources``):

    drafted / accepted: draft nodes it proposed (alone or with others), and those accepted;
    rate: accepted / drafted;
    sole_drafted / sole_accepted: the same for nodes no other source proposed.
    Labels outside `sources` get rows too; trees without source labels count under "unknown".
    """
    table: dict[str, Counter] = {name: Counter() for name in sources}
    for s in steps:
        t = s.tree
        on_path = set(s.path[1:])
        for i in range(1, len(t)):
            labels = t.sources[i] if t.sources is not None else ("unknown",)
            acc = i in on_path
            for name in labels:
                c = table.setdefault(name, Counter())
                c["drafted"] += 1
                c["accepted"] += acc
                if len(labels) == 1:
                    c["sole_drafted"] += 1
                    c["sole_accepted"] += acc
    return {name: {"drafted": c["drafted"], "accepted": c["accepted"],
                   "rate": c["accepted"] / c["drafted"] if c["drafted"] else 0.0,
                   "sole_drafted": c["sole_drafted"], "sole_accepted": c["sole_accepted"]}
            for name, c in table.items()}


def accepted_by_source_combination(steps: Iterable[Step]) -> Counter:
    """Accepted draft tokens by the set of sources that proposed them, e.g. {"pld+rest": 3}."""
    out: Counter = Counter()
    for s in steps:
        for i in s.path[1:]:
            labels = s.tree.sources[i] if s.tree.sources is not None else ("unknown",)
            out["+".join(labels)] += 1
    return out


def accepted_by_group(steps: Iterable[Step], groups: Mapping[str, Iterable[str]]) -> Counter:
    """Accepted draft tokens by which groups of sources proposed them.

    `groups` maps a group name to its source labels, e.g. {"request": ("pld", "dynamic"),
    "datastores": ("rest", "dense")}; a token proposed from both groups counts under
    "request+datastores" (group names in the given order), one from neither under "other".
    """
    groups = {name: set(labels) for name, labels in groups.items()}
    out: Counter = Counter()
    for s in steps:
        for i in s.path[1:]:
            labels = set(s.tree.sources[i]) if s.tree.sources is not None else set()
            hit = [name for name, members in groups.items() if labels & members]
            out["+".join(hit) if hit else "other"] += 1
    return out


def co_proposal(steps: Iterable[Step], sources: Sequence[str] = SOURCES) -> dict[str, dict[str, float]]:
    """overlap[a][b]: the fraction of the draft nodes proposed by `a` that `b` proposed too
    (1.0 on the diagonal when `a` proposed anything, 0.0 when it proposed nothing)."""
    both = {a: Counter() for a in sources}
    for s in steps:
        if s.tree.sources is None:
            continue
        for labels in s.tree.sources[1:]:
            for a in labels:
                if a in both:
                    for b in labels:
                        both[a][b] += 1
    return {a: {b: both[a][b] / both[a][a] if both[a][a] else 0.0 for b in sources} for a in sources}


def aggregate(stats: Iterable) -> dict[str, float]:
    """Pooled figures over several ``GenerationStats``: token-weighted, like bench/sense.py.

    mat = (accepted + steps) / steps; acceptance_rate = accepted / drafted;
    tokens_per_s = all new tokens / all decode time.
    """
    keys = ("new_tokens", "steps", "drafted", "accepted", "time_total", "time_draft", "time_verify")
    tot = {k: 0 for k in keys}          # counts stay integers, times become floats
    n = 0
    for s in stats:
        n += 1
        for k in keys:
            tot[k] += getattr(s, k)
    steps, drafted = tot["steps"], tot["drafted"]
    return {**tot, "requests": n,
            "mat": (tot["accepted"] + steps) / steps if steps else 0.0,
            "acceptance_rate": tot["accepted"] / drafted if drafted else 0.0,
            "tokens_per_s": tot["new_tokens"] / tot["time_total"] if tot["time_total"] > 0 else 0.0}


def speedups(by_method: Mapping[str, Mapping[str, float]], baseline: str = "ar") -> dict[str, float]:
    """tokens/s of each method over the baseline's (from :func:`aggregate` rows)."""
    base = by_method[baseline]["tokens_per_s"]
    return {m: row["tokens_per_s"] / base if base else 0.0 for m, row in by_method.items()}


# -- data ---------------------------------------------------------------------------------------


SPEC_BENCH_TASKS = ("translation", "summarization", "qa", "math_reasoning", "rag")


def spec_bench_by_category(questions: Iterable[dict], per_category: int = 1) -> dict[str, list[str]]:
    """First-turn prompts per Spec-Bench category, the first `per_category` by question id.

    Spec-Bench's six categories: its five task categories, and "mt_bench" for the MT-Bench
    questions, which carry MT-Bench's own categories (writing, roleplay, ...; ids 81-160).
    """
    by_cat: dict[str, list[str]] = defaultdict(list)
    for q in sorted(questions, key=lambda q: q["question_id"]):
        cat = q["category"] if q["category"] in SPEC_BENCH_TASKS else "mt_bench"
        if len(by_cat[cat]) < per_category:
            by_cat[cat].append(q["turns"][0])
    return dict(by_cat)


def spec_bench_halves(questions: Iterable[dict], per_category: int = 6) -> tuple[list[str], dict[str, list[str]]]:
    """Spec-Bench split per category into two halves by question id: the odd ids are the
    datastore half (all their first-turn prompts, in id order), the even ids the evaluation half,
    of which `per_category` per category are returned, evenly spaced over the half (MT-Bench's
    eight sub-categories sit in id blocks of ten: spacing samples them all). No question is in both."""
    store: list[str] = []
    evaluation: dict[str, list[str]] = defaultdict(list)
    for q in sorted(questions, key=lambda q: q["question_id"]):
        cat = q["category"] if q["category"] in SPEC_BENCH_TASKS else "mt_bench"
        if q["question_id"] % 2:
            store.append(q["turns"][0])
        else:
            evaluation[cat].append(q["turns"][0])
    picked = {}
    for cat, half in evaluation.items():
        n = min(per_category, len(half))
        picked[cat] = [half[i * len(half) // n] for i in range(n)]
    return store, picked


def humaneval_question(problem: Mapping) -> str:
    """A HumanEval problem as a user asks a chat model for it: the function to complete."""
    return "Complete this Python function. Reply with the code only.\n\n" + problem["prompt"]


def humaneval_halves(problems: Sequence[Mapping], n: int = 24) -> tuple[list[str], list[str]]:
    """HumanEval split into two halves by position: the even problems are the datastore half
    (all of them, as questions), the odd ones the evaluation half, of which `n` are returned,
    evenly spaced over it (the later problems are longer). No problem is in both."""
    questions = [humaneval_question(p) for p in problems]
    store, evaluation = questions[0::2], questions[1::2]
    n = min(n, len(evaluation))
    return store, [evaluation[i * len(evaluation) // n] for i in range(n)] if n > 0 else []


def load_results(name: str, results_dir: str | Path = RESULTS) -> dict:
    """A committed benchmark file, e.g. ``load_results("engine")`` for bench/results/engine.json."""
    return json.loads((Path(results_dir) / f"{name}.json").read_text())


def committed_cost_curve(engine: Mapping, dtype: str | None = None) -> dict[int, float]:
    """c(n) from an engine benchmark payload: its ``verify_cost`` rows (draft_tokens -> relative
    cost) in `dtype` (default: the run's own, ``machine.dtype``; rows without one count as it)."""
    dtype = dtype or engine.get("machine", {}).get("dtype")
    return {int(r["draft_tokens"]): float(r["relative_cost"]) for r in engine["rows"]
            if r.get("method") == "verify_cost" and r.get("dtype", dtype) == dtype}


def committed_method_rows(sense: Mapping, dataset: str, datastore: str | None = None) -> dict[str, dict]:
    """method -> row (mat, speedup, acceptance_rate, ...) of a SENSE benchmark payload for one
    dataset: its adaptive-budget rows in the run's dtype, over `datastore` (default: "id" where
    the payload has it, else "ood")."""
    rows = [r for r in sense["rows"] if r.get("dataset") == dataset and "mat" in r
            and r.get("budget", "adaptive") == "adaptive" and not r.get("float32_beside")]
    if datastore is None:
        datastore = "id" if any(r.get("datastore") == "id" for r in rows) else "ood"
    return {r["method"]: r for r in rows if r.get("datastore", datastore) == datastore}


# -- plots ---------------------------------------------------------------------------------------


def plot_depth(ax, table: Mapping[int, Mapping[str, float]], title: str = "", min_tries: int = 10) -> None:
    """Acceptance by draft depth: node rate (bars) and conditional rate (line, only at depths
    with at least `min_tries` tries, each labelled with its count)."""
    depths = list(table)
    ax.bar(depths, [table[d]["rate"] for d in depths], color="tab:blue", alpha=0.6, label="accepted / drafted nodes")
    tried = [d for d in depths if table[d]["tried"] >= min_tries]
    ax.plot(tried, [table[d]["conditional"] for d in tried], "o-", color="tab:red",
            label=f"P(depth d accepted | d-1 accepted), label: tries (>= {min_tries})")
    for d in tried:
        ax.annotate(str(table[d]["tried"]), (d, table[d]["conditional"]), textcoords="offset points",
                    xytext=(0, 5), ha="center", fontsize=7, color="tab:red")
    ax.set_xlabel("draft depth d")
    ax.set_ylabel("acceptance")
    ax.set_ylim(0, 1)
    ax.set_xticks(depths)
    ax.legend(fontsize=8)
    ax.set_title(title)


def plot_bars(ax, labels: Sequence[str], values: Sequence[float], *, ylabel: str, title: str = "",
              annotate: Sequence[str] | None = None, color: str = "tab:blue", rotate: bool = False) -> None:
    """A labelled bar chart, optionally with a text above each bar."""
    xs = range(len(labels))
    ax.bar(xs, values, color=color)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if annotate:
        for x, v, text in zip(xs, values, annotate):
            ax.annotate(text, (x, v), ha="center", va="bottom", fontsize=7)


def plot_grouped(ax, groups: Sequence[str], series: Mapping[str, Sequence[float]], *, ylabel: str,
                 title: str = "", baseline: float | None = None) -> None:
    """Side-by-side bars: one group per x label, one bar per series (NaN: no bar)."""
    width = 0.8 / max(1, len(series))
    for j, (name, values) in enumerate(series.items()):
        ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))], values, width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    if baseline is not None:
        ax.axhline(baseline, color="gray", lw=0.8, ls="--")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.25)       # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left", ncol=min(2, len(series)))


def plot_overlap(ax, overlap: Mapping[str, Mapping[str, float]], title: str = "") -> None:
    """Heat map of :func:`co_proposal`: row a, column b = share of a's nodes that b proposed too."""
    names = list(overlap)
    grid = [[overlap[a][b] for b in names] for a in names]
    ax.imshow(grid, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8, color="white" if v > 0.6 else "black")
    ax.set_xlabel("also proposed by")
    ax.set_title(title)


def plot_cost_curves(ax, curves: Mapping[str, Mapping[int, float]], title: str = "verify cost c(n)") -> None:
    """c(n) curves, relative to a plain decode step (c(0) = 1); n on a log-2 axis (linear below 1)."""
    from matplotlib.ticker import NullLocator, ScalarFormatter

    for name, curve in curves.items():
        ns = sorted(curve)
        ax.plot(ns, [curve[n] for n in ns], "o-", label=name)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("symlog", base=2, linthresh=1)
    top = max(max(c) for c in curves.values() if c)
    ax.set_xticks([0] + [2 ** k for k in range(top.bit_length())])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(left=-0.3)
    ax.set_xlabel("draft tokens n in the verified tree")
    ax.set_ylabel("c(n) = t(n) / t(0)")
    ax.set_title(title)
    ax.legend(fontsize=8)
