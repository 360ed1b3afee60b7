"""Drafters: propose a token tree rooted at the pending token. One file per proposer."""

from decoding.drafters.base import Drafter, NoDrafter
from decoding.drafters.pld import PromptLookupDrafter
from decoding.drafters.sparse import SparseDrafter

__all__ = ["Drafter", "NoDrafter", "PromptLookupDrafter", "SparseDrafter"]
