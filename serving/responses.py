"""OpenAI response bodies and server-sent-event chunks, built from the decoder's events.

Non-streamed responses carry the request's statistics in a top-level ``speculative`` object;
streamed ones on their last chunk (the usage chunk when ``stream_options.include_usage``).
"""

from __future__ import annotations

import json

from serving import logprobs as lp


def _object(kind: str, stream: bool) -> str:
    if kind == "chat":
        return "chat.completion.chunk" if stream else "chat.completion"
    return "text_completion"


def _logprobs(gen, entries: list[dict] | None, offset: int = 0) -> dict | None:
    if entries is None:
        return None
    return lp.chat(entries) if gen.kind == "chat" else lp.completion(entries, offset)


def full_body(gen, model: str, done: dict, text: str) -> dict:
    """The non-streamed response of a finished request."""
    choice: dict = {"index": 0, "logprobs": _logprobs(gen, done.get("logprobs")),
                    "finish_reason": done["finish_reason"]}
    if gen.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
        if gen.echo:                # the prompt before the answer, and before its log-probabilities
            choice["text"] = done["prompt_text"] + text
            if choice["logprobs"] is not None:
                choice["logprobs"] = _logprobs(gen, done.get("prompt_logprobs", []) + done["logprobs"])
    if gen.return_token_ids:
        choice["token_ids"] = done["token_ids"]
    return {"id": gen.request_id, "object": _object(gen.kind, False), "created": gen.created, "model": model,
            "choices": [choice], "usage": done["usage"], "speculative": done["speculative"]}


def chunk(gen, model: str, *, text: str | None = None, role: bool = False, finish_reason: str | None = None,
          token_ids: list[int] | None = None, extra: dict | None = None, logprobs: list[dict] | None = None,
          offset: int = 0) -> dict:
    """One streamed chunk with a text delta (and/or the role, the finish reason); `logprobs`: its
    tokens' entries (serving/logprobs.py), `offset` the characters of the answer before them."""
    choice: dict = {"index": 0, "logprobs": _logprobs(gen, logprobs, offset), "finish_reason": finish_reason}
    if gen.kind == "chat":
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    if token_ids is not None:
        choice["token_ids"] = token_ids
    body = {"id": gen.request_id, "object": _object(gen.kind, True), "created": gen.created, "model": model,
            "choices": [choice]}
    if extra:
        body.update(extra)
    return body


def usage_chunk(gen, model: str, usage: dict, extra: dict | None = None) -> dict:
    body = {"id": gen.request_id, "object": _object(gen.kind, True), "created": gen.created, "model": model,
            "choices": [], "usage": usage}
    if extra:
        body.update(extra)
    return body


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
