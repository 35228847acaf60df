"""Fine-tuning jobs: a queue, worker threads, progress, ETA and cancellation.

Training runs in worker threads so that the server's event loop (and every /generate call) keeps
going while a model trains. Progress lives in the registry, so /jobs can report it at any time.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from typing import Callable

from big.errors import BadRequest, BIGError, Conflict, JobCancelled, NotFound, error_for
from big.storage.registry import Registry

log = logging.getLogger(__name__)


class JobContext:
    """What a running job may do: report progress and ask whether it should stop."""

    def __init__(self, manager: "JobManager", job_id: str, total_steps: int):
        self._m, self.job_id, self.total_steps = manager, job_id, total_steps
        self._started = time.time()
        self._last_write = 0.0

    def progress(self, step: int, loss: float) -> None:
        now = time.time()
        if step < self.total_steps and now - self._last_write < 0.5:
            return  # throttle registry writes; the last step always lands
        self._last_write = now
        per_step = (now - self._started) / max(step, 1)
        self._m.registry.update_job(self.job_id, step=step, loss=loss,
                                    eta_s=round(per_step * (self.total_steps - step), 2))

    def should_stop(self) -> bool:
        return self._m.is_cancel_requested(self.job_id)


class JobManager:
    def __init__(self, registry: Registry, workers: int = 1, threads: int | None = None):
        """`threads`: torch's CPU thread count on each job's thread (None: torch's own default)."""
        self.registry = registry
        self.threads = threads
        self._queue: "queue.Queue[tuple[str, Callable[[JobContext], dict]] | None]" = queue.Queue()
        self._done: dict[str, threading.Event] = {}
        self._cancel: set[str] = set()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, name=f"big-train-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, job_id: str, fn: Callable[[JobContext], dict]) -> None:
        with self._lock:
            self._done[job_id] = threading.Event()
        self._queue.put((job_id, fn))

    def wait(self, job_id: str, timeout: float | None = None) -> dict:
        ev = self._done.get(job_id)
        if ev is not None:
            ev.wait(timeout)
        return self.registry.get_job(job_id)

    def is_done(self, job_id: str) -> bool:
        return job_id not in self._done

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancel.add(job_id)
        self.registry.update_job(job_id, cancel_requested=1)

    def is_cancel_requested(self, job_id: str) -> bool:
        return job_id in self._cancel

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            # Each job runs on a thread of its own that ends with the job. On a CPU, torch's OpenMP team
            # belongs to the calling thread and lives as long as that thread does; an idle team left behind
            # by a long-lived worker slows every later /generate (docs/benchmarks.md, "Service").
            runner = threading.Thread(target=self._run, args=item, name=f"big-job-{item[0][:8]}", daemon=True)
            runner.start()
            runner.join()

    def _end(self, job_id: str, status: str, **fields) -> None:
        """However a job ends, nothing is left to wait for: its ETA is 0, not its last estimate."""
        self.registry.update_job(job_id, status=status, finished=time.time(), eta_s=0.0, **fields)

    def _run(self, job_id: str, fn: Callable[[JobContext], dict]) -> None:
        job = self.registry.get_job(job_id)
        if self.threads:
            # This thread's own OpenMP team (the serving thread keeps its own): beside an idle serving team,
            # one thread trains faster than torch's default on a small CPU (docs/benchmarks.md, "Service").
            import torch

            torch.set_num_threads(self.threads)
        try:
            if self.is_cancel_requested(job_id):
                raise JobCancelled("cancelled before it started")
            self.registry.update_job(job_id, status="running", started=time.time())
            result = fn(JobContext(self, job_id, job["total_steps"]))
            self._end(job_id, "succeeded", step=job["total_steps"], **result)
        except JobCancelled as e:
            self._end(job_id, "cancelled", error=_message(e), error_code=e.code)
        except BIGError as e:
            self._end(job_id, "failed", error=_message(e), error_code=e.code)
        except Exception as e:  # a crash in training must not take the server down
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            self._end(job_id, "failed", error=f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._cancel.discard(job_id)
                ev = self._done.pop(job_id, None)
            if ev:
                ev.set()


def _message(e: BIGError) -> str:
    return str(e.args[0]) if e.args else ""


VIEW_FIELDS = ("job_id", "status", "step", "total_steps", "loss", "eta_s", "error", "identifier", "category",
               "target", "model_version", "concept_id")


def job_view(job: dict) -> dict:
    """What a client sees of a job; an error reads "[code] message" as the client's own errors do."""
    view = {k: job.get(k) for k in VIEW_FIELDS}
    if job.get("error_code"):
        view["error"] = f"[{job['error_code']}] {job['error']}"
    return view


def job_error(job: dict) -> Exception:
    """The error a failed or cancelled job ended with, to raise to the client that waited for it."""
    text = job.get("error") or "training failed"
    if job["status"] == "cancelled":
        return JobCancelled(text)
    if job.get("error_code") in (BadRequest.code, Conflict.code, NotFound.code):
        return error_for(job["error_code"], text)
    return BIGError(f"finetune failed: {job_view(job)['error'] or text}")
