"""Rollouts carry a version: every transition writes `version = read + 1 WHERE version = read`,
so a leader that lost its lease mid-look (a database outage) cannot write over the state a
newer leader wrote. Existing rollouts start at 0.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.add_column(
        "rollouts", sa.Column("version", sa.Integer(), nullable=False, server_default="0")
    )
