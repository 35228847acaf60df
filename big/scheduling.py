"""Fair shares of the one thread that generates: the user who has had the least of it lately goes first, even in
the middle of another user's call.

The serving thread runs every /generate, /sweep and /grid (a CPU's torch threads belong to the thread that calls
them, and a GPU runs one batch at a time anyway). Served in arrival order, one user's flood of requests would make
every other user wait behind all of it. Here each user's recent service (seconds of the thread, decaying with a
half-life of `half_life` seconds) decides: the next call is the head call of the waiting user with the least. And a
call that arrives while another runs, of a user with less service than the running call's user had when that call
began (it would have gone first, had it been waiting then), runs between two denoising steps of the running call
(`big.generation.steps`), nested, before the running call takes its next step. So a light user's request waits for
one denoising step of a flood, not for a flood's call, and users who keep the thread equally busy take turns call by
call, none cutting into the other's call. Each user's own calls keep their order, and each user may have at most `max_queued` calls
waiting. A nested call keeps the paused calls' latents in memory: at most `max_depth` calls are in progress.

Batched serving: a call submitted with a batch key is run together with the other users' next calls of the same
key (one model route, size and sampler: `Generator.batch_key`) as one call of their batch function, which gives
each call the result it would have had alone. Calls that arrive while the thread is busy gather by themselves; a
lone call waits `window` seconds for company first.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import math
import threading
import time
from typing import Callable

from big.errors import QuotaExceeded
from big.generation.steps import between_steps


@dataclasses.dataclass
class _Call:
    user: str
    fn: Callable
    args: tuple
    future: concurrent.futures.Future
    turn: int
    batch: tuple | None


class _Service:
    """Seconds of the thread a user has had, each second's weight halving every `half_life` seconds after it."""

    def __init__(self, half_life: float):
        self.rate = math.log(2) / half_life
        self._seconds: dict[str, tuple[float, float]] = {}  # user -> (decayed seconds, as of this clock reading)

    def of(self, user: str, now: float) -> float:
        seconds, at = self._seconds.get(user, (0.0, now))
        return self.decayed(seconds, at, now)

    def decayed(self, seconds: float, at: float, now: float) -> float:
        """`seconds` of service as of `at`, as they count at `now`."""
        return seconds * math.exp(-self.rate * (now - at))

    def charge(self, users, seconds: float, now: float) -> None:
        for user in users:  # a batch's users share its time
            self._seconds[user] = (self.of(user, now) + seconds / len(users), now)


@dataclasses.dataclass
class _Running:
    """A call in progress on the thread (paused while a call nested in it runs)."""

    users: tuple[str, ...]
    bar: float  # the least service of its users when it began: a waiting user below it may run inside it
    began: float
    resumed: float  # when it last began or resumed: its users are charged from here


class FairScheduler:
    def __init__(self, max_queued: int, thread_name: str = "big-generate", window: float = 0.005,
                 max_batch_calls: int = 16, half_life: float = 10.0, max_depth: int = 4):
        self.max_queued = max_queued
        self.window = window
        self.max_batch_calls = max_batch_calls
        self.max_depth = max_depth
        self._queues: dict[str, collections.deque[_Call]] = {}
        self._service = _Service(half_life)
        self._running: list[_Running] = []  # the innermost last
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
            queue.append(_Call(user, fn, args, future, next(self._turn), batch))
            self._cv.notify()
        return future

    def close(self) -> None:
        """Stop after the calls running now; calls still waiting are cancelled, so no caller waits forever."""
        with self._cv:
            self._closed = True
            waiting = [call for queue in self._queues.values() for call in queue]
            self._queues.clear()
            self._cv.notify()
        for call in waiting:
            call.future.cancel()

    # ------------------------------------------------------------------ choosing
    def _pick(self, now: float, below: float = math.inf) -> list[_Call]:
        """The head call of the waiting user with the least service (ties: the earlier call), with its batch
        companions; only users with less than `below`, and none whose call is in progress (their calls keep
        their order). Under the lock."""
        busy = {u for running in self._running for u in running.users}
        waiting = [(self._service.of(u, now), q[0].turn, u) for u, q in self._queues.items() if q and u not in busy]
        if not waiting:
            return []
        service, _, user = min(waiting)
        if service >= below:
            return []
        head = self._queues[user].popleft()
        if head.batch is None:
            return [head]
        return [head] + self._companions(head.batch[0], busy | {user}, now)

    def _companions(self, key, taken: set, now: float) -> list[_Call]:
        """Other users' next calls of the same batch key, least served users first; one call per user per batch,
        so a user's flood adds one call to a batch, as it adds one call to everyone's wait."""
        out = []
        for _, _, user in sorted((self._service.of(u, now), q[0].turn, u) for u, q in self._queues.items()
                                 if q and u not in taken):
            queue = self._queues[user]
            if len(out) + 1 < self.max_batch_calls and queue[0].batch is not None and queue[0].batch[0] == key:
                out.append(queue.popleft())
                taken.add(user)
        return out

    # ------------------------------------------------------------------ serving
    def _work(self) -> None:
        between_steps.set(self._between_steps)  # this thread's denoising loops offer their steps
        while True:
            with self._cv:
                while not self._closed and not any(self._queues.values()):
                    self._cv.wait()
                if self._closed:
                    return
                calls = self._pick(time.perf_counter())
                if calls[0].batch is not None and len(calls) == 1 and self.window > 0:
                    self._cv.wait(self.window)  # a lone call waits a moment for company
                    calls += self._companions(calls[0].batch[0], {calls[0].user}, time.perf_counter())
            self._serve(calls)

    def _between_steps(self) -> None:
        """Between two denoising steps of the innermost running call: run, nested here, each waiting call of a
        user with less service than the running call's users had when it began."""
        if not self._running or len(self._running) >= self.max_depth:
            return
        while True:
            with self._cv:
                if self._closed:
                    return
                now, running = time.perf_counter(), self._running[-1]
                calls = self._pick(now, below=self._service.decayed(running.bar, running.began, now))
            if not calls:
                return
            self._charge_innermost()  # the paused call's time so far is its users'
            self._serve(calls)  # which restarts the paused call's clock when it ends

    def _charge_innermost(self) -> None:
        """Charge the innermost call's users for its time since it last resumed."""
        now, running = time.perf_counter(), self._running[-1]
        self._service.charge(running.users, now - running.resumed, now)
        running.resumed = now

    def _serve(self, calls: list[_Call]) -> None:
        calls = [c for c in calls if c.future.set_running_or_notify_cancel()]
        if not calls:
            return
        now, users = time.perf_counter(), tuple(c.user for c in calls)
        self._running.append(_Running(users, min(self._service.of(u, now) for u in users), now, now))
        try:
            if len(calls) == 1 or calls[0].batch is None:
                self._run_alone(calls[0])
            else:
                self._run_together(calls)
        finally:
            self._charge_innermost()
            self._running.pop()
            if self._running:
                self._running[-1].resumed = time.perf_counter()  # the paused call resumes: its clock restarts

    @staticmethod
    def _run_alone(call: _Call) -> None:
        try:
            call.future.set_result(call.fn(*call.args))
        except BaseException as e:  # noqa: BLE001 - the caller gets whatever the call raised
            call.future.set_exception(e)

    @staticmethod
    def _run_together(calls: list[_Call]) -> None:
        batch_fn = calls[0].batch[1]
        try:
            results = batch_fn([c.args for c in calls])
        except BaseException as e:  # noqa: BLE001 - the batch as a whole failed: every caller hears of it
            results = [e] * len(calls)
        for call, result in zip(calls, results):
            if isinstance(result, BaseException):
                call.future.set_exception(result)
            else:
                call.future.set_result(result)
