"""The durable job queue and the registry on both backends: claims, the one writer per model key, leases that
pass when a worker dies, cancellation from any replica, and the worker loop itself."""
import os
import threading
import time

import pytest

from big.errors import JobCancelled
from big.jobs import JOB_STAGES, JobQueue, JobWorker, job_view
from big.storage.registry import LeaseLost, Registry, RequestSeen


@pytest.fixture
def registry(database_url, tmp_path):
    reg = Registry(database_url, root=str(tmp_path))
    yield reg
    reg.close()


def _job(reg, owner="u", key="meta"):
    return reg.create_job(owner, "meta" if key == "meta" else "private", "dog", 10, {}, model_key=key)


def test_one_running_job_per_model_key_and_other_keys_in_parallel(registry):
    a, b = _job(registry), _job(registry, owner="v")
    c = _job(registry, key="private:c")
    first = registry.claim_job("w1", 30)
    assert first["job_id"] == a and first["status"] == "running" and first["attempts"] == 1
    second = registry.claim_job("w2", 30)
    assert second["job_id"] == c  # b waits: meta has its writer
    assert registry.claim_job("w3", 30) is None
    assert registry.end_job(a, "w1", "succeeded")
    assert registry.claim_job("w3", 30)["job_id"] == b


def test_a_users_job_cap_holds_across_replicas_sending_at_once(registry, database_url, tmp_path):
    import concurrent.futures

    from big.errors import QuotaExceeded

    replicas = [registry, Registry(database_url, root=str(tmp_path))]

    def send(i):
        try:
            return replicas[i % 2].create_job("u", "private", "dog", 10, {}, model_key=f"private:{i}", max_active=3)
        except QuotaExceeded:
            return None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        admitted = [j for j in pool.map(send, range(8)) if j]
    assert len(admitted) == 3 and registry.count_jobs("u") == 3
    replicas[1].close()


def test_users_with_nothing_running_go_first(registry):
    registry.create_job("busy", "private", "dog", 10, {}, model_key="private:1")
    registry.create_job("busy", "private", "dog", 10, {}, model_key="private:2")
    later = registry.create_job("quiet", "private", "dog", 10, {}, model_key="private:3")
    registry.claim_job("w1", 30)  # busy's first
    assert registry.claim_job("w2", 30)["job_id"] == later


def test_a_dead_workers_job_is_run_again_and_the_dead_worker_can_no_longer_write(registry):
    job = _job(registry)
    registry.ensure_model("meta", "meta", None, "base")
    registry.claim_job("dead", 0.2)
    time.sleep(0.3)
    assert [(j["job_id"], now) for j, now in registry.expire_leases(max_attempts=3)] == [(job, "queued")]
    taken = registry.claim_job("alive", 30)
    assert taken["job_id"] == job and taken["attempts"] == 2
    assert not registry.end_job(job, "dead", "failed", error="late")  # the zombie's word counts for nothing
    with pytest.raises(LeaseLost):
        registry.commit_version("meta", 1, "models/x", job, None, worker="dead")
    registry.commit_version("meta", 1, "models/x", job, None, worker="alive")
    assert registry.get_model("meta")["current_version"] == 1


def test_a_versions_commit_ends_its_job_in_the_same_transaction(registry):
    """No moment has a job's version committed and the job still running: a worker frozen or killed right after
    the commit leaves nothing for a lease's expiry to queue again (issue 45: committed, then failed)."""
    job = _job(registry)
    registry.ensure_model("meta", "meta", None, "base")
    registry.claim_job("w", 0.2)
    registry.commit_version("meta", 1, "models/x", job, None, worker="w",
                            job_result={"identifier": "sks", "model_version": 1, "loss": 0.25})
    ended = registry.get_job(job)
    assert (ended["status"], ended["identifier"], ended["model_version"], ended["step"]) == ("succeeded", "sks", 1, 10)
    time.sleep(0.3)  # the worker stops here: its lease would have passed
    assert registry.expire_leases(max_attempts=3) == [] and registry.get_job(job)["status"] == "succeeded"
    assert registry.job_is(job, "w", "succeeded") and not registry.end_job(job, "w", "failed", error="late")


def test_a_worker_whose_runner_committed_its_version_ends_the_job_once(registry):
    registry.ensure_model("meta", "meta", None, "base")

    def runner(ctx, job):
        registry.commit_version("meta", 1, "models/x", ctx.job_id, None, worker=ctx.worker,
                                job_result={"identifier": "sks", "model_version": 1})
        return {"identifier": "sks", "model_version": 1}

    discarded = []
    worker = JobWorker(registry, runner, poll_s=0.05, discard=lambda job: discarded.append(job["job_id"]))
    job = _job(registry)
    assert JobQueue(registry, poll_s=0.05).wait(job, timeout=30)["status"] == "succeeded"
    worker.close(timeout=5)
    assert discarded == [job]  # its inputs dropped once, as for any ended job


def test_an_ended_job_says_where_its_seconds_went_succeeded_or_failed(registry):
    def runner(ctx, job):
        with ctx.timed("load"):
            time.sleep(0.01)
        with ctx.timed("train"):
            time.sleep(0.02)
            if job["category"] == "broken":
                raise RuntimeError("simulated crash")
        return {"identifier": "sks"}

    worker = JobWorker(registry, runner, poll_s=0.05)
    ok = _job(registry)
    broken = registry.create_job("u", "private", "broken", 10, {}, model_key="private:b")
    queue = JobQueue(registry, poll_s=0.05)
    assert registry.get_job(ok)["seconds"] is None  # not ended yet
    views = {job: job_view(queue.wait(job, timeout=30)) for job in (ok, broken)}
    worker.close(timeout=5)
    assert [views[ok]["status"], views[broken]["status"]] == ["succeeded", "failed"]
    for view in views.values():
        seconds = view["seconds"]
        assert list(seconds) == [*JOB_STAGES, "total"]
        assert seconds["load"] >= 0.01 and seconds["train"] >= 0.02 and seconds["commit"] == 0.0
        assert seconds["total"] >= sum(seconds[s] for s in JOB_STAGES) - 0.01  # the stages are parts of it


def test_a_request_key_gives_a_retry_the_first_tries_job_until_it_expires(registry):
    first = registry.create_job("u", "private", "dog", 10, {}, model_key="private:a", request_key=("k1", "h", 60))
    with pytest.raises(RequestSeen) as seen:
        registry.create_job("u", "private", "dog", 10, {}, model_key="private:b", request_key=("k1", "h", 60))
    assert (seen.value.answer, seen.value.same) == (first, True)
    with pytest.raises(RequestSeen) as seen:  # the same key for another request: told apart by its hash
        registry.seen_request("u", "k1", "other", 60)
    assert (seen.value.answer, seen.value.same) == (first, False)
    registry.seen_request("v", "k1", "h", 60)  # keys are each user's own
    other = registry.create_job("v", "private", "dog", 10, {}, model_key="private:c", request_key=("k1", "h", 60))
    assert other != first
    time.sleep(0.05)
    again = registry.create_job("u", "private", "dog", 10, {}, model_key="private:d", request_key=("k1", "h", 0.01))
    assert again not in (first, other)  # past its time to live the key names a new request
    assert registry.count_jobs("u") == 2


def test_two_replicas_sending_one_keyed_request_at_once_queue_one_job(registry, database_url, tmp_path):
    replicas = [Registry(database_url, root=str(tmp_path)) for _ in range(4)]
    barrier, outcomes = threading.Barrier(len(replicas)), []

    def send(reg):
        barrier.wait()
        try:
            outcomes.append(("queued", reg.create_job("u", "private", "dog", 10, {}, model_key=f"private:{id(reg)}",
                                                      request_key=("same", "h", 60))))
        except RequestSeen as seen:
            outcomes.append(("seen", seen.answer))

    threads = [threading.Thread(target=send, args=(reg,)) for reg in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for reg in replicas:
        reg.close()
    assert sorted(kind for kind, _ in outcomes) == ["queued", "seen", "seen", "seen"]
    assert len({job for _, job in outcomes}) == 1 and registry.count_jobs("u") == 1


def test_a_job_whose_workers_keep_dying_fails_with_the_reason(registry):
    job = _job(registry)
    for attempt in range(2):
        registry.claim_job(f"w{attempt}", 0.05)
        time.sleep(0.1)
        registry.expire_leases(max_attempts=2)
    ended = registry.get_job(job)
    assert ended["status"] == "failed" and ended["error_code"] == "worker_lost" and ended["eta_s"] == 0.0


def test_cancel_from_any_replica(registry, database_url, tmp_path):
    other_replica = Registry(database_url, root=str(tmp_path))
    queued, running = _job(registry, key="private:a"), _job(registry, key="private:b")
    registry.claim_job("w", 30)  # takes `queued`: the older one
    JobQueue(other_replica).cancel(running)
    assert registry.get_job(running)["status"] == "cancelled"  # never ran
    JobQueue(other_replica).cancel(queued)
    assert registry.renew_lease(queued, "w", 30) == (True, True)  # the worker hears it at its next heartbeat
    other_replica.close()


def test_a_worker_runs_jobs_and_stops_one_cancelled_elsewhere(registry, database_url, tmp_path):
    started = threading.Event()

    def runner(ctx, job):
        if job["category"] == "slow":
            started.set()
            while not ctx.should_stop():
                time.sleep(0.05)
            raise JobCancelled("training cancelled")
        ctx.progress(10, 0.5)
        return {"identifier": "sks"}

    discarded = []
    worker = JobWorker(registry, runner, lease_s=2, poll_s=0.05, discard=lambda job: discarded.append(job["job_id"]))
    quick = registry.create_job("u", "private", "dog", 10, {}, model_key="private:q")
    slow = registry.create_job("u", "private", "slow", 10, {}, model_key="private:s")
    queue = JobQueue(Registry(database_url, root=str(tmp_path)), poll_s=0.05)
    assert queue.wait(quick, timeout=30)["status"] == "succeeded"
    assert registry.get_job(quick)["identifier"] == "sks"
    assert started.wait(30)
    queue.cancel(slow)
    ended = queue.wait(slow, timeout=30)
    assert ended["status"] == "cancelled" and ended["error_code"] == "cancelled"
    assert sorted(discarded) == sorted([quick, slow])
    worker.close(timeout=5)


def test_a_job_whose_model_moved_on_is_run_again_not_failed(registry):
    """An /admin retire or restore commits the metamodel's next version while a job trains it: the job is queued
    again and trains from the new version."""
    from big.storage.registry import VersionMovedOn

    runs = []

    def runner(ctx, job):
        runs.append(job["attempts"])
        if len(runs) == 1:
            raise VersionMovedOn("model meta moved on while training (now v2)")
        return {}

    worker = JobWorker(registry, runner, poll_s=0.05)
    job_id = _job(registry)
    assert JobQueue(registry, poll_s=0.05).wait(job_id, timeout=30)["status"] == "succeeded"
    assert runs == [1, 2]
    worker.close(timeout=5)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_job_runs_with_the_configured_torch_threads_and_the_caller_keeps_its_own(tmp_path, threads):
    import torch

    reg = Registry(str(tmp_path / "registry.sqlite"))
    caller = torch.get_num_threads()
    seen = {}

    def job(ctx, row):
        seen["threads"] = torch.get_num_threads()
        return {}

    worker = JobWorker(reg, job, threads=threads, poll_s=0.05)
    job_id = reg.create_job("u", "meta", "shape", 1, {}, model_key="meta")
    assert JobQueue(reg, poll_s=0.05).wait(job_id, timeout=30)["status"] == "succeeded"
    assert seen["threads"] == threads
    assert torch.get_num_threads() == caller
    worker.close(timeout=5)


def test_a_workspace_from_before_alembic_upgrades_in_place(tmp_path):
    """The SQLite registry as BIG wrote it before (no error_code yet, no alembic_version): opened, migrated,
    its data kept; a job it left queued, whose images lived in memory, failed with the reason."""
    import sqlite3

    path = tmp_path / "registry.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
    CREATE TABLE models (model_key TEXT PRIMARY KEY, kind TEXT NOT NULL, owner TEXT, base TEXT NOT NULL,
        current_version INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
    CREATE TABLE model_versions (model_key TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL,
        job_id TEXT, created REAL NOT NULL, PRIMARY KEY (model_key, version));
    CREATE TABLE concepts (concept_id TEXT PRIMARY KEY, model_key TEXT NOT NULL, owner TEXT NOT NULL,
        target TEXT NOT NULL, identifier TEXT NOT NULL, category TEXT NOT NULL, version INTEGER NOT NULL,
        n_images INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'active', created REAL NOT NULL, params TEXT,
        UNIQUE (model_key, identifier));
    CREATE TABLE jobs (job_id TEXT PRIMARY KEY, owner TEXT NOT NULL, target TEXT NOT NULL, category TEXT NOT NULL,
        status TEXT NOT NULL, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL, loss REAL, eta_s REAL,
        error TEXT, concept_id TEXT, identifier TEXT, model_version INTEGER, created REAL NOT NULL, started REAL,
        finished REAL, params TEXT, cancel_requested INTEGER DEFAULT 0);
    INSERT INTO models VALUES ('meta', 'meta', NULL, 'base', 1, 0);
    INSERT INTO model_versions VALUES ('meta', 1, '/old/machine/workspace/models/abc/v0001', 'j0', 0);
    INSERT INTO jobs (job_id, owner, target, category, status, total_steps, created, error)
        VALUES ('j1', 'u', 'meta', 'dog', 'failed', 10, 0, '[bad_request] no'),
               ('j2', 'u', 'meta', 'dog', 'queued', 10, 1, NULL);
    """)
    db.commit()
    db.close()
    reg = Registry(str(path))
    assert reg.get_model("meta")["current_version"] == 1
    assert reg.version_path("meta", 1) == str(tmp_path / "models/abc/v0001")  # the store moved: paths follow
    old = reg.get_job("j1")
    assert (old["error_code"], old["error"]) == ("bad_request", "no")
    assert reg.get_job("j2")["status"] == "failed" and "send it again" in reg.get_job("j2")["error"]
    with reg.engine.connect() as conn:
        import sqlalchemy as sa

        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0004"
    assert old["seconds"] is None  # ended before jobs recorded where their seconds went
    Registry(str(path)).close()  # opening again changes nothing
    reg.close()


def test_the_wire_document_of_a_jobs_seconds_has_every_stage_in_order():
    from executor.documents import JobSecondsDoc

    assert [f for f in JobSecondsDoc.__fields__ if f != "id"] == [*JOB_STAGES, "total"]


def test_failpoints_are_named_points_and_a_misspelt_one_is_refused_by_name():
    from big import failpoints

    assert failpoints.parse("") == {} and failpoints.parse("trained=stop, published=stop") == {
        "trained": "stop", "published": "stop"}
    for wrong in ("traned=stop", "trained=kill", "trained"):
        with pytest.raises(ValueError, match=wrong.split("=")[0]):
            failpoints.parse(wrong)
    failpoints.reached("trained")  # none set in this process: nothing happens


def test_a_workers_alive_file_is_touched_at_every_heartbeat_and_the_kubernetes_probe_reads_its_age(registry, tmp_path):
    import subprocess

    import yaml

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "deploy", "k8s", "worker.yml")) as f:
        (container,) = yaml.safe_load(f)["spec"]["template"]["spec"]["containers"]
    alive = str(tmp_path / "big-worker.alive")
    assert container["command"][-2:] == ["--alive-file", "/tmp/big-worker.alive"]
    probe = [part.replace("/tmp/big-worker.alive", alive) for part in container["livenessProbe"]["exec"]["command"]]
    worker = JobWorker(registry, lambda ctx, job: {}, lease_s=0.8, poll_s=0.05)
    worker.keep_alive_file(alive)
    deadline = time.time() + 10
    while not os.path.exists(alive):
        assert time.time() < deadline
        time.sleep(0.05)
    assert subprocess.run(probe).returncode == 0  # beating: alive
    worker.close(timeout=5)
    long_ago = time.time() - 120
    os.utime(alive, (long_ago, long_ago))  # as a process frozen for two minutes leaves it
    assert subprocess.run(probe).returncode != 0
