"""What a verifier decides for one verified tree (strict and soft verifiers alike)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """The accepted root-to-node path (node indices, starting at the root) and the next pending
    token, chosen from the target's distribution at the last accepted node."""

    path: list[int]
    next_token: int

    @property
    def n_accepted(self) -> int:
        """Draft tokens accepted (the root is the pending token, not a draft)."""
        return len(self.path) - 1
