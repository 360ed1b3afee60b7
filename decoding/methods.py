"""Decoding methods by name: which drafter (and datastores) each one uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from decoding.drafters import DenseDrafter, Drafter, HybridDrafter, NoDrafter, PromptLookupDrafter, SparseDrafter
from decoding.errors import InvalidRequestError

METHODS = {
    "ar": "plain autoregressive decoding (no drafts)",
    "pld": "prompt lookup: copy what followed an earlier match of the last 3/2/1 tokens",
    "rest": "REST: suffix match in a token datastore, continuations merged into a trie",
    "dense": "dense retrieval: neighbours of the target's hidden state (static datastore + dynamic cache), trie",
    "dresd": "DReSD: dense retrieval, independent chains, static datastore only",
    "sense": "SENSE: PLD + REST + dense (with dynamic cache) fused into one tree",
}
NEEDS_SPARSE = {"rest", "sense"}
NEEDS_DENSE = {"dense", "dresd", "sense"}


@dataclass
class Datastores:
    sparse: Any = None      # index.sparse.SparseIndex
    dense: Any = None       # index.dense_store.DenseStore


def check_method(method: str) -> str:
    if method not in METHODS:
        raise InvalidRequestError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def make_drafter(method: str, stores: Datastores | None = None) -> Drafter:
    """A fresh drafter for one request (drafters hold per-request state)."""
    check_method(method)
    stores = stores or Datastores()
    if method in NEEDS_SPARSE and stores.sparse is None:
        raise InvalidRequestError(f"method {method!r} needs a sparse (REST) datastore")
    if method in NEEDS_DENSE and stores.dense is None:
        raise InvalidRequestError(f"method {method!r} needs a dense datastore")
    if method == "ar":
        return NoDrafter()
    if method == "pld":
        return PromptLookupDrafter()
    if method == "rest":
        return SparseDrafter(stores.sparse)
    if method == "dense":
        return DenseDrafter(stores.dense)
    if method == "dresd":
        return DenseDrafter(stores.dense, mode="chains", dynamic=False, name="dresd")
    return HybridDrafter([(PromptLookupDrafter(), 1.0), (SparseDrafter(stores.sparse), 1.0),
                          (DenseDrafter(stores.dense), 2.0)], name="sense")
