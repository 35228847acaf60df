"""The registry: users' models and their versions, concepts, and the durable job queue, in one database shared by
every serving replica and training worker. SQLite (a file in the workspace) by default, PostgreSQL in a cluster
(`BIG_DATABASE_URL=postgresql+psycopg://...`); the schema is `storage.schema`, brought up to date by Alembic when
the registry opens.

A model version becomes current in the same transaction that records the concept it added, and only while the
job that made it still holds its lease, so the served state is always a version that was completely written by
the one writer of its key.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy import delete, event, func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from big.errors import QuotaExceeded, Unavailable
from big.storage.schema import concepts, jobs, model_versions, models, request_keys

log = logging.getLogger(__name__)

JOB_DONE = ("succeeded", "failed", "cancelled")
# How long a registry call retries a database that does not answer (a restart, a failover, a terminated
# connection) before it raises Unavailable: the waits between tries, in seconds.
RETRY_WAITS_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0)
JOB_ACTIVE = ("queued", "running")
# A key for PostgreSQL's advisory lock that serialises migrations of replicas that start at once.
_MIGRATION_LOCK = 0x6269670001


class LeaseLost(RuntimeError):
    """The job's lease passed to another worker (this one stalled past it): what it made is not committed."""


class RequestSeen(RuntimeError):
    """A request with this idempotency key was accepted before (within its time to live): `answer` is what it made
    (a /finetune's job id, an /import's concept id); `same` says whether it was the same request (else another one
    reused the key)."""

    def __init__(self, answer: str, same: bool):
        super().__init__(answer)
        self.answer, self.same = answer, same


class VersionMovedOn(RuntimeError):
    """Another writer (an /admin retire or restore of the metamodel) committed the version this one was making."""


def sqlite_url(path: str) -> str:
    return f"sqlite:///{os.path.abspath(path)}"


def make_engine(url: str) -> sa.Engine:
    if not url.startswith("sqlite"):
        # Named in pg_stat_activity by host and process, so an operator (and a fault test) sees whose each
        # connection is.
        return sa.create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8,
                                connect_args={"application_name": f"big {socket.gethostname()}:{os.getpid()}"[:63]})
    engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        # sqlite3's own transaction handling is off: every transaction below starts with BEGIN IMMEDIATE, so two
        # processes' writers queue on the database lock instead of failing to upgrade a read lock.
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=FULL")

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def upgrade(engine: sa.Engine) -> None:
    """Bring the database to the newest schema (Alembic), one process at a time."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", os.path.join(os.path.dirname(__file__), "migrations"))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _dicts(result) -> list[dict]:
    return [dict(r) for r in result.mappings().all()]


def _unreachable(e: Exception) -> bool:
    """A database that did not answer (connection refused, terminated, reset, or SQLite's lock held too long),
    as opposed to a statement the database refused (an IntegrityError is an answer)."""
    return isinstance(e, (OperationalError, InterfaceError)) or (isinstance(e, DBAPIError) and e.connection_invalidated)


def _record_request(conn, owner: str, request_key: tuple[str, str, float], answer: str) -> None:
    """In the transaction that makes `answer` (a job, a concept): record the owner's idempotency key (key, request
    hash, time to live) for it, dropping the owner's expired keys; RequestSeen if the key already holds an answer
    (two replicas racing with one request: the second insert is the primary key's IntegrityError)."""
    key, request_hash, ttl_s = request_key
    now = time.time()
    conn.execute(delete(request_keys).where(request_keys.c.owner == owner, request_keys.c.created < now - ttl_s))
    row = conn.execute(select(request_keys.c.answer, request_keys.c.request_hash).where(
        request_keys.c.owner == owner, request_keys.c.request_key == key)).first()
    if row is not None:
        raise RequestSeen(row[0], row[1] == request_hash)
    conn.execute(request_keys.insert().values(owner=owner, request_key=key, request_hash=request_hash,
                                              answer=answer, created=now))


_patience = threading.local()  # this thread's `Registry.patience`


def _riding_out_blips(method):
    """Retry a registry call while the database does not answer; each call is whole transactions, so a try that
    failed wrote nothing (a commit whose answer was lost is recognised by the callers: see commit_version). How
    long: RETRY_WAITS_S, or what the calling thread set with `Registry.patience`."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        patience = getattr(_patience, "seconds", None)
        waits = () if patience == 0 else RETRY_WAITS_S
        start, tries = time.monotonic(), 0
        while True:
            tries += 1
            try:
                return method(self, *args, **kwargs)
            except DBAPIError as e:
                if not _unreachable(e):
                    raise
                self.last_failure = time.time()
                wait = waits[tries - 1] if tries <= len(waits) else None
                if wait is None and patience and time.monotonic() - start < patience:
                    wait = waits[-1] if waits else 1.0
                if wait is None:
                    log.error("registry: %s failed after %d tries: %s", method.__name__, tries, e)
                    raise Unavailable("the registry is not answering; nothing was changed, try again in a few "
                                      "seconds") from None
                log.warning("registry: %s: the database did not answer (%s); trying again in %.2f s",
                            method.__name__, type(e.orig or e).__name__, wait)
                time.sleep(wait)
    return call


class Registry:
    def __init__(self, url: str, root: str | None = None):
        """`url`: a SQLAlchemy URL (or a SQLite file's path); `root`: the store's root, that version paths are
        kept relative to (so a shared volume may be mounted anywhere)."""
        if "://" not in url:
            url = sqlite_url(url)
        self.url = url
        self.root = os.path.abspath(root or os.path.dirname(url.split(":///", 1)[-1]))
        self.engine = make_engine(url)
        upgrade(self.engine)
        # When a call last found the database not answering: leases are not expired until it has answered for a
        # whole lease (JobWorker), so an outage longer than a lease does not count as every worker's death.
        self.last_failure = time.time()

    @staticmethod
    @contextlib.contextmanager
    def patience(seconds: float):
        """How long this thread's registry calls ride out a database that does not answer, inside the block:
        0 fails at once (a write that may be skipped), more than RETRY_WAITS_S' sum keeps trying that long (a
        training job's end, which no other worker takes over while the database is away)."""
        before = getattr(_patience, "seconds", None)
        _patience.seconds = seconds
        try:
            yield
        finally:
            _patience.seconds = before

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def _all(self, stmt) -> list[dict]:
        with self.engine.begin() as conn:
            return _dicts(conn.execute(stmt))

    def _one(self, stmt) -> dict | None:
        rows = self._all(stmt)
        return rows[0] if rows else None

    def _write(self, stmt) -> int:
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount

    def _insert_ignore(self, table, values: dict):
        if self.backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table).values(**values).on_conflict_do_nothing()

    def _stored_path(self, path: str) -> str:
        rel = os.path.relpath(path, self.root)
        return path if rel.startswith("..") else rel

    def _full_path(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self.root, path)

    # ------------------------------------------------------------------ models
    def ensure_model(self, model_key: str, kind: str, owner: str | None, base: str) -> dict:
        with self.engine.begin() as conn:
            conn.execute(self._insert_ignore(models, dict(model_key=model_key, kind=kind, owner=owner, base=base,
                                                          current_version=0, created=time.time())))
            return _dicts(conn.execute(select(models).where(models.c.model_key == model_key)))[0]

    def get_model(self, model_key: str) -> dict | None:
        return self._one(select(models).where(models.c.model_key == model_key))

    def version_path(self, model_key: str, version: int) -> str | None:
        row = self._one(select(model_versions.c.path).where(model_versions.c.model_key == model_key,
                                                            model_versions.c.version == version))
        return self._full_path(row["path"]) if row else None

    def live_version_paths(self) -> set[str]:
        return {self._full_path(r["path"]) for r in self._all(select(model_versions.c.path))}

    def commit_version(self, model_key: str, version: int, path: str, job_id: str | None,
                       concept: dict | None, concept_status: tuple[str, str] | None = None,
                       worker: str | None = None, job_result: dict | None = None,
                       request_key: tuple[str, str, float] | None = None) -> None:
        """Record a finished version and its concept (or, `concept_status` = (concept id, status), an earlier
        concept's new status), and make it current: one transaction. With `worker`, only while that worker
        still holds job `job_id`'s lease (else LeaseLost), and the same transaction ends the job as succeeded
        with `job_result`'s fields: no moment has the version committed and its job still running, which a
        lease's expiry would queue again. `request_key`: the /import's idempotency key, recorded for its concept in
        the same transaction (RequestSeen if the key already holds one)."""
        owner, answer = (concept["owner"], concept["concept_id"]) if request_key is not None else (None, None)
        with self._recording(owner, request_key, answer) as conn:
            now = time.time()
            if worker is not None:
                held = conn.execute(select(jobs.c.status, jobs.c.model_version).where(
                    jobs.c.job_id == job_id, jobs.c.worker == worker).with_for_update()).first()
                if held is not None and held[0] == "succeeded" and held[1] == version:
                    return  # this very commit, retried after its answer was lost with the connection
                if held is None or held[0] != "running":
                    raise LeaseLost(f"job {job_id} is no longer this worker's")
            row = conn.execute(select(models.c.current_version).where(models.c.model_key == model_key)
                               .with_for_update()).first()
            if row is None or row[0] != version - 1:
                raise VersionMovedOn(f"model {model_key} moved on while training (now v{row and row[0]})")
            conn.execute(model_versions.insert().values(model_key=model_key, version=version,
                                                        path=self._stored_path(path), job_id=job_id, created=now))
            if concept:
                conn.execute(concepts.insert().values(
                    concept_id=concept["concept_id"], model_key=model_key, owner=concept["owner"],
                    target=concept["target"], identifier=concept["identifier"], category=concept["category"],
                    version=version, n_images=concept["n_images"], status="active", created=now,
                    params=json.dumps(concept.get("params", {}))))
            if concept_status:
                conn.execute(update(concepts).where(concepts.c.concept_id == concept_status[0])
                             .values(status=concept_status[1]))
            conn.execute(update(models).where(models.c.model_key == model_key).values(current_version=version))
            if worker is not None:
                conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(
                    status="succeeded", finished=now, eta_s=0.0, lease_until=None, step=jobs.c.total_steps,
                    **(job_result or {})))

    # ------------------------------------------------------------------ concepts
    def concepts_of_model(self, model_key: str) -> list[dict]:
        return self._all(select(concepts).where(concepts.c.model_key == model_key, concepts.c.status == "active")
                         .order_by(concepts.c.created))

    def identifiers_ever_used(self, model_key: str) -> set[str]:
        return {r["identifier"] for r in self._all(select(concepts.c.identifier)
                                                   .where(concepts.c.model_key == model_key))}

    def get_concept(self, concept_id: str) -> dict | None:
        return self._one(select(concepts).where(concepts.c.concept_id == concept_id, concepts.c.status == "active"))

    def find_concept(self, *, owner: str | None, target: str, identifier: str) -> dict | None:
        stmt = select(concepts).where(concepts.c.target == target, concepts.c.identifier == identifier,
                                      concepts.c.status == "active")
        if owner is not None:
            stmt = stmt.where(concepts.c.owner == owner).order_by(concepts.c.created.desc())
        return self._one(stmt)

    def list_concepts(self, *, owner: str) -> list[dict]:
        return self._all(select(concepts).where(concepts.c.status == "active",
                                                sa.or_(concepts.c.target == "meta", concepts.c.owner == owner))
                         .order_by(concepts.c.created))

    def concepts_of_model_any_status(self, model_key: str) -> list[dict]:
        return self._all(select(concepts).where(concepts.c.model_key == model_key).order_by(concepts.c.created))

    def mark_concept_deleted(self, concept_id: str) -> None:
        self._write(update(concepts).where(concepts.c.concept_id == concept_id).values(status="deleted"))

    # ------------------------------------------------------------------ jobs: what any replica does
    @contextlib.contextmanager
    def _recording(self, owner: str | None, request_key: tuple[str, str, float] | None, answer: str | None):
        """One transaction that first records the owner's idempotency key (key, request hash, time to live) for
        `answer`, what the transaction makes; RequestSeen when the key already holds an answer, also one that
        another replica recorded a moment ago (this one's insert then fails on the primary key)."""
        try:
            with self.engine.begin() as conn:
                if request_key is not None:
                    _record_request(conn, owner, request_key, answer)
                yield conn
        except IntegrityError:
            if request_key is not None:
                self.seen_request(owner, *request_key)
            raise

    def seen_request(self, owner: str, key: str, request_hash: str, ttl_s: float) -> None:
        """Raise RequestSeen if `owner` sent a request with idempotency key `key` within `ttl_s`."""
        row = self._one(select(request_keys).where(request_keys.c.owner == owner, request_keys.c.request_key == key,
                                                   request_keys.c.created >= time.time() - ttl_s))
        if row is not None:
            raise RequestSeen(row["answer"], row["request_hash"] == request_hash)

    def create_job(self, owner: str, target: str, category: str, total_steps: int, params: dict, *,
                   job_id: str | None = None, model_key: str | None = None, concept_id: str | None = None,
                   max_active: int | None = None, request_key: tuple[str, str, float] | None = None) -> str:
        """Queue a job; with `max_active`, only while the owner has fewer queued or running jobs, counted and
        inserted in one transaction (on PostgreSQL under a lock per owner), so replicas cannot both admit one.
        `request_key`: (idempotency key, the request's hash, time to live in seconds), recorded in the same
        transaction; RequestSeen when the owner's key already holds a job, however close the two tries came."""
        job_id = job_id or uuid.uuid4().hex
        with self._recording(owner, request_key, job_id) as conn:
            if max_active is not None:
                if self.backend == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:o))"), {"o": f"big-jobs:{owner}"})
                active = conn.execute(select(func.count()).select_from(jobs).where(
                    jobs.c.owner == owner, jobs.c.status.in_(JOB_ACTIVE))).scalar_one()
                if active >= max_active:
                    raise QuotaExceeded(f"you have {active} training jobs queued or running; at most {max_active}")
            conn.execute(jobs.insert().values(
                job_id=job_id, owner=owner, target=target, category=category, status="queued", step=0,
                total_steps=total_steps, created=time.time(), params=json.dumps(params), model_key=model_key,
                concept_id=concept_id, attempts=0, cancel_requested=0))
        return job_id

    def update_job(self, job_id: str, **fields: Any) -> None:
        if fields:
            self._write(update(jobs).where(jobs.c.job_id == job_id).values(**fields))

    def get_job(self, job_id: str) -> dict | None:
        return self._one(select(jobs).where(jobs.c.job_id == job_id))

    def count_jobs(self, owner: str, statuses: tuple[str, ...] = JOB_ACTIVE, target: str | None = None) -> int:
        stmt = select(func.count()).select_from(jobs).where(jobs.c.owner == owner, jobs.c.status.in_(statuses))
        if target is not None:
            stmt = stmt.where(jobs.c.target == target)
        with self.engine.begin() as conn:
            return conn.execute(stmt).scalar_one()

    def active_job_ids(self) -> set[str]:
        """The jobs queued or running: the ones whose stored inputs are still needed."""
        return {r["job_id"] for r in self._all(select(jobs.c.job_id).where(jobs.c.status.in_(JOB_ACTIVE)))}

    def running_jobs(self) -> list[dict]:
        return self._all(select(jobs).where(jobs.c.status == "running"))

    def list_jobs(self, owner: str, limit: int = 50) -> list[dict]:
        return self._all(select(jobs).where(jobs.c.owner == owner).order_by(jobs.c.created.desc()).limit(limit))

    def cancel_job(self, job_id: str) -> None:
        """Ask a job to stop: a queued one ends here and now, a running one at its worker's next heartbeat."""
        with self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(cancel_requested=1))
            conn.execute(update(jobs).where(jobs.c.job_id == job_id, jobs.c.status == "queued").values(
                status="cancelled", error="cancelled before it started", error_code="cancelled",
                finished=time.time(), eta_s=0.0))

    # ------------------------------------------------------------------ jobs: what a training worker does
    def claim_job(self, worker: str, lease_s: float) -> dict | None:
        """The next queued job this worker may run, now running under its lease; None when there is none. A job
        whose model key already has a running job waits (its key's single writer); among the others, the jobs
        of users with fewer running jobs go first, then the oldest."""
        running = jobs.alias("running")
        busy_keys = select(running.c.model_key).where(running.c.status == "running",
                                                      running.c.model_key.is_not(None))
        owner_running = select(func.count()).select_from(running).where(
            running.c.owner == jobs.c.owner, running.c.status == "running").scalar_subquery()
        candidates = self._all(select(jobs.c.job_id).where(jobs.c.status == "queued",
                                                           jobs.c.model_key.not_in(busy_keys))
                               .order_by(owner_running, jobs.c.created).limit(8))
        for c in candidates:
            now = time.time()
            try:
                with self.engine.begin() as conn:
                    claimed = conn.execute(update(jobs).where(jobs.c.job_id == c["job_id"], jobs.c.status == "queued")
                                           .values(status="running", worker=worker, lease_until=now + lease_s,
                                                   started=now, attempts=jobs.c.attempts + 1)).rowcount
            except IntegrityError:  # another worker took a job of the same key a moment ago
                continue
            if claimed:
                return self.get_job(c["job_id"])
        return None

    def renew_lease(self, job_id: str, worker: str, lease_s: float) -> tuple[bool, bool]:
        """(still this worker's, cancel requested) after extending the lease of a job it runs."""
        with self.engine.begin() as conn:
            held = conn.execute(update(jobs).where(jobs.c.job_id == job_id, jobs.c.worker == worker,
                                                   jobs.c.status == "running")
                                .values(lease_until=time.time() + lease_s)).rowcount
            cancel = conn.execute(select(jobs.c.cancel_requested).where(jobs.c.job_id == job_id)).scalar()
        return bool(held), bool(cancel)

    def end_job(self, job_id: str, worker: str, status: str, **fields: Any) -> bool:
        """End a job this worker holds; False (and nothing written) when its lease passed to another."""
        return bool(self._write(update(jobs).where(jobs.c.job_id == job_id, jobs.c.worker == worker,
                                                   jobs.c.status == "running")
                                .values(status=status, finished=time.time(), eta_s=0.0, lease_until=None,
                                        **fields)))

    def job_is(self, job_id: str, worker: str, status: str) -> bool:
        """Whether the job is `status` under this worker: running (its lease has not passed to another), or
        succeeded (this worker's commit of its version ended it)."""
        return self._one(select(jobs.c.job_id).where(jobs.c.job_id == job_id, jobs.c.worker == worker,
                                                     jobs.c.status == status)) is not None

    def requeue_job(self, job_id: str, worker: str) -> bool:
        """Put a job this worker holds back in the queue, to run again from the start."""
        return bool(self._write(update(jobs).where(jobs.c.job_id == job_id, jobs.c.worker == worker,
                                                   jobs.c.status == "running")
                                .values(status="queued", worker=None, lease_until=None, step=0, eta_s=None)))

    def expire_leases(self, max_attempts: int) -> list[tuple[dict, str]]:
        """Running jobs whose worker stopped renewing its lease (it died or hangs): queued again for another
        worker, or failed once they have been tried `max_attempts` times (cancelled if that was asked). Returns
        (each job as it was, its status now), for those this call changed."""
        now = time.time()
        expired = self._all(select(jobs).where(jobs.c.status == "running", jobs.c.lease_until < now))
        changed = []
        for job in expired:
            values: dict[str, Any] = dict(status="queued", worker=None, lease_until=None, eta_s=None)
            if job["attempts"] >= max_attempts:
                values = dict(status="failed", finished=now, eta_s=0.0, lease_until=None,
                              error=f"its worker stopped {job['attempts']} times while running it "
                                    "(out of memory or killed?)", error_code="worker_lost")
            elif job["cancel_requested"]:
                values = dict(status="cancelled", finished=now, eta_s=0.0, lease_until=None,
                              error="cancelled", error_code="cancelled")
            if self._write(update(jobs).where(jobs.c.job_id == job["job_id"], jobs.c.status == "running",
                                              jobs.c.lease_until == job["lease_until"]).values(**values)):
                changed.append((job, values["status"]))
        return changed


# Every public call of the registry is one or more whole transactions: each rides out a database that does not
# answer for a few seconds, then raises Unavailable.
for _name, _method in list(vars(Registry).items()):
    if callable(_method) and not _name.startswith("_") and _name not in ("close", "patience"):
        setattr(Registry, _name, _riding_out_blips(_method))
