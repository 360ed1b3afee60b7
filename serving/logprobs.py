"""Token log-probabilities in OpenAI's shapes.

The decoder turns the engine's ``TokenLogprob`` records into entries, ``{"token", "logprob",
"bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}`` (chat's shape; a token's text is
its own decoding, special tokens included, and ``bytes`` that text's UTF-8: a byte-level token that
is part of a character reads as U+FFFD there; an echoed prompt's first token has no context, so
``logprob`` and ``top_logprobs`` None); the ingress sends them as chat's ``logprobs.content``
or as the completions API's parallel lists. The values are the model's own distribution (before
temperature, top-p and top-k) at the position the token was drawn from: in strict greedy decoding
bitwise those of plain decoding (the batch-invariant forward)."""

from __future__ import annotations


class TokenTexts:
    """Token id -> (text, UTF-8 bytes), decoded once per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        hit = self._texts.get(token)
        if hit is None:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            hit = self._texts[token] = (text, list(text.encode("utf-8")))
        return hit


def entries(texts: TokenTexts, records) -> list[dict]:
    """The engine's ``TokenLogprob`` records as chat's ``logprobs.content`` entries."""
    out = []
    for r in records:
        text, raw = texts(r.token)
        top = []
        for token, lp in r.top:
            t, b = texts(token)
            top.append({"token": t, "logprob": lp, "bytes": b})
        out.append({"token": text, "logprob": r.logprob, "bytes": raw, "top_logprobs": top})
    return out


def chat(content: list[dict]) -> dict:
    return {"content": content}


def completion(content: list[dict], offset: int = 0) -> dict:
    """The completions API's ``logprobs``: parallel lists, ``text_offset`` counting characters of
    the answer from `offset` (what earlier chunks of a stream carried)."""
    offsets = []
    for e in content:
        offsets.append(offset)
        offset += len(e["token"])
    top = [None if e["top_logprobs"] is None else {t["token"]: t["logprob"] for t in e["top_logprobs"]}
           for e in content]
    return {"tokens": [e["token"] for e in content], "token_logprobs": [e["logprob"] for e in content],
            "top_logprobs": top, "text_offset": offsets}
