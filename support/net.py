"""Local networking and polling: a free port, waiting until a condition holds."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], T], timeout: float, every: float = 0.5) -> T | None:
    """Call `cond` every `every` seconds until it returns a true value (returned), or None once
    `timeout` seconds have passed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    return None
