"""Durable jobs: a job names the model key it writes and carries a worker's lease; one running job per key.
Version paths become relative to the store's root, so a store can be moved or mounted anywhere (a shared
volume is at different paths on different machines).

Jobs left queued or running by a single-process BIG from before stay as they were written: without their
inputs (the images lived in that process's memory) they cannot run, so they are failed with a clear reason.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("model_key", sa.Text))
        batch.add_column(sa.Column("worker", sa.Text))
        batch.add_column(sa.Column("lease_until", sa.Float))
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
    op.execute("UPDATE jobs SET status='failed', eta_s=0, error='the server stopped before this job ended "
               "(a BIG from before durable jobs kept its images in memory); send it again' "
               "WHERE status IN ('queued', 'running')")
    bind = op.get_bind()
    for key, version, path in bind.execute(sa.text("SELECT model_key, version, path FROM model_versions")).fetchall():
        if path.startswith("/") and "/models/" in path:
            bind.execute(sa.text("UPDATE model_versions SET path=:p WHERE model_key=:k AND version=:v"),
                         {"p": "models/" + path.rsplit("/models/", 1)[1], "k": key, "v": version})
    running = sa.text("status = 'running'")
    op.create_index("one_running_job_per_model", "jobs", ["model_key"], unique=True,
                    sqlite_where=running, postgresql_where=running)
    op.create_index("jobs_by_status", "jobs", ["status", "created"])
    op.create_index("jobs_by_owner", "jobs", ["owner", "created"])


def downgrade() -> None:
    for name in ("jobs_by_owner", "jobs_by_status", "one_running_job_per_model"):
        op.drop_index(name, table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in ("attempts", "lease_until", "worker", "model_key"):
            batch.drop_column(column)
