"""The HTTP API's request models (OpenAI-compatible, plus the ``speculative`` extension) and
their translation into a :class:`GenerationRequest` for the decoder.

Validation is strict: unknown fields, wrong types and out-of-range values are 400s that name
the parameter. OpenAI fields this server cannot honour (best_of > 1, suffix, ...) are
accepted only with their neutral value, so a request is never silently served differently.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from collections.abc import AsyncIterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from decoding.methods import METHOD_NAMES
from serving.config import ServingConfig
from serving.errors import APIError, from_sense_error, from_validation_error, invalid
from serving.tools import NamedToolChoice, Tool, ToolCall


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SoftGate(_Strict):
    theta: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=2, le=100)
    lam: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    window: int | None = Field(None, ge=1, le=64)
    tau: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False)   # cosine stand-in (1: practically off)


class Speculative(_Strict):
    """The extension object: ``extra_body={"speculative": {...}}`` with the openai client."""

    method: Literal[METHOD_NAMES] | None = None     # the names of decoding.methods.METHODS
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
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)                  # extension (vLLM's name)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 63)     # a 64-bit integer, as OpenAI's
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    user: str | None = None
    ignore_eos: bool = False                               # extension
    speculative: Speculative | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None        # an assistant's earlier calls
    tool_call_id: str | None = None                 # a tool's result: of which call


class Prediction(_Strict):
    """OpenAI's Predicted Outputs: text most of the answer is expected to be (drafted from)."""

    type: Literal["content"]
    content: str | list[TextPart]


class JsonSchemaFormat(_Strict):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's structured outputs: plain text, any JSON object, or JSON following a schema
    (decoding/structured.py)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    prediction: Prediction | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


@dataclass
class GenerationRequest:
    """What the ingress sends the decoder: validated, plain, picklable."""

    request_id: str
    kind: str                                  # "completion" | "chat"
    params: Any                                # decoding.config.SamplingParams
    method: str
    verification: str                          # "strict" | "soft"
    soft: Any = None                           # decoding.config.SoftGateConfig | None
    budget: int | str = "adaptive"
    prompt: str | None = None                  # completion text (raw, no chat template)
    prompt_ids: list[int] | None = None        # completion given as token ids
    messages: list[dict] | None = None         # chat turns
    stream: bool = False
    return_token_ids: bool = False
    prediction: str | None = None              # predicted output (chat): drafted from, never changes the answer
    grammar: Any = None                        # decoding.structured.Grammar (chat's response_format) | None
    tool_names: tuple[str, ...] | None = None  # chat with tools: an answer calling one becomes tool_calls
    logprobs: int | None = None                # each token's log-probability and this many alternatives
    echo: bool = False                         # completions: the prompt before the answer (and its logprobs)
    n: int = 1                                 # choices asked for (see choices())
    index: int = 0                             # which choice this request decodes
    created: int = field(default_factory=lambda: int(time.time()))


def choices(gen: GenerationRequest) -> list[GenerationRequest]:
    """The requests of `gen`'s n choices, one each (``index`` 0 .. n - 1), decoded side by side.
    A seeded request's choice i samples with seed + i (vLLM's rule): each choice reproduces, and
    they differ from each other; greedy choices are all the same answer."""
    if gen.n == 1:
        return [gen]
    out = []
    for i in range(gen.n):
        params = gen.params
        if params.seed is not None:
            params = dataclasses.replace(params, seed=(params.seed + i + (1 << 63)) % (1 << 64) - (1 << 63))
        out.append(dataclasses.replace(gen, index=i, params=params))
    return out


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({limit} bytes)",
                    "invalid_request_error", None, "request_too_large")


async def read_body(content_length: str | None, chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """A request body of at most `limit` bytes, else a 413 APIError: refused on its declared
    Content-Length before anything is read, and counted as it arrives (a chunked body has no
    length), so an oversized body is never held whole."""
    if content_length is not None:
        value = content_length.strip()
        if not (value.isascii() and value.isdigit()):
            raise APIError(400, "The Content-Length header is not a number", "invalid_request_error", None,
                           "invalid_request")
        if int(value) > limit:
            raise body_too_large(limit)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise body_too_large(limit)
    return bytes(body)


def parse(model_cls: type[_Common], raw: bytes) -> _Common:
    """Validate a JSON body; malformed JSON (invalid UTF-8, nesting deeper than the parser's
    limit, NaN where a number must be finite) and every schema violation become a 400 APIError."""
    if not raw:
        raise APIError(400, "The request body is empty: send a JSON object", "invalid_request_error", None,
                       "invalid_json")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"The request body is not valid UTF-8 (at byte {exc.start})", "invalid_request_error",
                       None, "invalid_json") from None
    try:
        return model_cls.model_validate_json(raw)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _unsupported(req, name: str, neutral, message: str) -> None:
    value = getattr(req, name, None)
    if value is not None and value != neutral:
        raise invalid(f"{name}={value!r} is not supported: {message}", name, "unsupported_value")


def _check_common(req: _Common, config: ServingConfig) -> None:
    if req.n is not None and req.n > config.sampling.max_n:
        raise invalid(f"n must be at most {config.sampling.max_n} on this server", "n")
    if req.logit_bias and len(req.logit_bias) > 300:
        raise invalid("logit_bias accepts at most 300 tokens", "logit_bias")
    for key in req.logit_bias or {}:
        if not (key.isascii() and key.isdigit()):
            raise invalid(f"logit_bias keys are token ids, got {key!r}", "logit_bias")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise invalid("stop accepts at most 4 sequences", "stop")
    if any(not s for s in stop):
        raise invalid("stop sequences must be non-empty strings", "stop")


def _check_max_tokens(req: _Common, config: ServingConfig) -> None:
    limit = config.sampling.max_tokens_limit
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name, None)
        if value is not None and value > limit:
            raise invalid(f"{name} must be at most {limit} on this server", name)


def unknown_model(name: str, config: ServingConfig) -> APIError:
    return APIError(404, f"The model `{name}` does not exist; this server serves `{config.model.name}`",
                    "invalid_request_error", "model", "model_not_found")


def check_model(req: _Common, config: ServingConfig) -> None:
    if req.model is not None and req.model != config.model.name:
        raise unknown_model(req.model, config)


def _speculative(req: _Common, config: ServingConfig) -> dict:
    """Method, verification, soft gate and budget: the request's, else the server's defaults."""
    from decoding.config import SoftGateConfig

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
                              top_k=req.top_k or 0, seed=req.seed, stop=stop, ignore_eos=req.ignore_eos,
                              presence_penalty=req.presence_penalty or 0.0,
                              frequency_penalty=req.frequency_penalty or 0.0,
                              logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()})
    except Exception as exc:
        raise from_sense_error(exc) from None


def completion_request(req: CompletionRequest, config: ServingConfig) -> GenerationRequest:
    check_model(req, config)
    _check_common(req, config)
    _check_max_tokens(req, config)
    _unsupported(req, "best_of", 1, "one candidate per request")
    _unsupported(req, "suffix", None, "no insertion")
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
                             stream=bool(req.stream), logprobs=req.logprobs, echo=bool(req.echo),
                             n=req.n or 1, **_speculative(req, config))


def _text(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def _tool_turns(req: ChatRequest):
    """The chat turns as plain messages (serving/tools.py), with the functions described in the
    system message when tools are on; the tools' names (None: off) and the grammar a required
    call takes (None: the answer is free)."""
    from serving import tools as t

    for i, m in enumerate(req.messages):
        if m.tool_calls and m.role != "assistant":
            raise invalid("only assistant messages carry tool_calls", f"messages.{i}.tool_calls")
        if m.tool_call_id is not None and m.role != "tool":
            raise invalid("only tool messages carry tool_call_id", f"messages.{i}.tool_call_id")
    messages = t.plain_messages(req.messages, _text)
    tools, choice = req.tools or [], req.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise invalid("tool_choice needs tools", "tool_choice")
    names = [x.function.name for x in tools]
    if len(set(names)) != len(names):
        raise invalid("tools name a function twice", "tools")
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if named is not None and named not in names:
        raise invalid(f"tool_choice names `{named}`, which is not among the tools", "tool_choice")
    mode = "none" if not tools or choice == "none" else ("named" if named is not None else choice or "auto")
    if mode == "none":
        return messages, None, None
    note = t.system_text(tools, mode, named)
    if messages[0]["role"] == "system":
        messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + note}
    else:
        messages.insert(0, {"role": "system", "content": note})
    grammar = None
    if mode != "auto":
        from decoding.structured import Grammar

        try:
            grammar = Grammar.json_schema(t.call_schema(tools, named), "a call of one of the tools")
        except Exception as exc:        # a function's parameters are no usable JSON schema
            raise invalid(str(exc), "tools") from None
    return messages, tuple(names), grammar


def _grammar(fmt: ResponseFormat | None):
    """The grammar of a chat request's response_format (None: plain text)."""
    if fmt is None or fmt.type == "text":
        if fmt is not None and fmt.json_schema is not None:
            raise invalid("response_format.json_schema is only used with type 'json_schema'", "response_format")
        return None
    from decoding.structured import Grammar

    try:
        if fmt.type == "json_object":
            return Grammar.json_object()
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise invalid("response_format of type 'json_schema' needs json_schema.schema", "response_format.json_schema")
        return Grammar.json_schema(fmt.json_schema.schema_, f"JSON following the schema {fmt.json_schema.name!r}")
    except APIError:
        raise
    except Exception as exc:            # InvalidRequestError: a 400 naming response_format
        raise from_sense_error(exc, "response_format") from None


def chat_request(req: ChatRequest, config: ServingConfig) -> GenerationRequest:
    check_model(req, config)
    _check_common(req, config)
    _check_max_tokens(req, config)
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs requires logprobs: true", "top_logprobs")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise invalid("max_tokens and max_completion_tokens disagree: give one", "max_completion_tokens")
    messages, tool_names, tool_grammar = _tool_turns(req)
    if not any(m["content"].strip() for m in messages):
        raise invalid("the messages are empty: give some text", "messages")
    max_tokens = req.max_completion_tokens or req.max_tokens or config.sampling.chat_max_tokens
    prediction = _text(req.prediction.content) if req.prediction else None
    grammar = _grammar(req.response_format)
    if tool_grammar is not None:
        if grammar is not None:
            raise invalid("give response_format or a required tool call, not both", "tool_choice")
        grammar = tool_grammar
    if grammar is not None and req.ignore_eos:
        raise invalid("ignore_eos cannot be used with a JSON response_format (the answer ends when its JSON does)",
                      "ignore_eos")
    return GenerationRequest(request_id=f"chatcmpl-{uuid.uuid4().hex}", kind="chat",
                             params=_sampling(req, max_tokens, config), messages=messages,
                             stream=bool(req.stream), prediction=prediction, n=req.n or 1, grammar=grammar,
                             tool_names=tool_names,
                             logprobs=(req.top_logprobs or 0) if req.logprobs else None, **_speculative(req, config))


def include_usage(req: _Common) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


# -- the OpenAPI document ------------------------------------------------------------------------

ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"], "additionalProperties": False,
        "properties": {"message": {"type": "string", "minLength": 1}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
# One server-sent event (OpenAPI 3.1: an event stream's `schema` describes each event): `data` is
# a chunk or an error object as JSON, and `[DONE]` last.
SSE_EVENT_SCHEMA = {"type": "object", "required": ["data"],
                    "properties": {"data": {"type": "string", "minLength": 1}, "event": {"type": "string"}}}
_BODIES = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatRequest"}


def openapi_document(doc: dict, config: ServingConfig, open_paths=("/health",)) -> dict:
    """Complete FastAPI's OpenAPI document `doc` (in place; returned): the routes read their
    bodies raw (the size limit comes before parsing), so their JSON schemas are added here, with
    the max_tokens bound `config` enforces; the OpenAI-style error responses; and, when API keys
    are configured, bearer authentication on every operation but `open_paths`."""
    from pydantic.json_schema import models_json_schema

    _, defs = models_json_schema([(CompletionRequest, "validation"), (ChatRequest, "validation")],
                                 ref_template="#/components/schemas/{model}")
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(defs["$defs"])
    schemas["ErrorResponse"] = ERROR_SCHEMA
    limit = config.sampling.max_tokens_limit
    for name in _BODIES.values():
        for field_name in ("max_tokens", "max_completion_tokens"):
            prop = schemas[name]["properties"].get(field_name)
            for branch in (prop.get("anyOf", [prop]) if prop else ()):
                if branch.get("type") == "integer":
                    branch["maximum"] = limit
    auth = config.ingress.auth_enabled
    if auth:
        components["securitySchemes"] = {"bearerAuth": {
            "type": "http", "scheme": "bearer",
            "description": "an API key of ingress.api_keys_file / ingress.api_keys_env"}}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, operations in doc.get("paths", {}).items():
        for op in operations.values():
            responses = op.setdefault("responses", {})
            if path in _BODIES:
                op["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{_BODIES[path]}"}}}}
                responses["200"] = {
                    "description": "the completion; server-sent events of chunks with \"stream\": true",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": SSE_EVENT_SCHEMA}}}
                responses["400"] = {"description": "invalid request (JSON, parameters, prompt too long)",
                                    "content": error}
                responses["404"] = {"description": "unknown model", "content": error}
                responses["413"] = {"description": f"body larger than {config.ingress.max_body_bytes} bytes",
                                    "content": error}
                responses[str(config.ingress.overload_status)] = {
                    "description": "overloaded: retry after Retry-After seconds", "content": error}
            if path == "/health":
                responses["503"] = {"description": "the decoder does not answer", "content": error}
            if auth and path not in open_paths:
                op["security"] = [{"bearerAuth": []}]
                responses["401"] = {"description": "missing or wrong API key", "content": error}
            responses.setdefault("default", {"description": "an error", "content": error})
    return doc
