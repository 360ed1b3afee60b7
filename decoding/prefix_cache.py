"""Prompts' keys, values and hidden states, kept for later prompts that begin the same way.

Every chat request to a deployment starts with the same template (SmolLM2's system prompt is 24
tokens, a quarter of a GSM8K question's prompt), a conversation's next turn starts with the whole
of its last prompt, and a benchmark or an agent sends the same instructions again and again. A
prompt whose first n tokens a kept prompt shares is prefilled from a copy of those n positions:
only its other tokens run through the model (:meth:`decoding.target.TargetModel.prefill`).

Exact by construction, not by luck: with a prefix cache every prompt, reused or not, is prefilled
on the batch-invariant kernels, on which a position's keys, values and hidden state depend on its
token, its position and the cache before it, not on how the prompt was cut into forwards
(``tests/test_prefix_cache.py`` checks cuts at every kind of place, bitwise). A reused prefix is
what prefilling it would have computed, so an output never depends on what ran before it.

Kept: whole prompts as they are prefilled, and each finished request's whole sequence (its prompt
and the tokens it committed: ``TargetModel.keep``; a verified position's keys, values and hidden
state are its prefill's, bitwise, on the same kernels), least recently used first out, within a
byte budget (keys and values of all layers and the hidden states; a sequence that extends a kept
one replaces it). Looked up by the
longest common prefix with any kept prompt, at most all but the prompt's last token (whose logits
the prefill returns), in one walk down a trie of the kept prompts' tokens.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Prefix:
    """One kept prompt: its tokens, its keys and values ``[2, layers, 1, groups, n, head_dim]``
    and the hidden states of the target's chosen layer ``[n, hidden]``."""

    tokens: np.ndarray
    kv: torch.Tensor
    hidden: torch.Tensor

    @property
    def nbytes(self) -> int:
        return (self.kv.numel() * self.kv.element_size() + self.hidden.numel() * self.hidden.element_size()
                + self.tokens.nbytes)


class _Node:
    __slots__ = ("children", "count", "key")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.count = 0          # kept prompts through this node
        self.key = -1           # one of them


class _Trie:
    """The kept prompts' tokens as a trie: a prompt's longest common prefix with any kept one in
    one walk down its tokens, whatever the number kept. Every kept prompt ends at a leaf (none is
    the beginning of another: :meth:`PrefixCache.add` keeps it so)."""

    def __init__(self) -> None:
        self.root = _Node()

    def walk(self, tokens: list[int]) -> tuple[int, _Node]:
        """How many leading tokens some kept prompt shares, and the node they end at."""
        node, n = self.root, 0
        for t in tokens:
            child = node.children.get(t)
            if child is None:
                break
            node, n = child, n + 1
        return n, node

    def insert(self, tokens: list[int], key: int) -> None:
        node = self.root
        for t in tokens:
            child = node.children.get(t)
            if child is None:
                child = node.children[t] = _Node()
            node = child
            node.count += 1
            node.key = key

    def remove(self, tokens: list[int], key: int) -> None:
        path = [self.root]
        for t in tokens:
            path.append(path[-1].children[t])
        for depth in range(len(tokens), 0, -1):         # bottom up: a node's children are settled first
            node = path[depth]
            node.count -= 1
            if not node.count:
                del path[depth - 1].children[tokens[depth - 1]]
            elif node.key == key:
                node.key = next(iter(node.children.values())).key


class PrefixCache:
    """Kept prompts within `max_bytes` (see the module docstring); safe to share between threads.

    ``stats()``: lookups, hits, tokens reused and tokens prefilled since the start, entries and
    bytes kept."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("a prefix cache needs a positive byte budget")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, Prefix] = OrderedDict()     # oldest use first
        self._trie = _Trie()
        self._next = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self.lookups = self.hits = self.reused_tokens = self.prefilled_tokens = 0

    def longest(self, ids: np.ndarray, *, use: bool = True) -> tuple[Prefix | None, int]:
        """The kept prompt sharing the most leading tokens with `ids`, and how many it shares
        (at most ``len(ids) - 1``); (None, 0) when none shares one. `use`: the prefill takes it
        (counted, and the entry becomes the most recently used); else only asked."""
        with self._lock:
            n, node = self._trie.walk(ids[:-1].tolist())
            if not use:
                return (self._entries[node.key], n) if n else (None, 0)
            self.lookups += 1
            self.prefilled_tokens += len(ids) - n
            if not n:
                return None, 0
            self._entries.move_to_end(node.key)
            self.hits += 1
            self.reused_tokens += n
            return self._entries[node.key], n

    def touch(self, ids) -> bool:
        """Whether all of `ids` is kept already (as a prompt, or inside a longer one); if so it
        becomes the most recently used, as adding it again would make it, without the copy of its
        keys and values that adding takes."""
        with self._lock:
            n, node = self._trie.walk(list(ids))
            if n != len(ids) or not n:
                return False
            self._entries.move_to_end(node.key)
            return True

    def add(self, ids: np.ndarray, kv: torch.Tensor, hidden: torch.Tensor) -> None:
        """Keep a prefilled prompt (`kv` and `hidden` are kept as given: pass copies). A kept
        prompt that `ids` begins with is dropped (the new one covers it); a prompt that a kept one
        begins with, or one larger than the budget, is not kept."""
        entry = Prefix(np.asarray(ids, dtype=np.int64).copy(), kv, hidden)
        if entry.nbytes > self.max_bytes:
            return
        tokens = entry.tokens.tolist()
        with self._lock:
            n, node = self._trie.walk(tokens)
            if n == len(tokens):                    # already kept (the same, or inside a longer prompt)
                self._entries.move_to_end(node.key)
                return
            if n and not node.children:             # the new prompt extends a kept one
                self._drop(node.key)
            self._entries[self._next] = entry
            self._trie.insert(tokens, self._next)
            self._next += 1
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self._trie.remove(entry.tokens.tolist(), key)
        self._bytes -= entry.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._trie = _Trie()
            self._bytes = 0

    def reset_counters(self) -> None:
        """Zero what ``stats`` counts since the start (the kept prompts stay)."""
        with self._lock:
            self.lookups = self.hits = self.reused_tokens = self.prefilled_tokens = 0

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "lookups": self.lookups, "hits": self.hits, "reused_tokens": self.reused_tokens,
                    "prefilled_tokens": self.prefilled_tokens}
