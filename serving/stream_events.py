"""A request's stream of events in the decoder replica: the committed tokens the generation thread
hands over, gathered into chunks (:class:`StreamBuffer`, at most one every
:func:`stream_interval`), and the replica's relay of them to the ingress through Ray, where the
deltas already waiting go as one item, detokenised once (:func:`relay`)."""

from __future__ import annotations

import asyncio
import time


def _merge(a: dict, b: dict) -> dict:
    out = {"type": "delta", "token_ids": a["token_ids"] + b["token_ids"]}
    if "logprobs" in a:
        out["logprobs"] = a["logprobs"] + b["logprobs"]
    return out


def coalesce_deltas(event: dict, queue: asyncio.Queue) -> tuple[dict, dict | None]:
    """`event` merged with the delta events already waiting behind it (one stream chunk instead of
    several when the caller reads slower than the decode loop produces); returns it and the first
    non-delta event taken from the queue, if any, to send next. Nothing waits."""
    if event["type"] != "delta":
        return event, None
    while not queue.empty():
        nxt = queue.get_nowait()
        if nxt["type"] != "delta":
            return event, nxt
        event = _merge(event, nxt)
    return event, None


def relay(event: dict, queue: asyncio.Queue, text) -> tuple[dict, dict | None]:
    """The next item of a request's stream from `event` and the events already waiting behind it
    (:func:`coalesce_deltas`), its text detokenised by `text` (a ``serving.text.TextStream``;
    None for a request that does not stream); returns it and the event taken from the queue to
    relay next, if any. Deltas waiting together go as one; the last delta, when the finish is
    already behind it, goes inside the ``done`` event (as ``delta``): one item through Ray."""
    event, held = coalesce_deltas(event, queue)
    if event["type"] == "delta":
        event = {**event, "text": text.push(event["token_ids"])}
        if held is not None and held["type"] == "done":
            return {**held, "text": text.finish(held["text"]), "delta": event}, None
    elif event["type"] == "done" and text is not None:
        event = {**event, "text": text.finish(event["text"])}
    return event, held


class StreamBuffer:
    """A streamed request's committed token ids, handed to the replica's event loop at most every
    `interval` seconds: the first tokens at once (time to first token), later ones gathered, the
    rest by :meth:`flush` before the finish. Every hand-over wakes the event loop and sends a
    chunk through Ray and HTTP; on a machine with as many torch threads as cores, each such
    wake-up preempts a thread of the running forward and stalls it at its next barrier (measured:
    streaming one chunk per step slowed the decoder's forwards by 13% on the 2-core machine).
    `interval`: seconds, or a function giving them now (the replica's, longer with more streams)."""

    def __init__(self, emit, interval, clock=time.monotonic, logprobs=None) -> None:
        """`logprobs`: the request's list of ``TokenLogprob`` records, one per committed token
        (``Sequence.token_logprobs``): a chunk carries those of its tokens."""
        self.emit, self.interval, self.clock = emit, interval, clock
        self.ids: list[int] = []
        self.last: float | None = None
        self.logprobs, self.sent = logprobs, 0

    def push(self, ids: list[int]) -> None:
        self.ids += ids
        now = self.clock()
        interval = self.interval() if callable(self.interval) else self.interval
        if self.last is None or now - self.last >= interval:
            self.flush()
            self.last = now

    def flush(self) -> None:
        if self.ids:
            event = {"type": "delta", "token_ids": self.ids}
            if self.logprobs is not None:
                event["logprobs"] = self.logprobs[self.sent: self.sent + len(self.ids)]
                self.sent += len(self.ids)
            self.emit(event)
            self.ids = []


def stream_interval(cfg, streams: int) -> float:
    """Seconds between a stream's chunks with `streams` requests active in the replica: `cfg`'s
    (a ``DecoderConfig``) ``stream_interval_ms``, longer where the streams together would send
    more than ``stream_chunks_per_s`` chunks a second."""
    base = cfg.stream_interval_ms / 1e3
    if cfg.stream_chunks_per_s <= 0:
        return base
    return max(base, streams / cfg.stream_chunks_per_s)
