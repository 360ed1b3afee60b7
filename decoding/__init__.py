"""Retrieval-based speculative decoding: the pure algorithm, no Ray.

Layers, bottom up:
- ``target``: the target model wrapper (prefill, tree verification, KV commit).
- ``tree``: token trees (the drafts) and their attention masks.
- ``drafters``: proposers of token trees (none, PLD, sparse/REST).
- ``verifiers``: acceptance rules (strict greedy, strict sampling).
- ``engine``: the decode loop; ``metrics``: per-generation statistics.
"""

from decoding.errors import ContextLengthError, InvalidRequestError, ModelLoadError, SenseError

__all__ = ["ContextLengthError", "InvalidRequestError", "ModelLoadError", "SenseError"]
