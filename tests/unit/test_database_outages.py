"""The registry and the job queue on a real PostgreSQL that goes away: its connections terminated over and over
(`pg_terminate_backend`, what a restart or failover does to them), or the database refusing every connection for
seconds. A job rides it out on its first attempt, a waiting client keeps waiting, and a call that cannot be
answered raises the documented Unavailable, with no driver text and no address."""
import contextlib
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from benchmarks.harness import POSTGRES_ADMIN_URL
from conftest import terminate_connections as terminate_all
from big.errors import Unavailable
from big.jobs import JobQueue, JobWorker
from big.storage.registry import Registry


@pytest.fixture
def admin(postgres_url):
    """(the admin engine, the test database's name)."""
    engine = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    yield engine, make_url(postgres_url).database
    engine.dispose()


def terminate_connections(admin) -> int:
    return terminate_all(*admin)


@contextlib.contextmanager
def database_refusing_connections(admin):
    """The database takes no connection and has none, as while its server restarts; it answers again after."""
    engine, db = admin
    with engine.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false'))
    terminate_connections(admin)
    try:
        yield
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true'))


def long_runner(seconds: float, ended: list | None = None):
    def runner(ctx, job):
        end, step = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            step += 1
            ctx.progress(step, 0.1)
            time.sleep(0.05)
        if ended is not None:
            ended.append(time.monotonic())
        return {"identifier": "sks"}
    return runner


def test_a_job_rides_out_connections_terminated_ten_times_a_second_on_its_first_attempt(postgres_url, admin, tmp_path):
    registry = Registry(postgres_url, root=str(tmp_path))
    worker = JobWorker(registry, long_runner(4.0), lease_s=2.0, poll_s=0.05)
    job = registry.create_job("u", "private", "dog", 10, {}, model_key="private:a")
    while registry.get_job(job)["status"] == "queued":
        time.sleep(0.05)
    end, terminated = time.monotonic() + 3.0, 0
    while time.monotonic() < end:
        terminated += terminate_connections(admin)
        assert registry.get_job(job)["owner"] == "u"  # a replica's reads go on meanwhile
        time.sleep(0.1)
    ended = JobQueue(registry, poll_s=0.05).wait(job, timeout=60)
    worker.close(timeout=5)
    registry.close()
    assert terminated > 10
    assert (ended["status"], ended["attempts"]) == ("succeeded", 1)


def test_an_outage_longer_than_a_lease_is_no_workers_death_and_a_waiting_client_waits(postgres_url, admin, tmp_path):
    owner_side, other_side = (Registry(postgres_url, root=str(tmp_path)) for _ in range(2))
    trained = []
    worker = JobWorker(owner_side, long_runner(9.0, trained), lease_s=4.0, poll_s=0.05)
    job = owner_side.create_job("u", "private", "dog", 10, {}, model_key="private:a")
    while owner_side.get_job(job)["status"] == "queued":
        time.sleep(0.05)
    assert owner_side.get_job(job)["worker"] == worker.id
    # Another machine's worker, expiring leases; started once the job is claimed, or it could claim the job itself
    # (and end it at once: this test then waited for a training that never ran).
    other = JobWorker(other_side, lambda ctx, job: {}, lease_s=4.0, poll_s=0.05)
    time.sleep(4.5)  # both workers have seen the database answer for a whole lease
    queue = JobQueue(other_side)
    with database_refusing_connections(admin):
        t = time.monotonic()
        with pytest.raises(Unavailable) as refused:
            other_side.get_job(job)
        retried_s = time.monotonic() - t
        assert queue.poll(job)[0] is False  # a client waiting for the job keeps waiting
        time.sleep(max(0.0, 6.0 - (time.monotonic() - t)))  # longer than the lease
        deadline = time.monotonic() + 30
        while not trained and time.monotonic() < deadline:  # the job ends while the database is away
            time.sleep(0.1)
        assert trained, "the job did not train to its end"
        assert trained[0] > t  # it trained on into the outage
        time.sleep(6.0)  # and its end waits longer than a registry call's own retries
        outage_end = time.monotonic()
    ended = queue.wait(job, timeout=60)
    worker.close(timeout=5)
    other.close(timeout=5)
    owner_side.close()
    other_side.close()
    message = str(refused.value)
    assert message == "[unavailable] the registry is not answering; nothing was changed, try again in a few seconds"
    assert refused.value.__cause__ is None and refused.value.__suppress_context__  # no driver text follows it
    assert retried_s > 3.0
    assert (ended["status"], ended["attempts"]) == ("succeeded", 1)
    assert trained[0] < outage_end
