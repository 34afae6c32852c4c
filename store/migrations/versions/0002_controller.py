"""The release of 2026-12-01 (commit 00469d3): the controller's tables (drift checks, rollouts
and their commands, controller state, leases) and the trainer child's pid on training jobs.

A database of the first release that a later tunewatch opened before migrations existed
already has these tables: `create_all` made the missing ones at every start (then the schema
check refused the missing columns). They are made here only where absent; the ones there are
exactly these (the models did not change them since).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"

INSTANT = sa.DateTime(timezone=True)  # store.base.UTCDateTime's column type


def upgrade() -> None:
    present = set(sa.inspect(op.get_bind()).get_table_names())
    if "controller_state" not in present:
        op.create_table(
            "controller_state",
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("updated_at", INSTANT, nullable=False),
            sa.Column("state", sa.JSON(), nullable=False),
        )
    if "drift_checks" not in present:
        op.create_table(
            "drift_checks",
            sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
            sa.Column("created_at", INSTANT, nullable=False),
            sa.Column("adapter", sa.String(128), nullable=False),
            sa.Column("share", sa.Float(), nullable=True),
            sa.Column("detected", sa.Boolean(), nullable=True),
            sa.Column("reason", sa.Text(), nullable=False),
            sa.Column("columns", sa.JSON(), nullable=False),
        )
        op.create_index("ix_drift_checks_adapter", "drift_checks", ["adapter"])
    if "leases" not in present:
        op.create_table(
            "leases",
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("holder", sa.String(128), nullable=False),
            sa.Column("expires_at", INSTANT, nullable=False),
        )
    if "rollout_commands" not in present:
        op.create_table(
            "rollout_commands",
            sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
            sa.Column("created_at", INSTANT, nullable=False),
            sa.Column("command", sa.String(16), nullable=False),
            sa.Column("adapter", sa.String(128), nullable=True),
            sa.Column("by", sa.String(64), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("result", sa.Text(), nullable=True),
            sa.Column("rollout_id", sa.Integer(), nullable=True),
        )
    if "rollouts" not in present:
        op.create_table(
            "rollouts",
            sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
            sa.Column("created_at", INSTANT, nullable=False),
            sa.Column("updated_at", INSTANT, nullable=False),
            sa.Column("candidate", sa.String(128), nullable=False),
            sa.Column("baseline", sa.String(128), nullable=True),
            sa.Column("stage", sa.String(16), nullable=False),
            sa.Column("step", sa.Integer(), nullable=False),
            sa.Column("stage_started_at", INSTANT, nullable=False),
            sa.Column("finished_at", INSTANT, nullable=True),
            sa.Column("reason", sa.Text(), nullable=False),
            sa.Column("state", sa.JSON(), nullable=False),
            sa.Column("config", sa.JSON(), nullable=False),
        )
        op.create_index("ix_rollouts_candidate", "rollouts", ["candidate"])
        op.create_index("ix_rollouts_stage", "rollouts", ["stage"])
    op.add_column("training_jobs", sa.Column("pid", sa.Integer(), nullable=True))
