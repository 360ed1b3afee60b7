"""A target model shared by a replica's concurrent generations (without batching): forward passes
one at a time on the replica's compute thread, tokenizer calls under a lock."""

from __future__ import annotations

import threading


class _LockedTokenizer:
    """A tokenizer whose calls take one lock (fast tokenizers can refuse concurrent use)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def decode(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer.decode(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer.apply_chat_template(*args, **kwargs)


def _next_piece(pieces, sent) -> tuple[bool, object]:
    """(False, what the prefill's generator yields) or (True, what it returns)."""
    try:
        return False, pieces.send(sent)
    except StopIteration as done:
        return True, done.value


class SerializedTarget:
    """A TargetModel shared by concurrent generations: forward passes (prefill, verify, commit)
    run one at a time on the replica's compute thread (``decoding/compute_thread.py``: one OpenMP
    pool, not one per request thread) unless `serialize` is false; tokenizer calls take a lock."""

    def __init__(self, target, serialize: bool = True, compute=None) -> None:
        self._target = target
        self._compute = compute if serialize else None
        self._lock = threading.Lock() if serialize and compute is None else None
        self.tokenizer = _LockedTokenizer(target.tokenizer) if target.tokenizer is not None else None

    def __getattr__(self, name):
        return getattr(self._target, name)

    def _locked(self, fn, *args, **kwargs):
        if self._compute is not None:
            return self._compute.call(fn, *args, **kwargs)
        if self._lock is None:
            return fn(*args, **kwargs)
        with self._lock:
            return fn(*args, **kwargs)

    def prefill(self, *args, **kwargs):
        return self._locked(self._target.prefill, *args, **kwargs)

    def prefill_pieces(self, *args, **kwargs):
        """The target's ``prefill_pieces``, each piece a locked call as ``prefill`` is."""
        pieces = self._target.prefill_pieces(*args, **kwargs)
        sent = None
        while True:
            done, value = self._locked(_next_piece, pieces, sent)
            if done:
                return value
            sent = yield value

    def verify(self, *args, **kwargs):
        return self._locked(self._target.verify, *args, **kwargs)

    def commit(self, *args, **kwargs):
        return self._locked(self._target.commit, *args, **kwargs)

    def verify_batch(self, *args, **kwargs):
        return self._locked(self._target.verify_batch, *args, **kwargs)
