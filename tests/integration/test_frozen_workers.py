"""Training workers (`python -m big.worker`) frozen with SIGSTOP at each point of a job's life, on PostgreSQL and on
SQLite: the lease passes to a healthy worker, which finishes the job; then the frozen ones wake (SIGCONT) and must
write nothing. Each job succeeds once, with one concept whose committed files are all there and unchanged."""
import hashlib
import os
import re
import signal
import time

import psutil
import pytest

from benchmarks import harness
from conftest import BASE_MODEL, postgres_database
from big import failpoints
from big.jobs import JOB_DONE, JobQueue
from big.storage.registry import Registry
from executor.flow_process import WorkerProcess

LEASE_S = 3
JOB = {"category": "shape", "target_model": "private", "max_train_steps": 8, "num_class_images": 4, "wait": False}


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request, tmp_path):
    if request.param == "sqlite":  # the store's own registry file, shared by every process as a cluster's
        yield f"sqlite:///{tmp_path / 'store' / 'registry.sqlite'}"
    else:
        yield from postgres_database("big_frozen")


def files_of(folder: str) -> dict:
    """Every file under `folder` (relative path -> sha256)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def stopped(worker: WorkerProcess) -> bool:
    return psutil.Process(worker.proc.pid).status() == psutil.STATUS_STOPPED


def test_a_worker_frozen_at_any_point_of_a_job_leaves_one_concept_whole_and_the_job_succeeded(tmp_path, database):
    store = str(tmp_path / "store")
    env = {"BIG_BASE_MODEL": BASE_MODEL, "BIG_WORKSPACE": store, "BIG_DATABASE_URL": database,
           "BIG_AUTH_MODE": "disabled", "JINA_LOG_LEVEL": "ERROR"}
    svc = harness.service(store, role="serve", database_url=database, base_model=BASE_MODEL)  # as a replica queues
    registry = Registry(database, root=store)
    svc.prior_class_images("shape", JOB["num_class_images"])  # shared, as one service's are: no frozen worker makes them
    # One worker per point, one job slot each: every job passes every point, so each freezes on the job it claims.
    frozen = {point: WorkerProcess(str(tmp_path / "workers"), env={**env, "BIG_FAILPOINTS": f"{point}=stop"},
                                   args=("--threads", "1", "--lease", str(LEASE_S)))
              for point in failpoints.POINTS}
    healthy = None
    try:
        for w in frozen.values():
            w.wait_ready(timeout=240)
        # Queued once every worker is looking for work, so all five are claimed at once: a worker still looking
        # when another had been frozen for a lease would take that one's job over.
        jobs = [svc.submit_finetune(f"user{i}", harness.instance_images(5, seed=i), JOB)[0]
                for i in range(len(failpoints.POINTS))]
        deadline = time.time() + 300
        while not all(stopped(w) for w in frozen.values()):
            for point, w in frozen.items():
                assert w.proc.poll() is None, f"the worker for {point} exited:\n{w.log_tail()}"
            assert time.time() < deadline, {p: w.log_tail(500) for p, w in frozen.items() if not stopped(w)}
            time.sleep(0.2)
        holder = {registry.get_job(j)["worker"]: j for j in jobs}
        job_at = {point: next(j for wid, j in holder.items() if f":{w.proc.pid}:" in wid) for point, w in frozen.items()}
        assert len(set(job_at.values())) == len(jobs)
        assert registry.get_job(job_at["committed"])["status"] == "succeeded"

        healthy = WorkerProcess(str(tmp_path / "workers"), env=env, args=("--threads", "1", "--lease", str(LEASE_S)))
        queue = JobQueue(registry, poll_s=0.2)
        ended = {point: queue.wait(job, timeout=300) for point, job in job_at.items()}
        assert all(j["status"] in JOB_DONE for j in ended.values()), {p: j["status"] for p, j in ended.items()}
        committed = {point: files_of(registry.version_path(f"private:{j['concept_id']}", 1))
                     for point, j in ended.items() if j["status"] == "succeeded"}

        for w in frozen.values():  # the frozen workers wake, long after their leases passed
            w.proc.send_signal(signal.SIGCONT)
        woken = time.time()
        for point, w in frozen.items():
            if point == "committed":
                continue  # its job was ended by its own commit: nothing is left for it to do
            while not re.search(rf"job {job_at[point]}: its lease passed to another worker", w.log_tail(100_000)):
                assert time.time() - woken < 120, f"the worker woken at {point} said nothing:\n{w.log_tail()}"
                time.sleep(0.2)
    finally:
        for w in [*frozen.values(), *([healthy] if healthy else [])]:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGCONT)
            w.stop()
        svc.close()

    final = {point: registry.get_job(job) for point, job in job_at.items()}
    print("\n" + "\n".join(f"frozen at {p}: {j['status']}, attempt {j['attempts']}" for p, j in final.items()))
    for point, job in final.items():
        assert job["status"] == "succeeded", (point, job["status"], job["error"])
        assert job["attempts"] == (1 if point == "committed" else 2), (point, job["attempts"])
        concepts = registry.list_concepts(owner=job["owner"])
        assert [c["concept_id"] for c in concepts] == [job["concept_id"]], point  # one concept per /finetune
        assert files_of(registry.version_path(f"private:{job['concept_id']}", 1)) == committed[point], point  # no file lost or rewritten
        assert len(os.listdir(svc.ws.instance_dir(job["concept_id"]))) == 5, point
    # Nothing half-written is left: every version folder is a committed version's, and staging is empty.
    live = registry.live_version_paths()
    models = os.path.join(store, "models")
    assert {os.path.join(models, m, v) for m in os.listdir(models) for v in os.listdir(os.path.join(models, m))} == live
    assert os.listdir(os.path.join(store, "tmp")) == []
    registry.close()
