"""Per-request drafters for the server, with a fallback when the index shards are unavailable.

The drafters themselves come from ``decoding.methods.make_drafter``. When a method needs the
sharded dense index and no shard answers (at the start or mid-request), the request goes on
with prompt lookup (PLD) drafting: verification is unchanged, so the answer stays exactly the
one the method would have given (strict mode), only the speed differs, and the response's
statistics say so (``fallback``).
"""

from __future__ import annotations

from decoding.drafters import Drafter, PromptLookupDrafter
from decoding.drafters.base import WrappedDrafter


class FallbackDrafter(WrappedDrafter):
    """Drafts with `primary` until `store.failure` is set, then with PLD for the rest. The
    primary's needs are the wrapper's (``WrappedDrafter``): a dense drafter keeps the last state
    it observed (the engine then keeps no copy of its own a step), and its key transform serves
    soft verification's cosine stand-in; prompt lookup, the fallback, reads neither."""

    def __init__(self, primary: Drafter, store, reason: str | None = None) -> None:
        super().__init__(primary)
        self.store = store
        self.fallback = PromptLookupDrafter()
        self.reason = reason               # set: falling back (from the start when given here)
        self.steps = 0
        self.fallback_step: int | None = 0 if reason else None

    def begin(self, prompt_ids, hidden) -> None:
        if self.reason is None:
            self.primary.begin(prompt_ids, hidden)

    def observe(self, positions, hidden) -> None:
        if self.reason is None:
            self.primary.observe(positions, hidden)

    def propose(self, tokens, budget, max_depth, hidden=None):
        self.steps += 1
        return super().propose(tokens, budget, max_depth, hidden)

    def anchored_chains(self, tokens, max_depth, hidden=None):
        """The primary's candidates until its store fails, then PLD's (a wrapper such as
        ``PredictionDrafter`` reads them here)."""
        if self.reason is None:
            found = self.primary.anchored_chains(tokens, max_depth, hidden)
            if self.store.failure is None:
                return found
            self.reason = f"index shards unavailable: {self.store.failure}"
            self.fallback_step = self.steps
        return self.fallback.anchored_chains(tokens, max_depth)

    def report(self) -> dict | None:
        if self.reason is None:
            return None
        return {"method": "pld", "reason": self.reason, "from_step": self.fallback_step}
