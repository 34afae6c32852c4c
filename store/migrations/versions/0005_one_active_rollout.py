"""At most one rollout in progress, held by the database: a unique index on a constant over
the rows in an active stage (a partial index, on SQLite and PostgreSQL alike). Two controllers
starting a rollout at once (a stale leader and the new one) both saw none in progress and both
inserted one; now the second insert fails, and that start is refused.

A database where that happened holds several: the oldest (the one the controller follows)
stays, the others end rolled back, with the reason on their row.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"

ACTIVE = "stage IN ('shadow', 'canary', 'paused')"  # store.rollouts.ACTIVE_STAGES
ENDED = "ended by the upgrade to revision 0005: an older rollout was in progress"


def upgrade() -> None:
    op.execute(
        sa.text(
            "UPDATE rollouts SET stage = 'rolled_back', finished_at = CURRENT_TIMESTAMP, "
            f"reason = :reason WHERE {ACTIVE} AND id > (SELECT MIN(id) FROM rollouts "
            f"WHERE {ACTIVE})"
        ).bindparams(reason=ENDED)
    )
    op.create_index(
        "rollouts_one_active",
        "rollouts",
        [sa.text("(1)")],
        unique=True,
        sqlite_where=sa.text(ACTIVE),
        postgresql_where=sa.text(ACTIVE),
    )
