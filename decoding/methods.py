"""Decoding methods by name: the one registry.

Every method is one :class:`Method` entry of ``METHODS``: its name, a description, the datastores
it needs and the factory of its drafter; a hybrid method also names the methods it fuses and each
one's share of the tree's weight (``fusion``). The command line, serving's configuration and
request validation, and every benchmark read this registry, so what is benchmarked is what is
served. A drafter reports its method's name (statistics, and the labels of its proposals in
``TokenTree.sources``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from decoding.errors import InvalidRequestError

SPARSE, DENSE = "sparse", "dense"           # the datastores (see Datastores)


@dataclass
class Datastores:
    sparse: Any = None      # index.sparse.SparseIndex
    dense: Any = None       # index.dense_store.DenseStore


@dataclass(frozen=True, eq=False)
class Method:
    name: str
    description: str
    build: Callable[[Datastores], Any]      # a fresh drafter (drafters hold per-request state)
    stores: frozenset[str] = frozenset()    # the datastores it needs: SPARSE, DENSE
    fusion: Mapping[str, float] = field(default_factory=dict)   # hybrid: part method -> share of the weight

    @property
    def needs_sparse(self) -> bool:
        return SPARSE in self.stores

    @property
    def needs_dense(self) -> bool:
        return DENSE in self.stores


def _drafters():
    """``decoding.drafters``, imported on first use rather than at the top: this registry is read
    where torch is not loaded (serving's ingress validates ``method`` fields with it), and the
    drafters import torch."""
    import decoding.drafters

    return decoding.drafters


def _fused(name: str) -> Callable[[Datastores], Any]:
    def build(stores: Datastores):
        parts = [(METHODS[part].build(stores), share) for part, share in METHODS[name].fusion.items()]
        return _drafters().HybridDrafter(parts, name=name)
    return build


# SENSE's fusion: each proposer's share of the tree's weight (its candidates' weights are
# normalised to sum to it), the dense retrieval (with its dynamic cache) counting double.
# REST was a third part until measured out: the tokens it alone drafted were accepted 0-0.009
# times a step (per-step attribution over 56 GSM8K and Spec-Bench answers), and SENSE without it,
# side by side in one process, kept its MAT (GSM8K ID store 2.65 vs 2.65, a 2,000-answer
# human-written GSM8K store 2.21 vs 2.18, Spec-Bench within +-0.1 per category) and ran 4-6%
# faster on GSM8K (its lookup and the rows its stray candidates took), 0-1% on Spec-Bench.
SENSE_FUSION = MappingProxyType({"pld": 1.0, "dense": 2.0})

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ar", "plain autoregressive decoding (no drafts)",
           lambda stores: _drafters().NoDrafter()),
    Method("pld", "prompt lookup: copy what followed an earlier match of the last 8 down to 1 tokens",
           lambda stores: _drafters().PromptLookupDrafter()),
    Method("rest", "REST: suffix match in a token datastore, continuations merged into a trie",
           lambda stores: _drafters().SparseDrafter(stores.sparse), frozenset({SPARSE})),
    Method("dense", "dense retrieval: neighbours of the target's hidden state (static datastore + dynamic cache), "
           "trie", lambda stores: _drafters().DenseDrafter(stores.dense), frozenset({DENSE})),
    Method("dresd", "DReSD: dense retrieval, independent chains, static datastore only",
           lambda stores: _drafters().DenseDrafter(stores.dense, mode="chains", dynamic=False, name="dresd"),
           frozenset({DENSE})),
    Method("sense", "SENSE: PLD + dense retrieval (static datastore + dynamic cache) fused into one tree",
           _fused("sense"), frozenset({DENSE}), SENSE_FUSION),
)}
METHOD_NAMES = tuple(METHODS)               # the names, in the registry's order (validation, OpenAPI enum)
NEEDS_SPARSE = frozenset(n for n, m in METHODS.items() if m.needs_sparse)
NEEDS_DENSE = frozenset(n for n, m in METHODS.items() if m.needs_dense)
DESCRIPTIONS = {n: m.description for n, m in METHODS.items()}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise InvalidRequestError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def make_drafter(method: str, stores: Datastores | None = None):
    """A fresh drafter for one request (drafters hold per-request state)."""
    entry = METHODS[check_method(method)]
    stores = stores or Datastores()
    if entry.needs_sparse and stores.sparse is None:
        raise InvalidRequestError(f"method {method!r} needs a sparse (REST) datastore")
    if entry.needs_dense and stores.dense is None:
        raise InvalidRequestError(f"method {method!r} needs a dense datastore")
    return entry.build(stores)
