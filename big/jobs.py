"""Training jobs, durable in the registry: any replica queues, waits on and cancels a job; training workers
(`JobWorker`, in the serving process by default or in `python -m big.worker` processes) claim them.

A worker claims a queued job under a lease it renews every `lease_s / 4`; a worker that dies stops renewing, and
once the lease has passed any live worker queues the job again and the next free worker runs it from the start
(`docs/scaling.md` says why from the start, not from a checkpoint). Per model key at most one job runs at a time
(the registry's partial unique index), so a metamodel has one writer across every worker.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from typing import Callable

from big import failpoints
from big.errors import BadRequest, BIGError, Conflict, JobCancelled, NotFound, Unavailable, error_for
from big.storage.registry import JOB_DONE, LeaseLost, Registry, VersionMovedOn

log = logging.getLogger(__name__)

# How long a client waiting for its job (`wait: true`) waits through a registry that does not answer, beyond
# each registry call's own retries: a database's restart or failover, not an outage for good.
OUTAGE_PATIENCE_S = 60.0
# How long a training job's own registry calls (its commit, its end) wait for a database that does not answer.
JOB_PATIENCE_S = 600.0


# Where a job's seconds go, in order: waiting in the queue (from /finetune to the start of the run that ended it,
# earlier runs' time included), loading its inputs and the modules it trains, the class images of its prior
# (generated once per category, then read), the training steps, and writing its version's files.
JOB_STAGES = ("queue", "load", "class_images", "train", "commit")


class JobSeconds:
    """The seconds of a job's stages (JOB_STAGES), the one owner of their stored form (the jobs row's JSON)."""

    def __init__(self, job: dict):
        self.seconds = {stage: 0.0 for stage in JOB_STAGES}
        if job.get("started") and job.get("created"):
            self.seconds["queue"] = max(0.0, job["started"] - job["created"])

    @contextlib.contextmanager
    def timed(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    def encoded(self) -> str:
        return json.dumps({stage: round(s, 3) for stage, s in self.seconds.items()})

    @staticmethod
    def view(job: dict) -> dict | None:
        """A job row's stages and its total (from /finetune to its end), or None for a job not ended or from
        before they were recorded."""
        if not job.get("seconds"):
            return None
        stages = json.loads(job["seconds"])
        total = job["finished"] - job["created"] if job.get("finished") else None
        return {**{stage: stages.get(stage, 0.0) for stage in JOB_STAGES},
                "total": None if total is None else round(total, 3)}


class JobContext:
    """What a running job may do: report progress, time its stages and ask whether it should stop."""

    def __init__(self, registry: Registry, job: dict, stop: Callable[[], bool], worker: str | None = None):
        """`worker`: the id whose lease the job runs under (its commit checks that the lease is still held)."""
        self.registry, self.job, self.job_id, self.total_steps = registry, job, job["job_id"], job["total_steps"]
        self.worker = worker
        self.seconds = JobSeconds(job)
        self.timed = self.seconds.timed
        self._stop = stop
        self._started = time.time()
        self._last_write = 0.0

    def progress(self, step: int, loss: float) -> None:
        if step == self.total_steps // 2:
            failpoints.reached("half_trained", self.job_id)
        now = time.time()
        if step < self.total_steps and now - self._last_write < 0.5:
            return  # throttle registry writes; the last step always lands
        self._last_write = now
        per_step = (now - self._started) / max(step, 1)
        try:
            with self.registry.patience(0):  # training does not wait for a progress line
                self.registry.update_job(self.job_id, step=step, loss=loss,
                                         eta_s=round(per_step * (self.total_steps - step), 2))
        except Exception as e:  # noqa: BLE001 - progress is for watching; training goes on, the next write catches up
            log.warning("job %s: progress at step %d not written (%s)", self.job_id, step, e)

    def should_stop(self) -> bool:
        return self._stop()


class JobQueue:
    """The client side of the queue, the same on every replica: everything is a row of the registry."""

    def __init__(self, registry: Registry, poll_s: float = 0.2):
        self.registry, self.poll_s = registry, poll_s

    def is_done(self, job_id: str) -> bool:
        job = self.registry.get_job(job_id)
        return job is None or job["status"] in JOB_DONE

    def poll(self, job_id: str, unanswered_since: float | None = None) -> tuple[bool, float | None]:
        """One look at a job someone waits for: (whether it has ended, since when the registry has not answered).
        A waiting client waits through a registry that does not answer (its job goes on) for up to
        OUTAGE_PATIENCE_S, then gets Unavailable."""
        try:
            return self.is_done(job_id), None
        except Unavailable:
            now = time.monotonic()
            unanswered_since = unanswered_since or now
            if now - unanswered_since > OUTAGE_PATIENCE_S:
                raise
            log.warning("job %s: the registry does not answer; still waiting", job_id)
            return False, unanswered_since

    def wait(self, job_id: str, timeout: float | None = None) -> dict:
        end = None if timeout is None else time.monotonic() + timeout
        done, unanswered_since = self.poll(job_id)
        while not done and (end is None or time.monotonic() < end):
            time.sleep(self.poll_s)
            done, unanswered_since = self.poll(job_id, unanswered_since)
        return self.registry.get_job(job_id)

    def cancel(self, job_id: str) -> None:
        self.registry.cancel_job(job_id)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class JobWorker:
    """Claims jobs and runs `runner(ctx, job) -> fields of the finished job` on `slots` threads.

    `threads`: torch's CPU thread count on each job's thread (None: torch's own default). `discard(job)` is
    called once a job has ended for good, to drop what it was given (its stored inputs)."""

    def __init__(self, registry: Registry, runner: Callable[[JobContext, dict], dict], *, slots: int = 1,
                 threads: int | None = None, lease_s: float = 20.0, poll_s: float = 0.5, max_attempts: int = 3,
                 discard: Callable[[dict], None] = lambda job: None,
                 before_rerun: Callable[[dict], None] = lambda job: None):
        self.registry, self.runner = registry, runner
        self.threads, self.lease_s, self.poll_s, self.max_attempts = threads, lease_s, poll_s, max_attempts
        self.discard, self.before_rerun = discard, before_rerun
        self.id = worker_id()
        self._running: dict[str, dict] = {}  # job id -> {"lost": bool, "cancel": bool}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._alive_file: str | None = None
        self._threads = [threading.Thread(target=self._slot, name=f"big-worker-{i}", daemon=True)
                         for i in range(slots)]
        self._threads.append(threading.Thread(target=self._heartbeat, name="big-heartbeat", daemon=True))
        for t in self._threads:
            t.start()

    def close(self, timeout: float = 0.0) -> None:
        """Stop claiming; the jobs still running keep their leases until their threads end (or the process)."""
        self._closed.set()
        for t in self._threads:
            t.join(timeout)

    def keep_alive_file(self, path: str) -> None:
        """Touch `path` at every heartbeat: a frozen or hung process stops touching it, which a liveness probe
        (deploy/k8s/worker.yml) reads as a worker to restart."""
        self._alive_file = path

    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    # ------------------------------------------------------------------ loops
    def _slot(self) -> None:
        while not self._closed.is_set():
            try:
                self._expire()
                job = self.registry.claim_job(self.id, self.lease_s)
            except Exception:  # noqa: BLE001 - the database went away for a moment: try again
                log.exception("worker %s: could not claim a job", self.id)
                job = None
            if job is None:
                self._closed.wait(self.poll_s)
                continue
            # Each job runs on a thread of its own that ends with the job. On a CPU, torch's OpenMP team
            # belongs to the calling thread and lives as long as that thread does; an idle team left behind
            # by a long-lived worker slows every later /generate (docs/benchmarks.md, "Service").
            runner = threading.Thread(target=self._run, args=(job,), name=f"big-job-{job['job_id'][:8]}", daemon=True)
            runner.start()
            runner.join()

    def _expire(self) -> None:
        if time.time() - self.registry.last_failure < self.lease_s:
            # The database answers again only since moments ago: the workers that hold leases have not had a
            # lease's time to renew them, and an outage is no worker's death.
            return
        for job, status in self.registry.expire_leases(self.max_attempts):
            log.warning("job %s: the lease of worker %s passed (attempt %d): %s", job["job_id"], job["worker"],
                        job["attempts"], status)
            if status in JOB_DONE:
                self.discard(job)

    def _heartbeat(self) -> None:
        while not self._closed.wait(max(self.lease_s / 4, 0.2)) or self.running():
            if self._alive_file:
                with contextlib.suppress(OSError):  # a probe that cannot read it restarts the worker: its call
                    with open(self._alive_file, "a"):
                        os.utime(self._alive_file)
            for job_id in self.running():
                try:
                    held, cancel = self.registry.renew_lease(job_id, self.id, self.lease_s)
                except Exception:  # noqa: BLE001 - keep beating; the lease is what tells others
                    log.exception("job %s: could not renew its lease", job_id)
                    continue
                with self._lock:
                    if job_id in self._running:
                        self._running[job_id].update(lost=not held, cancel=cancel)
            if self._closed.is_set():
                time.sleep(0.2)

    def _run(self, job: dict) -> None:
        # The job's thread waits out a database that does not answer for as long as JOB_PATIENCE_S: no other worker
        # takes the job over meanwhile (leases are not expired until the database has answered for a whole
        # lease), and a job that trained must not fail at its commit or its end for an outage.
        with self.registry.patience(JOB_PATIENCE_S):
            self._run_patiently(job)

    def _run_patiently(self, job: dict) -> None:
        job_id = job["job_id"]
        with self._lock:
            state = self._running[job_id] = {"lost": False, "cancel": bool(job["cancel_requested"])}
        if self.threads:
            # This thread's own OpenMP team (the serving thread keeps its own): beside an idle serving team,
            # one thread trains faster than torch's default on a small CPU (docs/benchmarks.md, "Service").
            import torch

            torch.set_num_threads(self.threads)
        ended = False
        ctx = JobContext(self.registry, job, lambda: state["lost"] or state["cancel"], self.id)
        try:
            if job["attempts"] > 1:
                self.before_rerun(job)
            if state["cancel"]:
                raise JobCancelled("cancelled before it started")
            failpoints.reached("claimed", job_id)
            result = self.runner(ctx, job)
            failpoints.reached("committed", job_id)
            ended = (self.registry.end_job(job_id, self.id, "succeeded", step=job["total_steps"],
                                           seconds=ctx.seconds.encoded(), **result)
                     or self.registry.job_is(job_id, self.id, "succeeded"))  # its version's commit ended it
            if not ended:
                raise LeaseLost(job_id)
        except LeaseLost:
            log.warning("job %s: its lease passed to another worker; this run's work is dropped", job_id)
        except VersionMovedOn as e:
            # An /admin action committed the model's next version meanwhile: train again from that one.
            log.warning("job %s: %s; queued again", job_id, e)
            self.registry.requeue_job(job_id, self.id)
        except JobCancelled as e:
            if state["lost"]:
                log.warning("job %s: its lease passed to another worker; this run stopped training", job_id)
            else:
                ended = self.registry.end_job(job_id, self.id, "cancelled", error=_message(e), error_code=e.code,
                                              seconds=ctx.seconds.encoded())
        except BIGError as e:
            ended = self.registry.end_job(job_id, self.id, "failed", error=_message(e), error_code=e.code,
                                          seconds=ctx.seconds.encoded())
        except Exception as e:  # a crash in training must not take the worker down
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            ended = self.registry.end_job(job_id, self.id, "failed", error=f"{type(e).__name__}: {e}",
                                          seconds=ctx.seconds.encoded())
        finally:
            with self._lock:
                self._running.pop(job_id, None)
        if ended:
            self.discard(job)


def _message(e: BIGError) -> str:
    return str(e.args[0]) if e.args else ""


VIEW_FIELDS = ("job_id", "status", "step", "total_steps", "loss", "eta_s", "error", "identifier", "category",
               "target", "model_version", "concept_id")


def job_view(job: dict) -> dict:
    """What a client sees of a job; an error reads "[code] message" as the client's own errors do; `seconds`:
    where an ended job's time went (`JobSeconds.view`)."""
    view = {k: job.get(k) for k in VIEW_FIELDS}
    view["seconds"] = JobSeconds.view(job)
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
