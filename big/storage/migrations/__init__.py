"""Alembic migrations of the registry. `Registry` runs them when it opens a database (`upgrade`), so a workspace
made by an earlier BIG, or an empty PostgreSQL database, is brought to the current schema in place."""
