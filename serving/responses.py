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


def tool_calls(gen, text: str) -> list[dict] | None:
    """The calls a chat answer makes (serving/tools.py), if the request has tools; else None."""
    if not getattr(gen, "tool_names", None):
        return None
    from serving.tools import parse_calls

    return parse_calls(text, set(gen.tool_names))


def full_body(gen, model: str, done: dict, text: str) -> dict:
    """The non-streamed response of a finished request."""
    choice: dict = {"index": gen.index, "logprobs": _logprobs(gen, done.get("logprobs")),
                    "finish_reason": done["finish_reason"]}
    if gen.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
        calls = tool_calls(gen, text)
        if calls:
            choice["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
            choice["finish_reason"] = "tool_calls"
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


def total_usage(usages: list[dict]) -> dict:
    """The usage of a request's choices together: the prompt once (every choice read the same),
    the completions' tokens (and their prediction counts) summed."""
    first = usages[0]
    out = {**first, "completion_tokens": sum(u["completion_tokens"] for u in usages)}
    out["total_tokens"] = first["prompt_tokens"] + out["completion_tokens"]
    details = [u.get("completion_tokens_details") for u in usages]
    if details[0] is not None:
        out["completion_tokens_details"] = {k: sum(d[k] for d in details) for k in details[0]}
    return out


def merged_body(bodies: list[dict]) -> dict:
    """The response of a request of n > 1 choices from each choice's own (``full_body``): their
    choices in index order, the usage together, and ``speculative`` a list, one per choice."""
    out = dict(bodies[0])
    out["choices"] = [b["choices"][0] for b in bodies]
    out["usage"] = total_usage([b["usage"] for b in bodies])
    out["speculative"] = [b["speculative"] for b in bodies]
    return out


def chunk(gen, model: str, *, text: str | None = None, role: bool = False, finish_reason: str | None = None,
          token_ids: list[int] | None = None, extra: dict | None = None, logprobs: list[dict] | None = None,
          offset: int = 0, calls: list[dict] | None = None) -> dict:
    """One streamed chunk with a text delta (and/or the role, the finish reason); `logprobs`: its
    tokens' entries (serving/logprobs.py), `offset` the characters of the answer before them."""
    choice: dict = {"index": gen.index, "logprobs": _logprobs(gen, logprobs, offset), "finish_reason": finish_reason}
    if gen.kind == "chat":
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
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
