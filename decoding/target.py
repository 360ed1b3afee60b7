"""The target model wrapper: one API for every drafter and verifier.

- ``prefill``: run a prompt, return logits and the hidden state of a chosen layer per position;
  the positions it shares with a prompt prefilled before come from the prefix cache
  (:mod:`decoding.prefix_cache`), bitwise what running them would give.
- ``verify``: run a token tree against the KV cache in one forward pass (tree attention mask,
  position id = committed length + depth), returning logits and hidden states per node.
- ``commit``: keep the accepted root-to-node path of the last tree by compacting the KV cache
  (index select); nothing is recomputed.

Weights are shared and read-only; all per-request state lives in a :class:`KVState`, so one
model can serve several requests at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from decoding import invariant, lean_forward
from decoding.cpu_kernels import SmallBatchHead, install_small_batch_linear, wants_cpu_kernels
from decoding.dtype_choice import DtypeChoice, check_dtype, choose_dtype, explicit, model_key
from decoding.errors import ContextLengthError, InvalidRequestError
from decoding.prefix_cache import PrefixCache
from decoding.tree import TokenTree

PREFIX_CACHE_MB = 256       # default budget of the prefix cache (SmolLM2-135M, bfloat16: 23 KB a token)


@dataclass
class ForwardOutput:
    """logits: [T, V] float32; hidden: [T, H] hidden state of the configured layer."""

    logits: torch.Tensor
    hidden: torch.Tensor


@dataclass
class KVState:
    """Per-request KV cache. ``n_committed`` positions are final; ``n_tentative`` follow them;
    the prefill took its first ``reused`` positions from the prefix cache."""

    cache: object
    n_committed: int = 0
    n_tentative: int = 0
    reused: int = 0
    last_tree: TokenTree | None = field(default=None, repr=False)


class TargetModel:
    """Wraps a Hugging Face causal LM (Llama, Qwen2, Gemma families)."""

    def __init__(self, model, tokenizer, *, hidden_layer: int = -1, cpu_kernels: bool | None = None,
                 invariant_forward: bool | None = None, prefix_cache_mb: int = PREFIX_CACHE_MB) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        n_layers = self.config.num_hidden_layers
        if not -1 <= hidden_layer <= n_layers:
            raise InvalidRequestError(f"hidden_layer must be -1 (last, after the final norm) or in 0..{n_layers}")
        self.hidden_layer = hidden_layer
        self._base = model.base_model
        self._head = model.get_output_embeddings()
        # Batch-invariant forward (decoding/invariant/) wherever it can run: what makes strict
        # decoding bitwise equal to autoregressive decoding in every dtype and tree size.
        why_not = invariant.supports(model)
        if invariant_forward and why_not:
            raise InvalidRequestError(f"invariant forward unavailable: {why_not}")
        self.invariant = why_not is None if invariant_forward is None else bool(invariant_forward)
        self.invariant_note = "on" if self.invariant else (why_not or "off (asked for)")
        if self.invariant:
            invariant.install(model)        # the LM head is one of the linears it routes
            cpu_kernels = False
        if cpu_kernels is None:
            cpu_kernels = wants_cpu_kernels(model)
        if cpu_kernels:
            # Cheap verification of small trees on CPU (see decoding/cpu_kernels.py).
            install_small_batch_linear(self._base)
            self._head = SmallBatchHead(self._head.weight)
        self.cpu_kernels = cpu_kernels
        # Llama-family models skip transformers' per-call machinery (decoding/lean_forward.py).
        why_not_lean = lean_forward.unsupported(model) if self.invariant else "needs the invariant kernels"
        self.lean = lean_forward.LeanLlama(model) if why_not_lean is None else None
        self.lean_note = "on" if self.lean else why_not_lean
        # Reused prompt prefixes: exact on the lean forward only, whose prefill is cut-invariant.
        if prefix_cache_mb < 0:
            raise InvalidRequestError("prefix_cache_mb must be 0 (off) or more")
        self.prefix_cache = PrefixCache(prefix_cache_mb << 20) if self.lean and prefix_cache_mb else None
        self.prefix_cache_note = (f"on ({prefix_cache_mb} MB)" if self.prefix_cache else
                                  "off (asked for)" if self.lean else "off (needs the lean forward)")
        # What the forward runs on; measured costs (decoding.measured) are remembered per kernels.
        self.kernels = invariant.kernel_id() if self.invariant else ("small_batch" if cpu_kernels else "torch")
        if self.lean:
            self.kernels = "lean-" + self.kernels
        self._softcap = getattr(self.config, "final_logit_softcapping", None)
        self._window, self._layer_types = _sliding_layers(self.config) if not self.lean else (None, None)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(self.config.vocab_size)
        self.context_window = int(getattr(self.config, "max_position_embeddings", 0) or 2048)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.model_key = model_key(model)
        self.dtype_choice: DtypeChoice = explicit(str(self.dtype).removeprefix("torch."), self.device.type)
        self.takes_trees = self.lean is not None or self._takes_tree_masks()

    def _takes_tree_masks(self) -> bool:
        """Whether the model's forward honours a token tree's attention mask: a sibling verified
        in a tree must get the logits of its own chain. A model whose attention builds its own
        mask from a 2-D one (BLOOM's ALiBi) refuses the tree's; the engine then verifies each
        step's best path only (``TokenTree.main_chain``)."""
        with torch.inference_mode():
            try:
                state, _ = self.prefill([1, 2], reuse=False)
                star = self.verify(state, TokenTree((3, 4, 5), (-1, 0, 0)))
                state, _ = self.prefill([1, 2], reuse=False)
                chain = self.verify(state, TokenTree.chain(3, [5]))
            except (RuntimeError, ValueError, TypeError, IndexError):
                return False
        scale = float(chain.logits[1].abs().max()) + 1e-6
        return float((star.logits[2] - chain.logits[1]).abs().max()) <= 1e-2 * scale

    @classmethod
    def load(cls, model: str | None = None, *, dtype: str = "auto", device: str = "cpu",
             hidden_layer: int = -1, cpu_kernels: bool | None = None,
             invariant_forward: bool | None = None, prefix_cache_mb: int = PREFIX_CACHE_MB) -> "TargetModel":
        """Load a model; ``dtype="auto"`` runs it in the dtype measured fastest on this machine
        (:mod:`decoding.dtype_choice`); the choice and why are in ``target.dtype_choice``.
        `prefix_cache_mb`: the prefix cache's budget (0: none)."""
        from decoding.model_loader import check_device, load_model_and_tokenizer

        dtype = check_dtype(dtype)
        check_device(device)
        if dtype != "auto":
            hf_model, tokenizer = load_model_and_tokenizer(model, dtype=dtype, device=device)
            return cls(hf_model, tokenizer, hidden_layer=hidden_layer, cpu_kernels=cpu_kernels,
                       invariant_forward=invariant_forward, prefix_cache_mb=prefix_cache_mb)
        first = "float32" if torch.device(device).type == "cpu" else "bfloat16"
        hf_model, tokenizer = load_model_and_tokenizer(model, dtype=first, device=device)
        kernels = "torch" if invariant_forward is False or invariant.turned_off() else invariant.kernel_id()
        hf_model, choice = choose_dtype(hf_model, device, lambda m: cls(
            m, tokenizer, cpu_kernels=cpu_kernels, invariant_forward=invariant_forward, prefix_cache_mb=0),
            kernels=kernels)
        target = cls(hf_model, tokenizer, hidden_layer=hidden_layer, cpu_kernels=cpu_kernels,
                     invariant_forward=invariant_forward, prefix_cache_mb=prefix_cache_mb)
        target.dtype_choice = choice
        return target

    # -- forward passes -----------------------------------------------------------------------

    def new_cache(self):
        """An empty KV cache for one request."""
        if self.lean:
            return self.lean.new_cache()
        from transformers import DynamicCache

        # Sliding-window layers (Gemma 2/3, Mistral v0.1) keep every position, not their window:
        # transformers' sliding layer drops a position once the window has passed it and then
        # cannot crop the rejected drafts; the masks apply the window instead (_tree_mask).
        return DynamicCache() if self._window else DynamicCache(config=self.config)

    def _forward(self, state: KVState, input_ids: list[int], positions: torch.Tensor,
                 tree: TokenTree | None, logits_for: slice | None) -> ForwardOutput:
        """Forward `input_ids` at `positions` after the cache; a tree's nodes see their ancestors,
        a chain (tree None or a chain) is causal."""
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        chain = tree is None or tree.is_chain()
        if self.lean:
            ancestors = None if chain else torch.from_numpy(tree.ancestor_mask())
            item = (state.cache, ids, positions, ancestors)
            # The large-row prefill kernels round unlike the invariant ones: not with a prefix cache,
            # whose reused prefixes must be what any prefill computes (asked before the forward
            # fills the cache).
            large = self.prefix_cache is None and self.lean.is_large_prefill([item])
            last, hidden = self.lean.forward_batch([item], self.hidden_layer, large=large)[0]
            h = last if logits_for is None else last[logits_for]
            logits = self.lean.logits(h, large)
            if logits_for is None and large and len(h) > 1:
                # The last row as a plain prefill computes it (the large-row head over one row): a
                # prompt's next token does not depend on whether its other rows were scored.
                logits[-1:] = self.lean.logits(h[-1:], large)
            return ForwardOutput(logits=logits, hidden=hidden)
        # A chain needs no custom mask: the causal mask over consecutive positions is the tree mask.
        mask = None if chain else self._tree_mask(tree, state.n_committed)
        want_layers = self.hidden_layer != -1
        out = self._base(input_ids=ids[None], position_ids=positions[None], attention_mask=mask,
                         past_key_values=state.cache, use_cache=True, output_hidden_states=want_layers)
        last = out.last_hidden_state[0]
        hidden = out.hidden_states[self.hidden_layer][0] if want_layers else last
        h = last if logits_for is None else last[logits_for]
        logits = self._head(h).float()
        if logits_for is None and tree is None and len(h) > 1:     # a prefill's, as the lean path's
            logits[-1:] = self._head(h[-1:]).float()
        if self._softcap:
            invariant.soft_cap_rows(logits, float(self._softcap))
        return ForwardOutput(logits=logits, hidden=hidden)

    def _tree_mask(self, tree: TokenTree, n_past: int):
        """A tree's additive attention mask after `n_past` committed positions; for a model with
        sliding-window layers, their mask keeps only the keys within the window of each node's
        position (n_past + depth), as transformers' masks do for a chain (kv > q - window): one
        mask for a model whose every layer slides, one per layer type for a mix (Gemma 2's)."""
        bias = tree.attention_bias(n_past, self.dtype, self.device)
        if not self._window:
            return bias
        depths = np.asarray(tree.depths)
        q_pos = n_past + depths
        k_pos = np.concatenate([np.arange(n_past), n_past + depths])
        outside = torch.from_numpy(k_pos[None, :] <= q_pos[:, None] - self._window).to(self.device)
        windowed = bias.masked_fill(outside[None, None], torch.finfo(self.dtype).min)
        if self._layer_types is None:
            return windowed
        return {kind: windowed if kind == "sliding_attention" else bias for kind in set(self._layer_types)}

    @torch.inference_mode()
    def prefill(self, input_ids: Sequence[int], *, all_logits: bool = False,
                reuse: bool = True) -> tuple[KVState, ForwardOutput]:
        """Run a prompt from an empty cache.

        Returns the new state and logits ([P, V] if all_logits else [1, V] for the last position)
        with hidden states for every position ([P, H]). With a prefix cache (and `reuse`, and not
        `all_logits`), the longest prefix the prompt shares with one prefilled before is copied,
        not run (``state.reused`` positions), and the prompt is kept for the prompts after it;
        `reuse=False` for text that is no prompt (a document, a timing's filler)."""
        pieces = self.prefill_pieces(input_ids, all_logits=all_logits, reuse=reuse)
        next(pieces)
        try:
            pieces.send(None)
        except StopIteration as done:
            return done.value
        raise RuntimeError("a prefill of the whole prompt left positions to run")     # never

    @torch.inference_mode()
    def prefill_pieces(self, input_ids: Sequence[int], *, all_logits: bool = False, reuse: bool = True,
                       each=None):
        """:meth:`prefill` a piece at a time, for a scheduler that prefills a long prompt over
        several steps so that the requests running beside it are not stalled for all of it. A
        generator: ``next()`` takes what the prefix cache holds and yields how many of the
        prompt's positions are in (none run yet); then each ``send(rows)`` runs at most `rows`
        more positions (None: all the rest) and yields the count again, until the last piece,
        which returns ``(state, output)`` as ``prefill`` does, bitwise. Pieces need the invariant
        prefill, that is a prefix cache: without one (the large-row path rounds by its row count)
        the first ``send`` runs the whole prompt. `each(start, logits)`, with `all_logits`: each
        piece's logits [n, V] (positions start .. start + n - 1) go to it instead of being kept,
        and the output's logits are the last position's [1, V] (a long prompt's log-probabilities
        without its whole [P, V] at once)."""
        ids = self.check_prompt(input_ids)
        state = KVState(cache=self.new_cache())
        kept, at = None, 0
        cache = self.prefix_cache if reuse and not all_logits else None
        if cache is not None:
            arr = np.asarray(ids, dtype=np.int64)
            kept, at = cache.longest(arr)
        if kept is not None:
            state.cache.reserve(len(ids))
            state.cache.buf[..., :at, :] = kept.kv[..., :at, :]
            state.cache.length = at
        start = at
        hidden, logits = [kept.hidden[:at]] if kept is not None else [], []
        rows = yield at
        while True:
            if rows is not None and rows < 1:
                raise ValueError("a prefill piece needs at least one row")
            end = len(ids) if rows is None or self.prefix_cache is None else min(at + rows, len(ids))
            last = end == len(ids)
            out = self._forward(state, ids[at:end], torch.arange(at, end, device=self.device), None,
                                None if all_logits else slice(-1, None) if last else slice(0, 0))
            hidden.append(out.hidden)
            if each is not None and all_logits:
                each(at, out.logits)
                if last:
                    logits.append(out.logits[-1:])
            else:
                logits.append(out.logits)
            at = end
            if last:
                break
            rows = yield at
        out = ForwardOutput(logits=torch.cat(logits) if len(logits) > 1 else logits[0],
                            hidden=torch.cat(hidden) if len(hidden) > 1 else hidden[0])
        state.n_committed, state.reused = len(ids), start
        if cache is not None:
            cache.add(arr, state.cache.buf[..., :len(ids), :].clone(), out.hidden.clone())
        return state, out

    def keep(self, tokens: Sequence[int], state: KVState, hidden: Sequence[torch.Tensor]) -> None:
        """Keep a decoded sequence in the prefix cache: its committed positions (`tokens`, the
        prompt and the tokens committed after it) with their keys and values from `state` and
        their hidden states (`hidden`, pieces in order), for a later prompt that starts with it (a
        conversation's next turn). The invariant kernels make a verified position's keys, values
        and hidden state those its prefill computes, bitwise (tests/test_prefix_cache.py)."""
        n = state.n_committed
        if self.prefix_cache is None or len(tokens) != n or sum(h.shape[0] for h in hidden) != n:
            return
        if self.prefix_cache.touch(np.asarray(tokens, dtype=np.int64).tolist()):
            return                      # kept already: no copy of its keys and values
        self.prefix_cache.add(np.asarray(tokens, dtype=np.int64), state.cache.buf[..., :n, :].clone(),
                              torch.cat(list(hidden)))

    def prefill_rows(self, input_ids: Sequence[int]) -> int:
        """How many of the prompt's positions :meth:`prefill` would run now (the others come
        from the prefix cache)."""
        if self.prefix_cache is None or not len(input_ids):
            return len(input_ids)
        return len(input_ids) - self.prefix_cache.longest(np.asarray(input_ids, dtype=np.int64), use=False)[1]

    @torch.inference_mode()
    def verify(self, state: KVState, tree: TokenTree) -> ForwardOutput:
        """Forward every node of `tree` in one pass; returns per-node logits [T, V] and hidden [T, H].

        The tree's KV entries stay in the cache as tentative until :meth:`commit`.
        """
        self._check_room(state, tree)
        n = state.n_committed
        depths = torch.tensor(tree.depths, device=self.device)
        out = self._forward(state, list(tree.tokens), n + depths, tree, None)
        state.n_tentative = len(tree)
        state.last_tree = tree
        return out

    @torch.inference_mode()
    def verify_batch(self, states: Sequence[KVState], trees: Sequence[TokenTree]) -> list[ForwardOutput]:
        """:meth:`verify` of several requests' trees in one forward (continuous batching). Each
        request's logits and hidden states are bitwise those of verifying it alone (the lean
        forward runs every row on the batch-invariant kernels); without the lean forward the
        trees are verified one after another."""
        if len(states) != len(trees):
            raise ValueError(f"{len(states)} states for {len(trees)} trees")
        if not self.lean or len(states) == 1:
            return [self.verify(s, t) for s, t in zip(states, trees)]
        items = []
        for state, tree in zip(states, trees):
            self._check_room(state, tree)
            positions = state.n_committed + torch.tensor(tree.depths, device=self.device)
            ancestors = None if tree.is_chain() else torch.from_numpy(tree.ancestor_mask())
            items.append((state.cache, torch.tensor(tree.tokens, dtype=torch.long, device=self.device), positions,
                          ancestors))
        results = self.lean.forward_batch(items, self.hidden_layer)
        last = torch.cat([r[0] for r in results])
        logits = self.lean.logits(last)
        outs, row = [], 0
        for state, tree, (_, hidden) in zip(states, trees, results):
            outs.append(ForwardOutput(logits=logits[row:row + len(tree)], hidden=hidden))
            row += len(tree)
            state.n_tentative = len(tree)
            state.last_tree = tree
        return outs

    def _check_room(self, state: KVState, tree: TokenTree) -> None:
        if state.n_tentative:
            raise RuntimeError("verify called twice without commit")
        n = state.n_committed
        if n + len(tree) > self.context_window:
            raise ContextLengthError(
                f"the sequence would grow to {n + len(tree)} tokens, past the model's context window of "
                f"{self.context_window}")

    def synchronize(self) -> None:
        """Wait for the device's queued work (a CUDA forward returns before it has run), so that a
        forward's time can be read; nothing to wait for on a CPU."""
        if self.device.type == "cuda":          # a torch.device (set at load): no parsing a step
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def commit(self, state: KVState, path: Sequence[int]) -> None:
        """Keep the KV entries of `path` (root-to-node indices into the last tree), drop the rest."""
        tree = state.last_tree
        if tree is None or not state.n_tentative:
            raise RuntimeError("commit without a verified tree")
        path = list(path)
        if not path or path[0] != 0 or any(tree.parents[b] != a for a, b in zip(path, path[1:])):
            raise ValueError(f"{path} is not a root-to-node path of the last tree")
        n, k = state.n_committed, len(path)
        if path != list(range(k)):
            index = torch.tensor([n + i for i in path], device=self.device)
            if self.lean:
                state.cache.gather(n, index)
            for layer in () if self.lean else _cache_layers(state.cache):
                # Gather first (a copy), then write into the front of the tentative region.
                layer.keys[..., n:n + k, :] = layer.keys.index_select(-2, index)
                layer.values[..., n:n + k, :] = layer.values.index_select(-2, index)
        drop = state.n_tentative - k
        if drop:
            state.cache.crop(-drop)
        state.n_committed = n + k
        state.n_tentative = 0
        state.last_tree = None

    # -- input checks -------------------------------------------------------------------------

    def check_prompt(self, input_ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in input_ids]
        if not ids:
            raise InvalidRequestError("the prompt is empty: give at least one token of text")
        if len(ids) >= self.context_window:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens but the model's context window is {self.context_window} "
                f"tokens (room is needed for at least one new token)")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")
        return ids


def _sliding_layers(config) -> tuple[int | None, list | None]:
    """(the attention window, the layer types where only some layers have it) of a model with
    windowed layers (``lean_forward.attention_windows``), else (None, None)."""
    found = lean_forward.attention_windows(config)
    if found is None:
        return None, None
    window, windowed = found
    return window, None if all(windowed) else list(config.layer_types)


def _cache_layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"unsupported KV cache type {type(cache).__name__}")
    return layers


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else value)
    return frozenset(int(i) for i in ids)
