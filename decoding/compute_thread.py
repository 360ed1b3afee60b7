"""One thread for every torch computation of a long-lived process that serves requests.

torch's CPU kernels (and the invariant kernels) run their parallel regions on OpenMP, and libgomp
keeps one pool of worker threads per thread that starts parallel regions. Once a process has more
OpenMP threads than cores (a model loaded on one thread, forwards run on another, or a forward on
each request's thread), libgomp throttles its spinning: workers sleep between regions and every
region pays a wake-up. Measured on the 2-core machine: a decode step of the embedded model took
25 ms on the thread that had loaded it and 57-73 ms on any other thread, whatever
``torch.set_num_threads`` said there. A serving process therefore runs its model work (loading,
measuring, every forward) on one :class:`ComputeThread`; other threads hand it callables.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future


class ComputeThread:
    """A daemon thread that runs :meth:`call`-ed functions one at a time, in order, and between
    them a `background` step while `pending()` says there is work (the batch loop)."""

    def __init__(self, name: str = "compute") -> None:
        self._cv = threading.Condition()
        self._calls: deque[tuple[Callable, tuple, dict, Future]] = deque()
        self._background: Callable[[], None] | None = None
        self._pending: Callable[[], bool] = lambda: False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def call(self, fn: Callable, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` on the compute thread and return its result (or raise its
        exception); called from the compute thread itself, runs it directly."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        future: Future = Future()
        with self._cv:
            self._calls.append((fn, args, kwargs, future))
            self._cv.notify()
        return future.result()

    def set_background(self, step: Callable[[], None], pending: Callable[[], bool]) -> None:
        """Run `step()` whenever no call is waiting and `pending()` is true (checked under the
        thread's lock: call :meth:`wake` after making it true)."""
        with self._cv:
            self._background, self._pending = step, pending
            self._cv.notify()

    def wake(self, change: Callable[[], None] | None = None) -> None:
        """Apply `change()` (if any) under the thread's lock and wake the thread."""
        with self._cv:
            if change is not None:
                change()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._calls and not (self._background is not None and self._pending()):
                    self._cv.wait()
                calls = list(self._calls)
                self._calls.clear()
                step = self._background
            for fn, args, kwargs, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as exc:        # handed to the caller
                        future.set_exception(exc)
            if step is not None:
                step()
