"""The decode loop: draft a tree, verify it in one forward, commit the accepted path, repeat."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from decoding.budget import AdaptiveBudget, cost_curve
from decoding.config import SamplingParams
from decoding.drafters.base import Drafter, NoDrafter
from decoding.errors import InvalidRequestError
from decoding.metrics import GenerationStats
from decoding.target import TargetModel
from decoding.tree import TokenTree
from decoding.verifiers import Verifier, make_verifier


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    stats: GenerationStats = field(default_factory=GenerationStats)

    @property
    def finish_reason(self) -> str:
        return self.stats.finish_reason


def check_prompt_text(prompt) -> None:
    """A prompt must be some text (checked before anything slow happens)."""
    from decoding.errors import InvalidRequestError

    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequestError("the prompt is empty: give some text")


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
             should_stop: Callable[[], bool] | None = None) -> GenerationResult:
    """Speculative decoding of one request.

    Each step: the drafter proposes a tree rooted at the pending token (at most `budget` draft
    nodes), the target verifies all nodes in one forward, the verifier picks the accepted path
    and the next pending token, and the KV cache keeps just that path. `budget` is a node count,
    an :class:`AdaptiveBudget`, or ``"adaptive"`` (the default): a fresh adaptive budget over
    this machine's measured cost curve (``decoding.budget.cost_curve``), which drafts nothing
    when drafts do not pay. `soft` (a
    ``decoding.soft.SoftGateConfig``) opts into lossy soft-gated verification.

    Optional hooks (for streaming servers; neither changes the tokens produced):
    `on_tokens(new_ids)` is called with the tokens committed by the prefill and by each step,
    after stop conditions are applied, so the calls concatenate to the final ``token_ids``.
    `should_stop()` is asked before the prefill and before each step; when it returns true the
    generation ends early with ``finish_reason == "cancelled"`` and the tokens so far.
    """
    params = params or SamplingParams()
    drafter = drafter or NoDrafter()
    verifier = verifier or make_verifier(params, soft, transform=getattr(drafter, "transform", None))
    verifier_hidden = getattr(verifier, "uses_hidden", False)
    stats = GenerationStats(method=drafter.name, dtype=str(target.dtype).removeprefix("torch."))
    if budget == "adaptive":
        budget = AdaptiveBudget(cost_curve(target)) if not isinstance(drafter, NoDrafter) else 0
    elif not isinstance(budget, AdaptiveBudget) and (not isinstance(budget, int) or isinstance(budget, bool)
                                                     or budget < 0):
        raise InvalidRequestError(f"budget must be an integer >= 0 or 'adaptive', got {budget!r}")
    adaptive = budget if isinstance(budget, AdaptiveBudget) else None
    t_start = time.perf_counter()
    if should_stop is not None and should_stop():
        stats.prompt_tokens, stats.finish_reason = len(prompt_ids), "cancelled"
        return GenerationResult(token_ids=[], text="", stats=stats)

    state, out = target.prefill(prompt_ids)
    stats.prompt_tokens = len(prompt_ids)
    needs_hidden = drafter.needs_hidden
    drafter.begin(list(prompt_ids), out.hidden if needs_hidden else None)
    hidden = out.hidden[-1] if needs_hidden else None
    stopper = _Stopper(target, params, len(prompt_ids))
    tokens = np.empty(len(prompt_ids) + stopper.limit + 1, dtype=np.int64)
    tokens[: len(prompt_ids)] = prompt_ids
    generated = [verifier.first_token(out.logits[-1])]
    stats.time_prefill = time.perf_counter() - t_start

    generated, reason = stopper.cut(generated)
    if on_tokens is not None and generated:
        on_tokens(list(generated))
    while reason is None:
        if should_stop is not None and should_stop():
            reason = "cancelled"
            break
        n = len(prompt_ids) + len(generated)
        tokens[n - 1] = generated[-1]
        t0 = time.perf_counter()
        # Deeper drafts than the tokens still allowed would be wasted work, and the tree must
        # fit the context window beside the n - 1 committed tokens.
        max_depth = stopper.limit - len(generated) - 1
        step_budget = adaptive.choose() if adaptive else budget
        room = min(step_budget, target.context_window - n)
        tree = drafter.propose(tokens[:n], room, max_depth, hidden) if room > 0 else TokenTree.root_only(int(tokens[n - 1]))
        t1 = time.perf_counter()
        out = target.verify(state, tree)
        t2 = time.perf_counter()
        verdict = verifier.verify(tree, out.logits, out.hidden) if verifier_hidden else verifier.verify(tree, out.logits)
        target.commit(state, verdict.path)
        if needs_hidden:
            # Committed positions n-1 .. n-1+accepted: the pending root and the accepted drafts.
            path_hidden = out.hidden[verdict.path]
            drafter.observe(np.arange(n - 1, n - 1 + len(verdict.path)), path_hidden)
            hidden = path_hidden[-1]
        t3 = time.perf_counter()
        if adaptive:
            adaptive.update(tree, verdict.path, room, overhead_s=(t1 - t0) + (t3 - t2))
        stats.steps += 1
        stats.drafted += tree.n_draft
        stats.time_draft += t1 - t0
        stats.time_verify += t2 - t1
        stats.time_commit += t3 - t2
        new = [tree.tokens[i] for i in verdict.path[1:]] + [verdict.next_token]
        tokens[n: n + len(new) - 1] = new[:-1]
        before = len(generated)
        generated, reason = stopper.cut(generated + new, before)
        # Only tokens that reach the output count into MAT (accepted + steps): a stop (EOS, a
        # stop string) inside the accepted path drops the drafts after it and the step's own
        # token. A step counts one of the tokens it commits; accepted counts the others.
        stats.accepted += max(0, min(verdict.n_accepted, len(generated) - before - 1))
        if on_tokens is not None and len(generated) > before:
            on_tokens(generated[before:])

    gate_stats = getattr(verifier, "stats", None)
    if gate_stats is not None:
        stats.verifier = "soft"
        stats.soft_gates = gate_stats.to_dict()
    stats.new_tokens = len(generated)
    stats.finish_reason = reason
    stats.time_total = time.perf_counter() - t_start
    return GenerationResult(token_ids=generated, text=stopper.text(generated), stats=stats)
