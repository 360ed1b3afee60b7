"""Typed, validated request options. One place for each: sampling and generation limits, the soft gates."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from decoding.errors import InvalidRequestError


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidRequestError(message)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_prompt_text(prompt) -> None:
    """A prompt must be some text (checked before anything slow happens)."""
    _check(isinstance(prompt, str) and bool(prompt.strip()), "the prompt is empty: give some text")


# Temperatures below this decode greedily: logits over 1e-5 stay finite in float32 (|logit| < 1e33),
# and at such a temperature a draw is the argmax but for logits within ~1e-4 of the top one.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token and when to stop.

    temperature == 0 means greedy decoding, and so does any temperature below ``GREEDY_BELOW``
    (the limit of sampling as the temperature falls; logits over a temperature near the smallest
    float overflowed to inf and the draw failed); top_k == 0 and top_p == 1.0 disable those filters.
    presence_penalty, frequency_penalty and logit_bias change the logits before any of that, as
    OpenAI defines them (``decoding.logit_adjust``): 0, 0 and none leave them as the model gives them.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # token id -> bias added to its logit, -100..100 (a dict is taken and kept as sorted pairs)
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
               f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(_is_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
               f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _check(_is_real(self.top_p) and math.isfinite(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        _check(self.seed is None or _is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        _check(all(isinstance(s, str) and s for s in stop), f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_real(value) and math.isfinite(value) and -2 <= value <= 2,
                   f"{name} must be a number in [-2, 2], got {value!r}")
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        try:
            bias = tuple(sorted((t, b) for t, b in bias))
        except (TypeError, ValueError):
            bias = None
        _check(bias is not None and all(_is_int(t) and t >= 0 and _is_real(b) and math.isfinite(b) and -100 <= b <= 100
                                        for t, b in bias),
               f"logit_bias must map token ids (integers >= 0) to numbers in [-100, 100], got {self.logit_bias!r}")
        _check(len({t for t, _ in bias}) == len(bias), "logit_bias names a token twice")
        object.__setattr__(self, "logit_bias", tuple((t, float(b)) for t, b in bias))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def adjusts_logits(self) -> bool:
        """Penalties or a logit bias change the model's logits (``decoding.logit_adjust``)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass(frozen=True)
class SoftGateConfig:
    """The soft gates' thresholds (lossy verification, opt-in: decoding/soft.py says what each does).
    Plain values, validated here: the HTTP ingress builds one per request without loading torch."""

    theta: float = 0.3       # entropy gate (nats, over the renormalised top-k)
    top_k: int = 3
    lam: float = 0.5         # ratio gate p(d) / p(argmax)
    window: int = 6          # deferred window W: d plus W - 1 natively agreed tokens
    tau: float | None = 0.8  # cosine stand-in for a window cut short by the tree (None: never)

    def __post_init__(self) -> None:
        def bad(msg):
            raise InvalidRequestError(msg)
        if not (isinstance(self.theta, (int, float)) and math.isfinite(self.theta) and self.theta >= 0):
            bad(f"soft gate theta must be a finite number >= 0, got {self.theta!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 2):
            bad(f"soft gate top_k must be an integer >= 2, got {self.top_k!r}")
        if not (isinstance(self.lam, (int, float)) and 0 < self.lam <= 1):
            bad(f"soft gate lam must be in (0, 1], got {self.lam!r}")
        if not (isinstance(self.window, int) and self.window >= 1):
            bad(f"soft gate window must be an integer >= 1, got {self.window!r}")
        if self.tau is not None and not (isinstance(self.tau, (int, float)) and math.isfinite(self.tau)
                                         and -1 <= self.tau <= 1):
            bad(f"soft gate tau must be a cosine in [-1, 1] or null, got {self.tau!r}")
