"""The registry's tables, as SQLAlchemy metadata: the one description of the database that the registry queries
and Alembic's migrations (`big/storage/migrations`) bring a database up to."""
from __future__ import annotations

from sqlalchemy import Column, Float, Index, Integer, MetaData, PrimaryKeyConstraint, Table, Text, UniqueConstraint

metadata = MetaData()

models = Table(
    "models", metadata,
    Column("model_key", Text, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("owner", Text),
    Column("base", Text, nullable=False),
    Column("current_version", Integer, nullable=False, server_default="0"),
    Column("created", Float, nullable=False),
)

model_versions = Table(
    "model_versions", metadata,
    Column("model_key", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("path", Text, nullable=False),  # relative to the store's root (absolute in workspaces made before)
    Column("job_id", Text),
    Column("created", Float, nullable=False),
    PrimaryKeyConstraint("model_key", "version"),
)

concepts = Table(
    "concepts", metadata,
    Column("concept_id", Text, primary_key=True),
    Column("model_key", Text, nullable=False),
    Column("owner", Text, nullable=False),
    Column("target", Text, nullable=False),
    Column("identifier", Text, nullable=False),
    Column("category", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("n_images", Integer, nullable=False),
    Column("status", Text, nullable=False, server_default="active"),
    Column("created", Float, nullable=False),
    Column("params", Text),
    UniqueConstraint("model_key", "identifier"),
)

jobs = Table(
    "jobs", metadata,
    Column("job_id", Text, primary_key=True),
    Column("owner", Text, nullable=False),
    Column("target", Text, nullable=False),
    Column("category", Text, nullable=False),
    Column("status", Text, nullable=False),  # queued, running, succeeded, failed, cancelled
    Column("step", Integer, nullable=False, server_default="0"),
    Column("total_steps", Integer, nullable=False),
    Column("loss", Float),
    Column("eta_s", Float),
    Column("error", Text),
    Column("error_code", Text),
    Column("concept_id", Text),
    Column("identifier", Text),
    Column("model_version", Integer),
    Column("created", Float, nullable=False),
    Column("started", Float),
    Column("finished", Float),
    Column("params", Text),
    Column("cancel_requested", Integer, server_default="0"),
    # Durable queue (revision 0002): the model key the job writes, the worker holding it and until when.
    Column("model_key", Text),
    Column("worker", Text),
    Column("lease_until", Float),
    Column("attempts", Integer, nullable=False, server_default="0"),
    # Where a job's seconds went (revision 0003): `big.jobs.JobSeconds`' JSON, written when the job ends.
    Column("seconds", Text),
)

# A model key's single writer, across every worker: at most one running job per key (SQLite and PostgreSQL both
# enforce a partial unique index).
one_running_job_per_model = Index(
    "one_running_job_per_model", jobs.c.model_key, unique=True,
    sqlite_where=jobs.c.status == "running", postgresql_where=jobs.c.status == "running")
jobs_by_status = Index("jobs_by_status", jobs.c.status, jobs.c.created)
jobs_by_owner = Index("jobs_by_owner", jobs.c.owner, jobs.c.created)

# A writing request's idempotency key (revision 0004) and what the first request with it made (`answer`: the job a
# /finetune queued, the concept an /import made), so a retry of the same request, on any replica, gets that instead
# of a second one. `request_hash` tells a retry from another request that reuses the key.
request_keys = Table(
    "request_keys", metadata,
    Column("owner", Text, nullable=False),
    Column("request_key", Text, nullable=False),
    Column("request_hash", Text, nullable=False),
    Column("answer", Text, nullable=False),
    Column("created", Float, nullable=False),
    PrimaryKeyConstraint("owner", "request_key"),
)
