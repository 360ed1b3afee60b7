"""The verify cost curve c(n) and the draft budget it implies.

c(n) = time of one verification forward with n draft tokens (plus the pending root) divided by
the time of a plain decode step (root only). On a GPU c(n) stays near 1 up to dozens of tokens;
on a CPU it climbs quickly, so the number of draft tokens worth sending differs by hardware.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from decoding.target import TargetModel
from decoding.tree import TokenTree

DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def measure_verify_cost(target: TargetModel, sizes: Sequence[int] = DEFAULT_SIZES, *, context_len: int = 256,
                        repeats: int = 7, warmup: int = 2) -> dict[int, float]:
    """Median seconds of one verify forward for each tree size n (n draft tokens), and n=0.

    Sizes are interleaved within each repeat so that drift in machine load hits all alike.
    """
    vocab = target.vocab_size
    prompt = [(17 * i + 5) % vocab for i in range(context_len)]
    state, _ = target.prefill(prompt)
    trees = {n: TokenTree.chain(7 % vocab, [(101 + 13 * i) % vocab for i in range(n)]) for n in (0, *sizes)}
    times: dict[int, list[float]] = {n: [] for n in trees}
    for rep in range(warmup + repeats):
        for n, tree in trees.items():
            t0 = time.perf_counter()
            target.verify(state, tree)
            dt = time.perf_counter() - t0
            target.commit(state, [0])
            state.cache.crop(-1)            # drop the committed root again: same context every time
            state.n_committed -= 1
            if rep >= warmup:
                times[n].append(dt)
    return {n: statistics.median(ts) for n, ts in times.items()}


def relative_cost(seconds: dict[int, float]) -> dict[int, float]:
    """c(n) = seconds[n] / seconds[0]."""
    base = seconds[0]
    return {n: s / base for n, s in sorted(seconds.items())}


def pick_budget(cost: dict[int, float], tolerance: float = 1.25) -> int:
    """Largest measured n whose verify costs at most `tolerance` decode steps (at least 1)."""
    fits = [n for n, c in cost.items() if n > 0 and c <= tolerance]
    return max(fits) if fits else 1
