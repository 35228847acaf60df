"""The registry (SQLite): users, models and their versions, concepts, jobs.

A model version becomes current in the same transaction that records the concept it added, so the
served state is always a version that was completely written.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    model_key TEXT PRIMARY KEY, kind TEXT NOT NULL, owner TEXT, base TEXT NOT NULL,
    current_version INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS model_versions (
    model_key TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, job_id TEXT,
    created REAL NOT NULL, PRIMARY KEY (model_key, version));
CREATE TABLE IF NOT EXISTS concepts (
    concept_id TEXT PRIMARY KEY, model_key TEXT NOT NULL, owner TEXT NOT NULL, target TEXT NOT NULL,
    identifier TEXT NOT NULL, category TEXT NOT NULL, version INTEGER NOT NULL, n_images INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'active', created REAL NOT NULL, params TEXT,
    UNIQUE (model_key, identifier));
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, owner TEXT NOT NULL, target TEXT NOT NULL, category TEXT NOT NULL,
    status TEXT NOT NULL, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL,
    loss REAL, eta_s REAL, error TEXT, error_code TEXT, concept_id TEXT, identifier TEXT, model_version INTEGER,
    created REAL NOT NULL, started REAL, finished REAL, params TEXT, cancel_requested INTEGER DEFAULT 0);
"""

JOB_DONE = ("succeeded", "failed", "cancelled")


class Registry:
    def __init__(self, path: str):
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._migrate()
        # Jobs that were running when the process died will never finish: say so (and that nothing is left to
        # wait for: an ended job's ETA is 0, not its last estimate).
        self._db.execute("UPDATE jobs SET status='failed', error='server restarted during the job', finished=?, "
                         "eta_s=0 WHERE status IN ('queued','running')", (time.time(),))

    def _migrate(self) -> None:
        """A workspace made by an earlier version: jobs kept an error's code as a "[code] " prefix of its text."""
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
        if "error_code" in columns:
            return
        self._db.execute("ALTER TABLE jobs ADD COLUMN error_code TEXT")
        for row in self._db.execute("SELECT job_id, error FROM jobs WHERE error LIKE '[%] %'").fetchall():
            code, _, message = row["error"][1:].partition("] ")
            self._db.execute("UPDATE jobs SET error_code=?, error=? WHERE job_id=?", (code, message, row["job_id"]))

    def _q(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ models
    def ensure_model(self, model_key: str, kind: str, owner: str | None, base: str) -> dict:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO models VALUES (?,?,?,?,0,?)",
                             (model_key, kind, owner, base, time.time()))
            return dict(self._q("SELECT * FROM models WHERE model_key=?", (model_key,))[0])

    def get_model(self, model_key: str) -> dict | None:
        rows = self._q("SELECT * FROM models WHERE model_key=?", (model_key,))
        return dict(rows[0]) if rows else None

    def version_path(self, model_key: str, version: int) -> str | None:
        rows = self._q("SELECT path FROM model_versions WHERE model_key=? AND version=?", (model_key, version))
        return rows[0]["path"] if rows else None

    def live_version_paths(self) -> set[str]:
        return {r["path"] for r in self._q("SELECT path FROM model_versions")}

    def commit_version(self, model_key: str, version: int, path: str, job_id: str | None,
                       concept: dict | None, concept_status: tuple[str, str] | None = None) -> None:
        """Record a finished version and its concept (or, `concept_status` = (concept id, status), an earlier
        concept's new status), and make it current: one transaction."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                row = cur.execute("SELECT current_version FROM models WHERE model_key=?", (model_key,)).fetchone()
                if row is None or row[0] != version - 1:
                    raise RuntimeError(f"model {model_key} moved on while training (now v{row and row[0]})")
                cur.execute("INSERT INTO model_versions VALUES (?,?,?,?,?)", (model_key, version, path, job_id, now))
                if concept:
                    cur.execute(
                        "INSERT INTO concepts (concept_id, model_key, owner, target, identifier, category, version,"
                        " n_images, status, created, params) VALUES (?,?,?,?,?,?,?,?, 'active', ?, ?)",
                        (concept["concept_id"], model_key, concept["owner"], concept["target"], concept["identifier"],
                         concept["category"], version, concept["n_images"], now, json.dumps(concept.get("params", {}))))
                if concept_status:
                    cur.execute("UPDATE concepts SET status=? WHERE concept_id=?", concept_status[::-1])
                cur.execute("UPDATE models SET current_version=? WHERE model_key=?", (version, model_key))
                cur.execute("COMMIT")
            except Exception:
                cur.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ concepts
    def concepts_of_model(self, model_key: str) -> list[dict]:
        return [dict(r) for r in self._q(
            "SELECT * FROM concepts WHERE model_key=? AND status='active' ORDER BY created", (model_key,))]

    def identifiers_ever_used(self, model_key: str) -> set[str]:
        return {r["identifier"] for r in self._q("SELECT identifier FROM concepts WHERE model_key=?", (model_key,))}

    def get_concept(self, concept_id: str) -> dict | None:
        rows = self._q("SELECT * FROM concepts WHERE concept_id=? AND status='active'", (concept_id,))
        return dict(rows[0]) if rows else None

    def find_concept(self, *, owner: str | None, target: str, identifier: str) -> dict | None:
        if owner is None:
            rows = self._q("SELECT * FROM concepts WHERE target=? AND identifier=? AND status='active'",
                           (target, identifier))
        else:
            rows = self._q("SELECT * FROM concepts WHERE owner=? AND target=? AND identifier=? AND status='active'"
                           " ORDER BY created DESC", (owner, target, identifier))
        return dict(rows[0]) if rows else None

    def list_concepts(self, *, owner: str) -> list[dict]:
        return [dict(r) for r in self._q(
            "SELECT * FROM concepts WHERE status='active' AND (target='meta' OR owner=?) ORDER BY created", (owner,))]

    def concepts_of_model_any_status(self, model_key: str) -> list[dict]:
        return [dict(r) for r in self._q("SELECT * FROM concepts WHERE model_key=? ORDER BY created", (model_key,))]

    def mark_concept_deleted(self, concept_id: str) -> None:
        self._q("UPDATE concepts SET status='deleted' WHERE concept_id=?", (concept_id,))

    # ------------------------------------------------------------------ jobs
    def create_job(self, owner: str, target: str, category: str, total_steps: int, params: dict) -> str:
        job_id = uuid.uuid4().hex
        self._q("INSERT INTO jobs (job_id, owner, target, category, status, total_steps, created, params)"
                " VALUES (?,?,?,?, 'queued', ?, ?, ?)",
                (job_id, owner, target, category, total_steps, time.time(), json.dumps(params)))
        return job_id

    def update_job(self, job_id: str, **fields: Any) -> None:
        if not fields:
            return
        cols = ", ".join(f"{k}=?" for k in fields)
        self._q(f"UPDATE jobs SET {cols} WHERE job_id=?", (*fields.values(), job_id))

    def get_job(self, job_id: str) -> dict | None:
        rows = self._q("SELECT * FROM jobs WHERE job_id=?", (job_id,))
        return dict(rows[0]) if rows else None

    def count_jobs(self, owner: str, statuses: tuple[str, ...] = ("queued", "running"), target: str | None = None) -> int:
        marks = ",".join("?" * len(statuses))
        sql = f"SELECT COUNT(*) FROM jobs WHERE owner=? AND status IN ({marks})"
        args = (owner, *statuses)
        if target is not None:
            sql, args = sql + " AND target=?", args + (target,)
        return self._q(sql, args)[0][0]

    def list_jobs(self, owner: str, limit: int = 50) -> list[dict]:
        return [dict(r) for r in self._q("SELECT * FROM jobs WHERE owner=? ORDER BY created DESC LIMIT ?",
                                         (owner, limit))]
