"""Drafters: propose a token tree rooted at the pending token. One file per proposer."""

from decoding.drafters.base import Drafter, NoDrafter
from decoding.drafters.dense import DenseDrafter
from decoding.drafters.hybrid import HybridDrafter
from decoding.drafters.pld import PromptLookupDrafter
from decoding.drafters.prediction import PredictionDrafter
from decoding.drafters.sparse import SparseDrafter

__all__ = ["DenseDrafter", "Drafter", "HybridDrafter", "NoDrafter", "PredictionDrafter", "PromptLookupDrafter",
           "SparseDrafter"]
