"""Fair shares of the one thread that generates: calls run one at a time, the least recently served user first.

The serving thread runs every /generate, /sweep and /grid (a CPU's torch threads belong to the thread that calls
them, and a GPU runs one batch at a time anyway). Served in arrival order, one user's flood of requests would make
every other user wait behind all of it; served least-recently-served user first, a user's request waits behind at
most one request of each other user. Each user's own calls keep their order, and each user may have at most
`max_queued` calls waiting.

Batched serving: a call submitted with a batch key is run together with the other users' next calls of the same
key (one model route, size and sampler: `Generator.batch_key`) as one call of their batch function, which gives
each call the result it would have had alone. Calls that arrive while the thread is busy gather by themselves; a
lone call waits `window` seconds for company first.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import threading
from typing import Callable

from big.errors import QuotaExceeded


class FairScheduler:
    def __init__(self, max_queued: int, thread_name: str = "big-generate", window: float = 0.005,
                 max_batch_calls: int = 16):
        self.max_queued = max_queued
        self.window = window
        self.max_batch_calls = max_batch_calls
        self._queues: dict[str, collections.deque] = {}
        self._last_served: dict[str, int] = {}
        self._turn = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=thread_name, daemon=True)
        self._thread.start()

    def submit(self, user: str, fn: Callable, *args, batch: tuple | None = None) -> concurrent.futures.Future:
        """Queue `fn(*args)` for `user`; QuotaExceeded when the user already has `max_queued` calls waiting.
        `batch` = (key, batch_fn): `batch_fn([args, ...])` may serve this call together with others of the key,
        returning each call's result or the exception it raised, in order."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            queue = self._queues.setdefault(user, collections.deque())
            if len(queue) >= self.max_queued:
                raise QuotaExceeded(f"you have {len(queue)} generation requests waiting; at most {self.max_queued} "
                                    "(limits.max_queued_generations)")
            queue.append((fn, args, future, next(self._turn), batch))
            self._cv.notify()
        return future

    def close(self) -> None:
        """Stop after the call running now; calls still waiting are cancelled, so no caller waits forever."""
        with self._cv:
            self._closed = True
            waiting = [item for queue in self._queues.values() for item in queue]
            self._queues.clear()
            self._cv.notify()
        for item in waiting:
            item[2].cancel()

    def _next(self):
        """The head call of the user served longest ago (never: first), ties broken by arrival."""
        user = min((u for u, q in self._queues.items() if q),
                   key=lambda u: (self._last_served.get(u, -1), self._queues[u][0][3]))
        self._last_served[user] = next(self._turn)
        return user, self._queues[user].popleft()

    def _companions(self, key, taken: set) -> list:
        """Other users' next calls of the same batch key, least recently served users first; one call per user
        per batch, so a user's flood adds one call to a batch, as it adds one call to everyone's wait."""
        out = []
        for user in sorted((u for u, q in self._queues.items() if q and u not in taken),
                           key=lambda u: self._last_served.get(u, -1)):
            queue = self._queues[user]
            if len(out) + 1 < self.max_batch_calls and queue[0][4] is not None and queue[0][4][0] == key:
                out.append(queue.popleft())
                taken.add(user)
                self._last_served[user] = next(self._turn)
        return out

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not any(self._queues.values()):
                    self._cv.wait()
                if self._closed:
                    return
                user, item = self._next()
                calls, taken = [item], {user}
                if item[4] is not None:
                    calls += self._companions(item[4][0], taken)
                    if len(calls) == 1 and self.window > 0:
                        self._cv.wait(self.window)  # a lone call waits a moment for company
                        calls += self._companions(item[4][0], taken)
            calls = [c for c in calls if c[2].set_running_or_notify_cancel()]
            if len(calls) == 1 or (calls and calls[0][4] is None):
                self._run_alone(calls[0])
            elif calls:
                self._run_together(calls)

    @staticmethod
    def _run_alone(call) -> None:
        fn, args, future, _, _ = call
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - the caller gets whatever the call raised
            future.set_exception(e)

    @staticmethod
    def _run_together(calls) -> None:
        batch_fn = calls[0][4][1]
        try:
            results = batch_fn([args for _, args, _, _, _ in calls])
        except BaseException as e:  # noqa: BLE001 - the batch as a whole failed: every caller hears of it
            results = [e] * len(calls)
        for (_, _, future, _, _), result in zip(calls, results):
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
