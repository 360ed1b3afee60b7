"""Tool calling (OpenAI's ``tools`` and ``tool_choice``) for any chat model, through its plain
chat template and, where a call is required, a grammar.

- The functions are described to the model in a system message, with one calling convention:
  reply with only a JSON object ``{"name": ..., "arguments": {...}}``. Earlier turns' calls
  (assistant ``tool_calls``) are written as that JSON, and tool results (role ``tool``) as user
  turns naming the function, so every chat template renders them (many know no ``tool`` role).
- ``tool_choice: "required"`` or a named function constrains the answer to that JSON with the
  functions' parameter schemas (decoding/structured.py: the grammar's mask on every verified
  row, so strict decoding stays plain constrained decoding). ``"auto"`` (the default with tools)
  leaves the answer free, and an answer that is such a call (bare, in a ```json fence, or in
  ``<tool_call>`` tags as Hermes-style models write it) becomes one. ``"none"`` describes nothing.
- A call is returned as ``message.tool_calls`` with ``finish_reason: "tool_calls"``; streamed,
  an answer that may be a call (it starts with {, [, ` or <) is held until it ends (a call is
  known only then) and sent as one chunk; one that starts as plain text streams as usual.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.errors import invalid


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class _Named(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: _Named


class CallFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: CallFunction


NO_PARAMETERS = {"type": "object", "properties": {}}


def _parameters(f: FunctionDef) -> dict:
    return f.parameters if f.parameters is not None else NO_PARAMETERS


def call_schema(tools: list[Tool], name: str | None = None) -> dict:
    """The JSON schema of one call: of the function `name`, else of any of `tools`."""
    chosen = [t.function for t in tools if name is None or t.function.name == name]

    def one(f: FunctionDef) -> dict:
        return {"type": "object", "properties": {"name": {"const": f.name}, "arguments": _parameters(f)},
                "required": ["name", "arguments"], "additionalProperties": False}

    return one(chosen[0]) if len(chosen) == 1 else {"anyOf": [one(f) for f in chosen]}


def system_text(tools: list[Tool], mode: str, named: str | None = None) -> str:
    """The system message that describes the functions and how to call them (`mode`: "auto",
    "required", or "named" for the function `named`)."""
    described = [{"name": t.function.name, "description": t.function.description or "",
                  "parameters": _parameters(t.function)} for t in tools]
    ask = {"auto": "If one of them helps, reply with only a JSON object calling it; otherwise answer normally.",
           "required": "Reply with only a JSON object calling one of them."}.get(
        mode, f"Reply with only a JSON object calling `{named}`.")
    return ("You can call these functions:\n" + json.dumps(described, ensure_ascii=False) +
            '\nTo call a function, reply with {"name": <the function\'s name>, "arguments": <its arguments as a '
            f"JSON object>}}. {ask}")


def plain_messages(messages: list, text_of) -> list[dict]:
    """The request's turns as system/user/assistant messages any chat template renders: an
    assistant's calls as their JSON, a tool's result as a user turn naming the function."""
    names: dict[str, str] = {}
    out = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        content = text_of(m.content)
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for c in m.tool_calls:
                names[c.id] = c.function.name
                try:
                    arguments = json.loads(c.function.arguments or "{}")
                except json.JSONDecodeError:
                    raise invalid(f"tool call {c.id}: arguments are not JSON", "messages") from None
                calls.append({"name": c.function.name, "arguments": arguments})
            content = (content + "\n" if content else "") + "\n".join(json.dumps(c, ensure_ascii=False) for c in calls)
        elif m.role == "tool":
            if m.tool_call_id is None:
                raise invalid("a tool message needs tool_call_id", "messages")
            name = names.get(m.tool_call_id, m.name or "the function")
            role, content = "user", f"Result of {name} (call {m.tool_call_id}):\n{content}"
        out.append({"role": role, "content": content})
    return out


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_calls(text: str, names: set[str]) -> list[dict] | None:
    """The calls an answer makes, as OpenAI's ``tool_calls``; None if it is not a call of one of
    `names` (then it is plain content)."""
    s = text.strip()
    fenced = _FENCE.match(s)
    pieces = _TAGGED.findall(s) if "<tool_call>" in s else [fenced.group(1) if fenced else s]
    calls = []
    for piece in pieces:
        try:
            value = json.loads(piece)
        except json.JSONDecodeError:
            return None
        for c in value if isinstance(value, list) else [value]:
            if not (isinstance(c, dict) and c.get("name") in names and isinstance(c.get("arguments", {}), dict)):
                return None
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}),
                                                                                 ensure_ascii=False)}})
    return calls or None
