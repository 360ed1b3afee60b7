"""The decode loop: draft a tree, verify it in one forward, commit the accepted path, repeat."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from decoding.budget import AdaptiveBudget, draft_sizes, shared_estimates
from decoding.config import SamplingParams, check_prompt_text
from decoding.cost import cost_curve
from decoding.drafters.base import Drafter, NoDrafter
from decoding.errors import InvalidRequestError
from decoding.logit_adjust import LogitAdjust
from decoding.metrics import GenerationStats
from decoding.structured import Grammar, GrammarConstraint
from decoding.target import TargetModel
from decoding.tree import TokenTree
from decoding.verifiers import Verifier, make_verifier


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the target (its distribution before temperature,
    top-p and top-k; after the request's penalties and logit bias, if any) and, best first, the
    `top` most likely tokens at that position."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprobs(logits, tokens: list[int], top: int) -> list[TokenLogprob]:
    """The log-probabilities of `tokens`, row i of `logits` [n, V] the distribution token i was
    drawn from, with each row's `top` best tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    best = lp.topk(top, dim=-1) if top else None
    return [TokenLogprob(t, c, list(zip(best.indices[i].tolist(), best.values[i].tolist())) if best is not None else [])
            for i, (t, c) in enumerate(zip(tokens, chosen))]


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: list[TokenLogprob] | None = None      # with ``logprobs``: one per token of token_ids
    # with ``prompt_logprobs``: one per prompt token after the first (the first has no context)
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def finish_reason(self) -> str:
        return self.stats.finish_reason


def encode_prompt(target: TargetModel, prompt: str, *, chat: bool = True) -> list[int]:
    """Token ids for a prompt; with `chat`, wrapped in the model's chat template as a user turn."""
    check_prompt_text(prompt)
    tok = target.tokenizer
    if chat and getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    return tok(prompt)["input_ids"]


class _Stopper:
    """Decides when to stop: EOS, stop strings, max_new_tokens, context window."""

    def __init__(self, target: TargetModel, params: SamplingParams, prompt_len: int) -> None:
        self.tokenizer = target.tokenizer
        self.eos = frozenset() if params.ignore_eos else target.eos_token_ids
        self.stop = params.stop
        self.limit = min(params.max_new_tokens, target.context_window - prompt_len)

    def cut(self, out: list[int], new_from: int = 0) -> tuple[list[int], str | None]:
        """Truncate `out` at the first stop condition; return it with the reason (None: go on).

        Tokens before `new_from` were checked at an earlier step: only the new ones are scanned for EOS.
        """
        for i in range(new_from, len(out)):
            if out[i] in self.eos:
                return out[: i + 1], "stop"
        if self.stop:
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if any(s in text for s in self.stop):
                # Shortest prefix of tokens whose text contains a stop string.
                for i in range(len(out)):
                    text = self.tokenizer.decode(out[: i + 1], skip_special_tokens=True)
                    if any(s in text for s in self.stop):
                        return out[: i + 1], "stop"
        if len(out) >= self.limit:
            return out[: self.limit], "length"
        return out, None

    def text(self, out: list[int]) -> str:
        if self.tokenizer is None:      # bare models (tests): token ids only
            return ""
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        for s in self.stop:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        return text


def generate(target: TargetModel, prompt_ids: list[int], *, params: SamplingParams | None = None,
             drafter: Drafter | None = None, verifier: Verifier | None = None,
             budget: int | AdaptiveBudget | str = "adaptive", soft=None,
             on_tokens: Callable[[list[int]], None] | None = None,
             should_stop: Callable[[], bool] | None = None, logprobs: int | None = None,
             prompt_logprobs: int | None = None, grammar: Grammar | None = None) -> GenerationResult:
    """Speculative decoding of one request.

    Each step: the drafter proposes a tree rooted at the pending token (at most `budget` draft
    nodes), the target verifies all nodes in one forward, the verifier picks the accepted path
    and the next pending token, and the KV cache keeps just that path. `budget` is a node count,
    an :class:`AdaptiveBudget`, or ``"adaptive"`` (the default): an adaptive budget over this
    machine's measured cost curve (``decoding.cost.cost_curve``) that starts from what earlier
    requests of the same drafter on this target learned (``decoding.budget.shared_estimates``)
    and drafts nothing when drafts do not pay. `soft` (a
    ``decoding.config.SoftGateConfig``) opts into lossy soft-gated verification.

    Optional hooks (for streaming servers; neither changes the tokens produced):
    `on_tokens(new_ids)` is called with the tokens committed by the prefill and by each step,
    after stop conditions are applied, so the calls concatenate to the final ``token_ids``.
    `should_stop()` is asked before the prefill and before each step; when it returns true the
    generation ends early with ``finish_reason == "cancelled"`` and the tokens so far.
    `logprobs` (k >= 0; None: off): each output token's log-probability under the target and
    its k most likely alternatives (``result.logprobs``), read off the forward that verified it;
    `prompt_logprobs` likewise for the prompt's tokens after the first (``result.prompt_logprobs``:
    the prompt's prefill keeps every position's logits, in pieces of ``PROMPT_PIECE`` positions,
    and skips the prefix cache). `grammar` (a ``decoding.structured.Grammar``: a JSON object, JSON
    following a schema) constrains the answer to what it accepts, and ends it once it is complete.

    This is the batch of one of :class:`decoding.scheduler.BatchScheduler`: the same
    :class:`Sequence` steps, with the verification forward of this request alone.
    """
    seq = Sequence(target, prompt_ids, params=params, drafter=drafter, verifier=verifier, budget=budget, soft=soft,
                   on_tokens=on_tokens, should_stop=should_stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                   grammar=grammar)
    return seq.run()


_SERIALS = itertools.count()
PROMPT_PIECE = 256      # prompt positions a prefill piece scores at most (prompt_logprobs: [256, V] at once)


class Sequence:
    """One request's speculative decoding as steps a loop drives: :meth:`start` (prefill and
    the first token), then per step :meth:`propose` (a draft tree within a budget), a
    verification forward of the tree (alone, or batched with other requests'), and
    :meth:`advance` (accept, commit, stop conditions, statistics, the `on_tokens` hook)."""

    def __init__(self, target: TargetModel, prompt_ids: list[int], *, params: SamplingParams | None = None,
                 drafter: Drafter | None = None, verifier: Verifier | None = None,
                 budget: int | AdaptiveBudget | str = "adaptive", soft=None,
                 on_tokens: Callable[[list[int]], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, logprobs: int | None = None,
                 prompt_logprobs: int | None = None, grammar: Grammar | None = None) -> None:
        self.serial = next(_SERIALS)    # unique in the process (an id() is reused once freed)
        self.target = target
        self.prompt_ids = list(prompt_ids)
        self.params = params or SamplingParams()
        # Penalties and a logit bias, then a grammar's token mask: every row of logits the
        # verifier and the log-probabilities read goes through them first (decoding.logit_adjust,
        # decoding.structured); None leaves them untouched.
        self.adjust = LogitAdjust(self.params, target.vocab_size) if self.params.adjusts_logits else None
        if grammar is not None and self.params.ignore_eos:
            raise InvalidRequestError("ignore_eos cannot be used with a grammar (the answer ends when the grammar "
                                      "is complete)", "ignore_eos")
        self.constraint = GrammarConstraint(grammar, target) if grammar is not None else None
        self.drafter = drafter or NoDrafter()
        self.verifier = verifier or make_verifier(self.params, soft, transform=getattr(self.drafter, "transform", None))
        self.verifier_hidden = getattr(self.verifier, "uses_hidden", False)
        if not self.verifier_hidden:
            self.drafter.anchors = False        # only a verifier reading hidden states weighs anchor keys
        self.stats = GenerationStats(method=self.drafter.name, dtype=str(target.dtype).removeprefix("torch."))
        if budget == "adaptive" and isinstance(self.drafter, NoDrafter):
            budget = 0                          # (no cost curve measured for it)
        elif budget == "adaptive":
            cost = cost_curve(target)
            budget = AdaptiveBudget(cost, sizes=draft_sizes(cost, soft), shared=shared_estimates(
                target, (self.drafter.name, type(self.verifier).__name__)))
        elif not isinstance(budget, AdaptiveBudget) and (not isinstance(budget, int) or isinstance(budget, bool)
                                                         or budget < 0):
            raise InvalidRequestError(f"budget must be an integer >= 0 or 'adaptive', got {budget!r}")
        if isinstance(self.drafter, NoDrafter):
            # Nothing to draft, so no budget to choose: a server hands every request an adaptive
            # budget, and a batch had allocated rows to `ar` requests on their estimates' prior.
            budget = 0
        self.budget = budget
        self.adaptive = budget if isinstance(budget, AdaptiveBudget) else None
        self.on_tokens, self.should_stop = on_tokens, should_stop
        for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
                raise InvalidRequestError(f"{name} must be an integer >= 0 (alternatives per token), got {k!r}")
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        self.prompt_token_logprobs: list[TokenLogprob] | None = [] if prompt_logprobs is not None else None
        # With `logprobs`: one TokenLogprob per token of `generated`, filled as they are committed
        # (an `on_tokens` hook finds its tokens' at the end of the list).
        self.token_logprobs: list[TokenLogprob] | None = [] if logprobs is not None else None
        self.t_start = time.perf_counter()
        self.state = None
        self._pieces = None             # the prefill under way (TargetModel.prefill_pieces)
        self._prefilled = 0
        self.generated: list[int] = []
        self.reason: str | None = None
        self.needs_hidden = self.drafter.needs_hidden
        self.keeps_hidden = self.needs_hidden and self.drafter.keeps_hidden
        self.hidden = None
        # With a prefix cache, the hidden states of every committed position, so that the whole
        # sequence is kept when the request ends (a conversation's next turn starts with it).
        self._kept_hidden: list | None = [] if getattr(target, "prefix_cache", None) is not None else None

    error: Exception | None = None         # set by fail(): what ended the request
    forced: bool = False                   # this step's draft is its grammar's forced tokens (propose)

    @property
    def done(self) -> bool:
        return self.reason is not None

    def fail(self, exc: Exception) -> None:
        """End the request because `exc` was raised doing its work (a batch goes on without it)."""
        self.error, self.reason = exc, "error"

    def cancelled(self) -> bool:
        """Ask `should_stop`; a true answer ends the request as "cancelled"."""
        if self.reason is None and self.should_stop is not None and self.should_stop():
            self.reason = "cancelled"
        return self.reason == "cancelled"

    @property
    def started(self) -> bool:
        """The prompt is prefilled and the first token taken."""
        return self.state is not None

    def start(self, rows: int | None = None) -> int:
        """Prefill the prompt, at most `rows` more of its positions in this call (None: all the
        rest; what the prefix cache holds is not run), and once all of them are in, take the
        first token (:attr:`started`). Returns the positions this call ran. A batch prefills a
        long prompt over several steps this way (``TargetModel.prefill_pieces``: the same
        results, bitwise)."""
        scoring = self.prompt_token_logprobs is not None
        if self._pieces is None:
            self._pieces = (self.target.prefill_pieces(self.prompt_ids, all_logits=True, each=self._prompt_piece)
                            if scoring else self.target.prefill_pieces(self.prompt_ids))
            self._prefilled = next(self._pieces)
        before = self._prefilled
        piece = rows
        if scoring:             # at most PROMPT_PIECE positions' logits at once
            piece = min(rows, PROMPT_PIECE) if rows is not None else PROMPT_PIECE
        try:
            while True:
                self._prefilled = self._pieces.send(piece)
                if not scoring or rows is not None:
                    return self._prefilled - before
        except StopIteration as done:
            self._pieces = None
            self.state, out = done.value
        self._first_token(out)
        return len(self.prompt_ids) - before

    def _prompt_piece(self, start: int, logits) -> None:
        """A prefill piece's logits (positions start ..): the log-probabilities of the prompt
        tokens they predict (position i predicts token i + 1)."""
        tokens = self.prompt_ids[start + 1: start + 1 + logits.shape[0]]
        if tokens:
            self.prompt_token_logprobs += token_logprobs(logits[: len(tokens)], tokens, self.prompt_logprobs)

    def _first_token(self, out) -> None:
        target, prompt_ids = self.target, self.prompt_ids
        self.stats.prompt_tokens = len(prompt_ids)
        self.stats.cached_tokens = self.state.reused
        self.drafter.begin(list(prompt_ids), out.hidden if self.needs_hidden else None)
        self.hidden = out.hidden[-1] if self.needs_hidden and not self.keeps_hidden else None
        if self._kept_hidden is not None:
            self._kept_hidden.append(out.hidden)
        self.stopper = _Stopper(target, self.params, len(prompt_ids))
        self.tokens = np.empty(len(prompt_ids) + self.stopper.limit + 1, dtype=np.int64)
        self.tokens[: len(prompt_ids)] = prompt_ids
        # (copies: a prefill's logits may be the prefix cache's)
        last = out.logits[-1:] if self.adjust is None else self.adjust.apply(out.logits[-1:])
        if self.constraint is not None:
            last = self.constraint.apply(last.float().clone() if self.adjust is None else last)
        generated = [self.verifier.first_token(last[0])]
        if self.adaptive:
            self.adaptive.start()
        self.stats.time_prefill = time.perf_counter() - self.t_start
        self.generated, self.reason = self.stopper.cut(generated)
        self._constrain(0)
        if self.adjust is not None:
            self.adjust.add(self.generated)
        if self.token_logprobs is not None and self.generated:
            self.token_logprobs += token_logprobs(last, self.generated, self.logprobs)
        if self.on_tokens is not None and self.generated:
            self.on_tokens(list(self.generated))

    def _constrain(self, before: int) -> None:
        """The grammar takes the answer's tokens from `before` on; the answer ends with the token
        that completes it (an EOS accepted after it in the same step is dropped: decoded one token
        a step, the answer would have ended before it)."""
        if self.constraint is not None and len(self.generated) > before:
            kept = self.constraint.add(self.generated[before:])
            if self.constraint.complete:
                self.generated, self.reason = self.generated[:before + kept], "stop"

    def step(self) -> list[int]:
        """One step alone: draft within this request's own budget, verify, advance."""
        tree = self.propose(self.choose_budget(), alone=True)
        return self.advance(tree, self.target.verify(self.state, tree), lone=True)

    def run(self, call=None) -> GenerationResult:
        """Decode to the end alone (``generate``); `call(fn)` runs each of its pieces (the
        prefill, each step), e.g. on a serving process's compute thread, between other
        requests' steps."""
        call = call or (lambda fn: fn())
        if not self.cancelled():
            call(self.start)
            while not self.done and not self.cancelled():
                call(self.step)
        return self.result()

    def choose_budget(self) -> int:
        """This step's draft budget on its own: the adaptive choice or the fixed budget."""
        return self.adaptive.choose() if self.adaptive else self.budget

    def room(self, budget: int) -> int:
        """`budget` capped by the context window beside the committed tokens."""
        n = len(self.prompt_ids) + len(self.generated)
        return min(budget, self.target.context_window - n)

    def propose(self, budget: int, alone: bool = False, wide: bool = False) -> TokenTree:
        """A draft tree of at most `budget` nodes rooted at the pending token. With an adaptive
        budget, a step that drafts can draft wider, for a cut to keep the part of the tree worth
        verifying given how likely each of its nodes is to land: `alone` (the request's forward
        verifies its tree alone) drafts the budget's ``AdaptiveBudget.widen`` and keeps what
        ``AdaptiveBudget.cut`` picks; `wide` drafts as wide and leaves the cut to the caller
        (:meth:`keep`: the batch's ``decoding.scheduler.cut_budgets``)."""
        n = len(self.prompt_ids) + len(self.generated)
        self.tokens[n - 1] = self.generated[-1]
        self._t0 = time.perf_counter()
        # Deeper drafts than the tokens still allowed would be wasted work, and the tree must
        # fit the context window beside the n - 1 committed tokens.
        max_depth = self.stopper.limit - len(self.generated) - 1
        self.forced = False
        if self.constraint is not None and not isinstance(self.drafter, NoDrafter):
            # Tokens the grammar forces (a schema's keys and separators) are the draft, whatever
            # the budget: each is the only token its row allows, so each is accepted (n draft rows
            # for n tokens, where a budget weighs rows against the tokens they may bring). Such a
            # step teaches the budget's estimates nothing about the drafter's own drafts. `ar`
            # (no drafter) stays plain decoding.
            forced = self.constraint.forced(min(32, max_depth, self.target.context_window - n))
            if forced:
                self.forced, self._room, self._drafted, self._wide_cut = True, len(forced), True, False
                tree = TokenTree.chain(int(self.tokens[n - 1]), forced)
                self._t1 = time.perf_counter()
                return tree
        widen = (alone or wide) and self.adaptive is not None and budget > 0
        self._room = room = self.room(self.adaptive.widen(budget) if widen else budget)
        self._drafted = room > 0
        # Drafted wide for the batch's cut: the step's realized outcome prices drafting at load
        # (AdaptiveBudget.learn_wide).
        self._wide_cut = widen and not alone and room > 0 and self.adaptive.nodes.ready
        tree = (self.drafter.propose(self.tokens[:n], room, max_depth, self.hidden) if room > 0
                else TokenTree.root_only(int(self.tokens[n - 1])))
        if alone and widen and room > 0:
            tree = self.keep(tree, self.adaptive.cut(tree, budget))
        elif not self.target.takes_trees:
            tree = tree.main_chain()
        self._t1 = time.perf_counter()
        return tree

    def keep(self, tree: TokenTree, budget: int) -> TokenTree:
        """The part of this step's drafted `tree` a budget of `budget` nodes keeps (the budget the
        step's statistics and estimates then count)."""
        self._room = budget
        tree = tree.cut(budget)
        # A model that takes no tree mask (TargetModel.takes_trees) verifies the best path.
        return tree if self.target.takes_trees else tree.main_chain()

    def advance(self, tree: TokenTree, out, lone: bool = False) -> list[int]:
        """Accept from the verified `tree` (its forward output `out`), commit, apply the stop
        conditions; returns the tokens this step added to the output. `lone`: the forward verified
        this tree alone, right after :meth:`propose` (its time then prices the budget)."""
        if lone and self.adaptive:
            self.target.synchronize()          # the forward's own time prices the budget
        t2 = time.perf_counter()
        n = len(self.prompt_ids) + len(self.generated)
        verifier, stats = self.verifier, self.stats
        # (in place: a verification's logits are this step's own)
        logits = out.logits if self.adjust is None else self.adjust.apply(out.logits, tree, in_place=True)
        if self.constraint is not None:
            logits = self.constraint.apply(logits if logits.dtype == torch.float32 else logits.float(), tree)
        verdict = verifier.verify(tree, logits, out.hidden) if self.verifier_hidden else verifier.verify(tree, logits)
        self.target.commit(self.state, verdict.path)
        if self.needs_hidden or self._kept_hidden is not None:
            # Committed positions n-1 .. n-1+accepted: the pending root and the accepted drafts.
            k = len(verdict.path)
            # A chain's prefix (every step of a batch that drafts nothing) is a view, not a gather.
            path_hidden = out.hidden[:k] if verdict.path[-1] == k - 1 else out.hidden[verdict.path]
            if self.needs_hidden:
                self.drafter.observe(np.arange(n - 1, n - 1 + k), path_hidden)
                # A copy, not a view: a view kept the whole forward's hidden-state buffer alive
                # until the next step, and at 16 in flight those buffers fragmented the heap
                # around the next forward's (in process, 16 in flight: 69 page faults a step -> 9,
                # the batch step 5.5% -> 4.4% slower than `ar`'s). None where the drafter keeps
                # the row it observed (the dynamic cache's float32 copy): no copy a step.
                if not self.keeps_hidden:
                    self.hidden = path_hidden[-1].clone()
            if self._kept_hidden is not None:
                self._kept_hidden.append(path_hidden.clone())     # not a view keeping the forward's rows
        t3 = time.perf_counter()
        if self.adaptive and not self.forced:
            # A step that drafted and then kept nothing verified alone: its drafting time is not
            # the price of a budget of 0 (a step that does not draft).
            overhead_s = None if self._drafted and not self._room else (self._t1 - self._t0) + (t3 - t2)
            self.adaptive.update(tree, verdict.path, self._room, overhead_s=overhead_s,
                                 forward_s=(t2 - self._t1) if lone else None)
            if self._wide_cut:
                self.adaptive.learn_wide(len(verdict.path) - 1, tree.n_draft, (self._t1 - self._t0) + (t3 - t2))
        stats.steps += 1
        stats.drafted += tree.n_draft
        stats.time_draft += self._t1 - self._t0
        stats.time_verify += t2 - self._t1
        stats.time_commit += t3 - t2
        new = [tree.tokens[i] for i in verdict.path[1:]] + [verdict.next_token]
        self.tokens[n: n + len(new) - 1] = new[:-1]
        before = len(self.generated)
        self.generated, self.reason = self.stopper.cut(self.generated + new, before)
        self._constrain(before)
        # Only tokens that reach the output count into MAT (accepted + steps): a stop (EOS, a
        # stop string, the grammar's end) inside the accepted path drops the drafts after it and
        # the step's own token. A step counts one of the tokens it commits; accepted the others.
        stats.accepted += max(0, min(verdict.n_accepted, len(self.generated) - before - 1))
        added = self.generated[before:]
        if self.adjust is not None:
            self.adjust.add(added)
        if self.token_logprobs is not None and added:
            # The token after path node j was drawn from node j's row (the last: the bonus token).
            self.token_logprobs += token_logprobs(logits[list(verdict.path[:len(added)])], added, self.logprobs)
        if self.done and self._kept_hidden is not None:
            self.target.keep(self.tokens[:self.state.n_committed], self.state, self._kept_hidden)
            self._kept_hidden = None
        if self.on_tokens is not None and added:
            self.on_tokens(list(added))
        return added

    def result(self) -> GenerationResult:
        """The outcome; raises what failed the request, if anything did."""
        if self.error is not None:
            raise self.error
        stats = self.stats
        if self.state is None:                  # cancelled before the prefill
            stats.prompt_tokens, stats.finish_reason = len(self.prompt_ids), "cancelled"
            return GenerationResult(token_ids=[], text="", stats=stats, logprobs=self.token_logprobs)
        gate_stats = getattr(self.verifier, "stats", None)
        if gate_stats is not None:
            stats.verifier = "soft"
            stats.soft_gates = gate_stats.to_dict()
        stats.new_tokens = len(self.generated)
        stats.finish_reason = self.reason
        stats.time_total = time.perf_counter() - self.t_start
        return GenerationResult(token_ids=self.generated, text=self.stopper.text(self.generated), stats=stats,
                                logprobs=self.token_logprobs, prompt_logprobs=self.prompt_token_logprobs)
