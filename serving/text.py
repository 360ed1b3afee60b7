"""Incremental detokenisation for streaming: text deltas whose concatenation is the final text.

The engine cuts the final text at the first stop string and decodes with special tokens
skipped. While streaming, a delta therefore holds back (a) a tail that could still grow into a
stop string and (b) an incomplete UTF-8 character (decoded as U+FFFD); both are released once
the next tokens settle them, and :meth:`TextStream.finish` sends whatever is left.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.sent = ""

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _cut(self, text: str) -> tuple[str, int]:
        """(text cut at the first stop string, how many trailing characters to hold back)."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return text[: min(hits)], 0
        hold = 0
        for s in self.stop:             # a suffix of the text that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        end = len(text) - hold
        while end > 0 and text[end - 1] == REPLACEMENT:
            end -= 1
        return text, len(text) - end

    def push(self, new_ids: list[int]) -> str:
        """Add committed tokens; return the text that is now safe to send (maybe empty)."""
        self.ids.extend(int(t) for t in new_ids)
        text, hold = self._cut(self._decode())
        safe = text[: len(text) - hold]
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta = safe[len(self.sent):]
        self.sent = safe
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of the final text after what was sent."""
        if not final_text.startswith(self.sent):
            return ""       # cannot happen with prefix-stable tokenizers; never resend text
        rest = final_text[len(self.sent):]
        self.sent = final_text
        return rest
