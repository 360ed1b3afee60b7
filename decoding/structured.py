"""Structured outputs: every token of the answer must keep it a prefix of what a grammar (any
JSON object, or JSON that follows a JSON schema) accepts.

The grammar is llguidance's (https://github.com/guidance-ai/llguidance: a Rust matcher, one
small wheel with no dependencies; vLLM's ``guidance`` backend): per position it gives the set of
tokens that can come next, and every other token's logit is set to -inf before the token is
chosen (the standard token mask of constrained decoding). In a verified tree each node's row is
masked by the matcher's state after the answer plus the drafts on the path to that node (a walk
of the tree that consumes a child's token and rolls it back after its subtree), so each row gets
exactly the mask a one-row step at that position would get: strict verification stays token for
token the constrained autoregressive decoding. A child whose token its parent's mask forbids is
never accepted (its token's logit is -inf there); its subtree's rows are left as they are, as no
verifier reads a row its walk cannot reach. Once the grammar is complete the answer ends
(finish reason ``stop``) without the EOS token the mask would force next. Where the grammar
forces the next tokens (the text between a schema's values: keys, separators, a tool call's name)
they are the step's draft (``Sequence.propose``): certain to be accepted, several tokens a step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from decoding.errors import InvalidRequestError
from decoding.per_owner import PerOwner
from decoding.tree import TokenTree


# The JSON's layout: one line, ", " between items and ": " after keys (a schema's own
# "x-guidance" options win). With whitespace free, a small model wandered into runs of newlines and
# indentation; fixed, the text between values is known in advance, so the grammar forces it:
# GrammarConstraint.forced drafts it (a schema's keys, a tool call's name), every token accepted.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Grammar:
    """A validated llguidance grammar (plain, picklable: a server's ingress builds it, its decoder
    runs it) and what it was made from, for messages."""

    grammar: str
    description: str

    @classmethod
    def json_object(cls) -> "Grammar":
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls.json_schema({"type": "object"}, "a JSON object")

    @classmethod
    def json_schema(cls, schema: dict, description: str | None = None) -> "Grammar":
        """JSON that follows `schema` (OpenAI's ``{"type": "json_schema", ...}``)."""
        import llguidance

        if not isinstance(schema, dict):
            raise InvalidRequestError(f"a JSON schema must be an object, got {type(schema).__name__}",
                                      "response_format")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"the JSON schema cannot be used: {_first_line(exc)}", "response_format") from None
        return cls._validated(grammar, description or "JSON following the given schema")

    @classmethod
    def _validated(cls, grammar: str, description: str) -> "Grammar":
        import llguidance

        error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if error:
            raise InvalidRequestError(f"the JSON schema cannot be used: {_first_line(messages[0])}", "response_format")
        return cls(grammar, description)


def _first_line(exc) -> str:
    return " ".join(str(exc).split())[:300]


def _make_tokenizer_slot() -> dict:
    return {}


_TOKENIZERS: PerOwner[dict] = PerOwner(_make_tokenizer_slot)


def _tokenizer(target):
    """llguidance's view of `target`'s tokenizer (built once per target: ~0.3 s, under a lock)."""
    slot = _TOKENIZERS.get(target, "llguidance")
    if "tokenizer" not in slot:
        import copy

        import llguidance

        # A fast (Rust) tokenizer's own JSON, as llguidance.hf.from_tokenizer reads it (read here
        # through any wrapper: a server's tokenizer takes a lock around each call).
        backend = getattr(target.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise InvalidRequestError("structured outputs need the model's fast (tokenizers) tokenizer",
                                      "response_format")
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        slot["tokenizer"] = llguidance.LLTokenizer(backend.to_str(), n_vocab=target.vocab_size,
                                                   eos_token=sorted(target.eos_token_ids) or None)
    return slot["tokenizer"]


class GrammarConstraint:
    """One request's matcher: the answer so far consumed; masks rows of logits."""

    def __init__(self, grammar: Grammar, target) -> None:
        import llguidance

        self.vocab = target.vocab_size
        self.matcher = llguidance.LLMatcher(_tokenizer(target), grammar.grammar)
        if self.matcher.is_error():
            raise InvalidRequestError(f"the grammar cannot be used: {_first_line(self.matcher.get_error())}",
                                      "response_format")
        self.words = (self.vocab + 31) // 32
        self._bits = np.zeros((1, self.words), dtype=np.int32)

    def forced(self, limit: int = 32) -> list[int]:
        """The tokens the grammar forces after the answer so far (each the only one it allows
        next), at most `limit`: a draft certain to be accepted."""
        return self.matcher.compute_ff_tokens()[:max(0, limit)]

    @property
    def complete(self) -> bool:
        """The grammar accepts nothing more than the answer so far (only EOS could follow)."""
        return self.matcher.is_stopped()

    def add(self, tokens) -> int:
        """The tokens that joined the answer (each one a masked row allowed), up to the one that
        completes the grammar; returns how many it took."""
        m = self.matcher
        for i, t in enumerate(tokens):
            if m.is_stopped():
                return i
            if not m.consume_token(int(t)):
                raise RuntimeError(f"the answer left its grammar: {m.get_error()}")
        return len(tokens)

    def _fill(self, row: int) -> None:
        v = self._bits[row]
        self.matcher.unsafe_compute_mask_ptr(v.ctypes.data, v.nbytes)

    def _allows(self, row: int, token: int) -> bool:
        return bool((int(self._bits[row, token >> 5]) >> (token & 31)) & 1)

    @torch.inference_mode()         # (a forward's logits are inference tensors: updated in place only there)
    def apply(self, logits: torch.Tensor, tree: TokenTree | None = None) -> torch.Tensor:
        """Mask `logits` [N, V] in place (float32; the rows of `tree`'s nodes in its order, None:
        one row after the answer so far) and return them."""
        n = logits.shape[0]
        if (tree is None and n != 1) or (tree is not None and len(tree) != n):
            raise ValueError(f"{n} rows of logits for a tree of {len(tree) if tree is not None else 1} nodes")
        if self._bits.shape[0] < n:
            self._bits = np.zeros((n, self.words), dtype=np.int32)
        reached = [0]
        self._fill(0)
        if n > 1:
            m = self.matcher
            # Depth first, iteratively: (node, its children's (token, index) pairs still to try).
            # A child whose token its parent's mask allows is consumed, its row filled, and
            # rolled back after its subtree.
            stack = [(0, iter(tree.children(0).items()))]
            while stack:
                node, todo = stack[-1]
                step = next(todo, None)
                if step is None:
                    stack.pop()
                    if node != 0:
                        m.rollback(1)
                elif self._allows(node, step[0]) and m.consume_token(step[0]):
                    self._fill(step[1])
                    reached.append(step[1])
                    stack.append((step[1], iter(tree.children(step[1]).items())))
        if not logits.is_contiguous():          # (the caller takes the returned tensor)
            logits = logits.contiguous()
        _mask_rows(logits.numpy(), reached, self._bits, self.vocab)
        return logits


def _mask_rows(a: np.ndarray, rows: list[int], bits: np.ndarray, vocab: int) -> None:
    """a[r, t] = -inf (`a`: logits [N, V]) for every row r of `rows` and token t whose bit is 0
    in bits[r] (one bit per token, 32 to an int32 word, least significant first), and for every
    t >= vocab. Word by word: a word of 32 allowed tokens is skipped, one of 32 forbidden ones set
    at once, and only the words of both kinds unpacked (a bool mask over the whole row cost 150 us for 7 rows, as
    much as the matcher's masks; most rows either allow nearly everything, inside a string, or
    nearly nothing, between values)."""
    idx = np.asarray(rows)
    b = bits[idx]                                       # [k, W]
    whole = vocab // 32
    a3 = a[:, : whole * 32].reshape(a.shape[0], whole, 32)
    head = b[:, :whole]
    closed = head == 0
    mostly = closed.sum(1) > whole // 2
    if mostly.any():        # rows that allow a few tokens: all of them -inf, then those few back
        m = np.flatnonzero(mostly)
        rr, ww = np.divmod(np.flatnonzero(~closed[m]), whole)      # (np.nonzero on 2-d: 5x slower)
        unpacked = np.unpackbits(head[m[rr], ww].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
        k, t = np.divmod(np.flatnonzero(unpacked), 32)
        r_keep, c_keep = idx[m[rr[k]]], ww[k] * 32 + t
        keep = a[r_keep, c_keep]
        a[idx[m], : whole * 32] = -np.inf
        a[r_keep, c_keep] = keep
    if not mostly.all():    # rows that forbid a few: those few -inf
        m = np.flatnonzero(~mostly)
        sub = head[m]
        rr, ww = np.divmod(np.flatnonzero(sub != -1), whole)
        unpacked = np.unpackbits(sub[rr, ww].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
        k, t = np.divmod(np.flatnonzero(unpacked == 0), 32)
        a3[idx[m[rr[k]]], ww[k], t] = -np.inf
    if whole * 32 < vocab:                              # the last, partial word
        tail = np.unpackbits(b[:, whole:whole + 1].view(np.uint8), axis=1, bitorder="little")[:, : vocab - whole * 32]
        k, t = np.nonzero(tail == 0)
        a[idx[k], whole * 32 + t] = -np.inf
    if a.shape[1] > vocab:                              # logits wider than the vocabulary: never allowed
        a[idx, vocab:] = -np.inf
