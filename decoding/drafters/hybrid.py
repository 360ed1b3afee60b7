"""Hybrid drafting: several drafters' candidates fused into one tree under one budget."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from decoding.drafters.base import Drafter


class HybridDrafter(Drafter):
    """Each part's candidate weights are normalised to sum to the part's share (times the part's
    ``fusion_scale`` of what it found this step), then all candidates merge into one weighted
    trie (the budget goes where the weight is)."""

    name = "hybrid"

    def __init__(self, parts: Sequence[tuple[Drafter, float]], name: str = "hybrid") -> None:
        if not parts or any(w <= 0 for _, w in parts):
            raise ValueError("a hybrid drafter needs parts with positive shares")
        self.parts = list(parts)
        self.name = name
        self.needs_hidden = any(d.needs_hidden for d, _ in self.parts)
        self._observers = [d for d, _ in self.parts if d.needs_hidden]

    def begin(self, prompt_ids: list[int], hidden: torch.Tensor | None) -> None:
        for d, _ in self.parts:
            d.begin(prompt_ids, hidden if d.needs_hidden else None)

    def observe(self, positions: np.ndarray, hidden: torch.Tensor) -> None:
        for d in self._observers:
            d.observe(positions, hidden)

    def anchored_chains(self, tokens: np.ndarray, max_depth: int, hidden: torch.Tensor | None = None):
        """The fused chains, each labelled with the source of the part that proposed it, with
        the anchor keys its part gave (None where it gave none)."""
        fused, labels, keys = [], [], []
        for d, share in self.parts:
            found, found_labels, found_keys = d.anchored_chains(tokens, max_depth,
                                                                hidden if d.needs_hidden else None)
            total = sum(w for _, w in found)
            if total > 0:
                mass = share * d.fusion_scale(found)
                fused += [(c, mass * w / total) for c, w in found]
                labels += found_labels
                keys += found_keys
        return fused, labels, keys

    def labelled_chains(self, tokens: np.ndarray, max_depth: int, hidden: torch.Tensor | None = None):
        return self.anchored_chains(tokens, max_depth, hidden)[:2]

    def chains(self, tokens: np.ndarray, max_depth: int, hidden: torch.Tensor | None = None):
        return self.anchored_chains(tokens, max_depth, hidden)[0]

    @property
    def keeps_hidden(self) -> bool:
        """Whether every part that reads hidden states keeps the last one itself (so each can be
        passed None)."""
        return all(d.keeps_hidden for d, _ in self.parts if d.needs_hidden)

    @property
    def anchors(self) -> bool:
        return any(d.anchors for d, _ in self.parts)

    @anchors.setter
    def anchors(self, on: bool) -> None:
        for d, _ in self.parts:
            d.anchors = on

    @property
    def transform(self):
        """The key transform of the first part that has one (for soft verification's anchors)."""
        return next((d.transform for d, _ in self.parts if getattr(d, "transform", None) is not None), None)
