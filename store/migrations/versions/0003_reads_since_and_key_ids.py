"""The release of 2026-12-03 (commit b924887): exchanges gain `recorded_at` (the store's write
stamp, which a rollout's look reads from) and `api_key_id` (which key may post feedback);
one adapter's exchanges are indexed in time order (arrival and write), feedback by when
it was written.

Exchanges recorded before carry no write stamp: their arrival stands in for it (it is
earlier, so a reader following the table has read them already).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"

INSTANT = sa.DateTime(timezone=True)  # store.base.UTCDateTime's column type


def upgrade() -> None:
    op.add_column("exchanges", sa.Column("recorded_at", INSTANT, nullable=True))
    op.add_column("exchanges", sa.Column("api_key_id", sa.String(16), nullable=True))
    op.execute("UPDATE exchanges SET recorded_at = created_at")
    with op.batch_alter_table("exchanges") as batch:  # SQLite: a copy of the table
        batch.alter_column("recorded_at", existing_type=INSTANT, nullable=False)
    op.drop_index("ix_exchanges_adapter", table_name="exchanges")
    op.create_index("ix_exchanges_adapter_created_at", "exchanges", ["adapter", "created_at"])
    op.create_index("ix_exchanges_adapter_recorded_at", "exchanges", ["adapter", "recorded_at"])
    op.create_index("ix_feedback_created_at", "feedback", ["created_at"])
