"""How likely each draft node is to be accepted, learned online from the trees verified so far.

A drafter's weights rank its candidates but are not probabilities: a weight share of 0.5 means
"half the retrieved continuations go this way", which lands far more often after a 3-token prompt
match than after a 1-token one, and differently per proposer and per corpus. ``NodeAcceptance``
calibrates them: a logistic regression of "the node is accepted, given that its parent was" on
the node's features, trained by a stochastic gradient step on every node whose parent the target
accepted (the only nodes whose outcome a verification tells). Then

    P(node on the accepted path) = product over the node and its ancestors of p(node | parent),

and the expected accepted tokens of the tree a budget of k keeps is the sum of that over the k
best-ranked nodes: what ``decoding.budget.AdaptiveBudget.cut`` weighs, step by step, against the
cost of verifying k nodes. Features: the node's share of its parent's weight and of the whole
tree's (logs), its depth, how many proposers drafted it, and which (one weight per source label,
added when a label is first seen).
"""

from __future__ import annotations

import math
import threading

from decoding.tree import TokenTree

_FLOOR = 1e-6


class NodeAcceptance:
    """p(draft node accepted | parent accepted), a logistic model updated online. Thread-safe:
    shared by the requests of one drafter (``decoding.budget.SharedEstimates``)."""

    warm = 256      # nodes learned from before the estimates are used (see ``ready``)

    def __init__(self, learning_rate: float = 0.05) -> None:
        self.learning_rate = learning_rate
        # Before any observation p = share / (1 + share): a sole candidate is even odds, a minority
        # one less. The first few dozen nodes move it to what this drafter's shares mean.
        self.coef: dict[str, float] = {"bias": 0.0, "log_share_of_parent": 1.0, "log_share_of_tree": 0.0,
                                       "depth": 0.0, "n_sources": 0.0}
        self.updates = 0
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        """Whether it has learned from ``warm`` nodes. Its prior (p = share / (1 + share)) is
        pessimistic where candidates agree, so until then the cut keeps the history's budget
        rather than follow a guess (a drafter's first request or two)."""
        return self.updates >= self.warm

    def snapshot(self) -> tuple[dict[str, float], int]:
        with self._lock:
            return dict(self.coef), self.updates

    def restore(self, snap: tuple[dict[str, float], int]) -> None:
        with self._lock:
            self.coef, self.updates = dict(snap[0]), snap[1]

    @staticmethod
    def features(tree: TokenTree, i: int) -> dict[str, float]:
        w, parent = tree.weights, tree.parents[i]
        sources = tree.sources[i] if tree.sources is not None else ()
        x = {"bias": 1.0,
             "log_share_of_parent": math.log(max(w[i] / w[parent], _FLOOR)) if w[parent] > 0 else math.log(_FLOOR),
             "log_share_of_tree": math.log(max(w[i] / w[0], _FLOOR)) if w[0] > 0 else math.log(_FLOOR),
             "depth": min(tree.depths[i], 8) / 8, "n_sources": len(sources) / 4}
        for label in sources:
            x["source:" + label] = 1.0
        return x

    def _p(self, x: dict[str, float], coef: dict[str, float]) -> float:
        z = sum(coef.get(k, 0.0) * v for k, v in x.items())
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))

    def on_path(self, tree: TokenTree) -> list[float]:
        """P(node i on the accepted path) for every node (the root: 1). Needs the tree's weights
        (``TokenTree.from_chains`` sets them); without them, 0 for every draft node."""
        if tree.weights is None:
            return [1.0] + [0.0] * tree.n_draft
        c = self.coef
        bias, a_parent, a_tree, a_depth, a_sources = (c["bias"], c["log_share_of_parent"], c["log_share_of_tree"],
                                                      c["depth"], c["n_sources"] / 4)
        label = {k[7:]: v for k, v in c.items() if k.startswith("source:")}
        w, parents, depths = tree.weights, tree.parents, tree.depths
        sources = tree.sources or ((),) * len(w)
        log = math.log
        out = [1.0] * len(w)
        for i in range(1, len(w)):              # parents precede children: as features() computes
            p = parents[i]
            z = (bias + a_parent * (log(max(w[i] / w[p], _FLOOR)) if w[p] > 0 else log(_FLOOR))
                 + a_tree * (log(max(w[i] / w[0], _FLOOR)) if w[0] > 0 else log(_FLOOR))
                 + a_depth * min(depths[i], 8) / 8 + a_sources * len(sources[i]))
            for s in sources[i]:
                z += label.get(s, 0.0)
            out[i] = out[p] / (1.0 + math.exp(-max(-30.0, min(30.0, z))))
        return out

    def learn(self, tree: TokenTree, path) -> None:
        """One verified tree and its accepted `path` (node indices from the root): a gradient
        step on every node whose parent was accepted (accepted itself or not)."""
        if tree.weights is None or tree.n_draft == 0:
            return
        accepted = set(path)
        seen = [(self.features(tree, i), i in accepted) for i in range(1, len(tree)) if tree.parents[i] in accepted]
        with self._lock:
            coef, lr = self.coef, self.learning_rate
            for x, y in seen:
                g = lr * ((1.0 if y else 0.0) - self._p(x, coef))
                for k, v in x.items():
                    coef[k] = coef.get(k, 0.0) + g * v
            self.updates += len(seen)
