"""Alembic's environment and the schema's revisions (store.schema runs them)."""
