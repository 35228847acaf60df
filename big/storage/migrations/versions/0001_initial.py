"""The registry as BIG kept it before Alembic: models, versions, concepts, jobs (with error_code).

A workspace made before this revision has these tables already (and, if older still, no `error_code` column:
its error codes were a "[code] " prefix of the text); they are kept and completed, not made again.

Revision ID: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "models" not in existing:
        op.create_table(
            "models", sa.Column("model_key", sa.Text, primary_key=True), sa.Column("kind", sa.Text, nullable=False),
            sa.Column("owner", sa.Text), sa.Column("base", sa.Text, nullable=False),
            sa.Column("current_version", sa.Integer, nullable=False, server_default="0"),
            sa.Column("created", sa.Float, nullable=False))
    if "model_versions" not in existing:
        op.create_table(
            "model_versions", sa.Column("model_key", sa.Text, nullable=False),
            sa.Column("version", sa.Integer, nullable=False), sa.Column("path", sa.Text, nullable=False),
            sa.Column("job_id", sa.Text), sa.Column("created", sa.Float, nullable=False),
            sa.PrimaryKeyConstraint("model_key", "version"))
    if "concepts" not in existing:
        op.create_table(
            "concepts", sa.Column("concept_id", sa.Text, primary_key=True),
            sa.Column("model_key", sa.Text, nullable=False), sa.Column("owner", sa.Text, nullable=False),
            sa.Column("target", sa.Text, nullable=False), sa.Column("identifier", sa.Text, nullable=False),
            sa.Column("category", sa.Text, nullable=False), sa.Column("version", sa.Integer, nullable=False),
            sa.Column("n_images", sa.Integer, nullable=False),
            sa.Column("status", sa.Text, nullable=False, server_default="active"),
            sa.Column("created", sa.Float, nullable=False), sa.Column("params", sa.Text),
            sa.UniqueConstraint("model_key", "identifier"))
    if "jobs" not in existing:
        op.create_table(
            "jobs", sa.Column("job_id", sa.Text, primary_key=True), sa.Column("owner", sa.Text, nullable=False),
            sa.Column("target", sa.Text, nullable=False), sa.Column("category", sa.Text, nullable=False),
            sa.Column("status", sa.Text, nullable=False),
            sa.Column("step", sa.Integer, nullable=False, server_default="0"),
            sa.Column("total_steps", sa.Integer, nullable=False), sa.Column("loss", sa.Float),
            sa.Column("eta_s", sa.Float), sa.Column("error", sa.Text), sa.Column("error_code", sa.Text),
            sa.Column("concept_id", sa.Text), sa.Column("identifier", sa.Text),
            sa.Column("model_version", sa.Integer), sa.Column("created", sa.Float, nullable=False),
            sa.Column("started", sa.Float), sa.Column("finished", sa.Float), sa.Column("params", sa.Text),
            sa.Column("cancel_requested", sa.Integer, server_default="0"))
        return
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("jobs")}
    if "error_code" not in columns:
        with op.batch_alter_table("jobs") as batch:
            batch.add_column(sa.Column("error_code", sa.Text))
        bind = op.get_bind()
        rows = bind.execute(sa.text("SELECT job_id, error FROM jobs WHERE error LIKE '[%] %'")).fetchall()
        for job_id, error in rows:
            code, _, message = error[1:].partition("] ")
            bind.execute(sa.text("UPDATE jobs SET error_code=:c, error=:m WHERE job_id=:j"),
                         {"c": code, "m": message, "j": job_id})


def downgrade() -> None:
    for table in ("jobs", "concepts", "model_versions", "models"):
        op.drop_table(table)
