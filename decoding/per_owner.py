"""Values kept per owner object (a target model, a decoder) and key, for as long as the owner lives."""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Generic, Hashable, TypeVar

T = TypeVar("T")


class PerOwner(Generic[T]):
    """``get(owner, key)``: the value made by `factory` the first time the pair was asked for,
    the same one after; forgotten with the owner (a weak reference), safe across threads."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, owner: object, key: Hashable) -> T:
        with self._lock:
            table = self._tables.setdefault(owner, {})
            if key not in table:
                table[key] = self._factory()
            return table[key]
