"""The HTTP API's request models (OpenAI-compatible, plus the ``speculative`` extension) and
their translation into a :class:`GenerationRequest` for the decoder.

Validation is strict: unknown fields, wrong types and out-of-range values are 400s that name
the parameter. OpenAI fields this server cannot honour (n > 1, logprobs, penalties, ...) are
accepted only with their neutral value, so a request is never silently served differently.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.config import ServingConfig
from serving.errors import APIError, from_sense_error, from_validation_error, invalid


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SoftGate(_Strict):
    theta: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=2, le=100)
    lam: float | None = Field(None, gt=0, le=1)
    window: int | None = Field(None, ge=1, le=64)


class Speculative(_Strict):
    """The extension object: ``extra_body={"speculative": {...}}`` with the openai client."""

    method: Literal["ar", "pld", "rest", "dense", "dresd", "sense"] | None = None
    verification: Literal["strict", "soft"] | None = None
    soft: SoftGate | None = None
    budget: int | Literal["adaptive"] | None = None
    return_token_ids: bool = False


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)                  # extension (vLLM's name)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False                               # extension
    speculative: Speculative | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None


@dataclass
class GenerationRequest:
    """What the ingress sends the decoder: validated, plain, picklable."""

    request_id: str
    kind: str                                  # "completion" | "chat"
    params: Any                                # decoding.config.SamplingParams
    method: str
    verification: str                          # "strict" | "soft"
    soft: Any = None                           # decoding.soft.SoftGateConfig | None
    budget: int | str = "adaptive"
    prompt: str | None = None                  # completion text (raw, no chat template)
    prompt_ids: list[int] | None = None        # completion given as token ids
    messages: list[dict] | None = None         # chat turns
    stream: bool = False
    return_token_ids: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def parse(model_cls: type[_Common], raw: bytes) -> _Common:
    """Validate a JSON body; malformed JSON and every schema violation become a 400 APIError."""
    if not raw:
        raise APIError(400, "The request body is empty: send a JSON object", "invalid_request_error", None,
                       "invalid_json")
    try:
        return model_cls.model_validate_json(raw)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _unsupported(req, name: str, neutral, message: str) -> None:
    value = getattr(req, name, None)
    if value is not None and value != neutral:
        raise invalid(f"{name}={value!r} is not supported: {message}", name, "unsupported_value")


def _check_common(req: _Common) -> None:
    _unsupported(req, "n", 1, "one choice per request")
    _unsupported(req, "presence_penalty", 0, "no penalties")
    _unsupported(req, "frequency_penalty", 0, "no penalties")
    if req.logit_bias:
        raise invalid("logit_bias is not supported", "logit_bias", "unsupported_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise invalid("stop accepts at most 4 sequences", "stop")
    if any(not s for s in stop):
        raise invalid("stop sequences must be non-empty strings", "stop")


def check_model(req: _Common, config: ServingConfig) -> None:
    if req.model is not None and req.model != config.model.name:
        raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{config.model.name}`",
                       "invalid_request_error", "model", "model_not_found")


def _speculative(req: _Common, config: ServingConfig) -> dict:
    """Method, verification, soft gate and budget: the request's, else the server's defaults."""
    from decoding.soft import SoftGateConfig

    spec = req.speculative or Speculative()
    d = config.speculative
    verification = spec.verification or d.verification
    soft = None
    if verification == "soft":
        given = spec.soft.model_dump(exclude_none=True) if spec.soft else {}
        try:
            soft = SoftGateConfig(**{**d.soft.model_dump(), **given})
        except Exception as exc:            # InvalidRequestError: a 400 naming the gate
            raise from_sense_error(exc, "speculative.soft") from None
    elif spec.soft is not None:
        raise invalid("speculative.soft is only used with verification 'soft'", "speculative.soft")
    budget = spec.budget if spec.budget is not None else d.budget
    if isinstance(budget, int) and not 1 <= budget <= d.max_budget:
        raise invalid(f"speculative.budget must be in 1..{d.max_budget} or 'adaptive', got {budget}",
                      "speculative.budget")
    return {"method": spec.method or d.method, "verification": verification, "soft": soft, "budget": budget,
            "return_token_ids": spec.return_token_ids}


def _sampling(req: _Common, max_tokens: int | None, config: ServingConfig):
    from decoding.config import SamplingParams

    s = config.sampling
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    try:
        return SamplingParams(max_new_tokens=max_tokens if max_tokens is not None else 1 << 30,
                              temperature=req.temperature if req.temperature is not None else s.temperature,
                              top_p=req.top_p if req.top_p is not None else s.top_p,
                              top_k=req.top_k or 0, seed=req.seed, stop=stop, ignore_eos=req.ignore_eos)
    except Exception as exc:
        raise from_sense_error(exc) from None


def completion_request(req: CompletionRequest, config: ServingConfig) -> GenerationRequest:
    check_model(req, config)
    _check_common(req)
    _unsupported(req, "echo", False, "the prompt is not echoed")
    _unsupported(req, "best_of", 1, "one candidate per request")
    _unsupported(req, "suffix", None, "no insertion")
    if req.logprobs is not None:
        raise invalid("logprobs are not supported", "logprobs", "unsupported_value")
    prompt, prompt_ids = req.prompt, None
    if isinstance(prompt, list):
        if prompt and all(isinstance(p, int) for p in prompt):
            prompt, prompt_ids = None, list(prompt)
        elif len(prompt) == 1:
            one = prompt[0]
            prompt, prompt_ids = (one, None) if isinstance(one, str) else (None, list(one))
        else:
            raise invalid("send one prompt per request (a string, a list of one string, or token ids)", "prompt")
    if prompt_ids is not None and not prompt_ids:
        raise invalid("the prompt is empty", "prompt")
    max_tokens = req.max_tokens or config.sampling.completion_max_tokens
    return GenerationRequest(request_id=f"cmpl-{uuid.uuid4().hex}", kind="completion",
                             params=_sampling(req, max_tokens, config), prompt=prompt, prompt_ids=prompt_ids,
                             stream=bool(req.stream), **_speculative(req, config))


def _message_text(m: ChatMessage) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    return "".join(p.text for p in m.content)


def chat_request(req: ChatRequest, config: ServingConfig) -> GenerationRequest:
    check_model(req, config)
    _check_common(req)
    if req.logprobs or req.top_logprobs is not None:
        raise invalid("logprobs are not supported", "logprobs", "unsupported_value")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise invalid("max_tokens and max_completion_tokens disagree: give one", "max_completion_tokens")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)}
                for m in req.messages]
    if not any(m["content"].strip() for m in messages):
        raise invalid("the messages are empty: give some text", "messages")
    max_tokens = req.max_completion_tokens or req.max_tokens or config.sampling.chat_max_tokens
    return GenerationRequest(request_id=f"chatcmpl-{uuid.uuid4().hex}", kind="chat",
                             params=_sampling(req, max_tokens, config), messages=messages,
                             stream=bool(req.stream), **_speculative(req, config))


def include_usage(req: _Common) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)
