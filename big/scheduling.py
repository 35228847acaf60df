"""Fair shares of the one thread that generates: calls run one at a time, the least recently served user first.

The serving thread runs every /generate, /sweep and /grid (a CPU's torch threads belong to the thread that calls
them, and a GPU runs one batch at a time anyway). Served in arrival order, one user's flood of requests would make
every other user wait behind all of it; served least-recently-served user first, a user's request waits behind at
most one request of each other user. Each user's own calls keep their order, and each user may have at most
`max_queued` calls waiting.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import threading
from typing import Callable

from big.errors import QuotaExceeded


class FairScheduler:
    def __init__(self, max_queued: int, thread_name: str = "big-generate"):
        self.max_queued = max_queued
        self._queues: dict[str, collections.deque] = {}
        self._last_served: dict[str, int] = {}
        self._turn = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=thread_name, daemon=True)
        self._thread.start()

    def submit(self, user: str, fn: Callable, *args) -> concurrent.futures.Future:
        """Queue `fn(*args)` for `user`; QuotaExceeded when the user already has `max_queued` calls waiting."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            queue = self._queues.setdefault(user, collections.deque())
            if len(queue) >= self.max_queued:
                raise QuotaExceeded(f"you have {len(queue)} generation requests waiting; at most {self.max_queued} "
                                    "(limits.max_queued_generations)")
            queue.append((fn, args, future, next(self._turn)))
            self._cv.notify()
        return future

    def waiting(self) -> dict[str, int]:
        with self._cv:
            return {u: len(q) for u, q in self._queues.items() if q}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _next(self):
        """The head call of the user served longest ago (never: first), ties broken by arrival."""
        user = min((u for u, q in self._queues.items() if q),
                   key=lambda u: (self._last_served.get(u, -1), self._queues[u][0][3]))
        self._last_served[user] = next(self._turn)
        return self._queues[user].popleft()

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not any(self._queues.values()):
                    self._cv.wait()
                if self._closed:
                    return
                fn, args, future, _ = self._next()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - the caller gets whatever the call raised
                future.set_exception(e)
