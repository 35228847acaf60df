"""Idempotency keys of /finetune and /import requests: a retried request (the client's, or Jina's gateway resending
it to another replica) gets the job its first try queued, or the concept it made (`schema.request_keys`).

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "request_keys",
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("request_key", sa.Text, nullable=False),
        sa.Column("request_hash", sa.Text, nullable=False),
        sa.Column("answer", sa.Text, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("owner", "request_key"),
    )


def downgrade() -> None:
    op.drop_table("request_keys")
