"""Alembic's environment: runs on the connection store.schema hands it, in its transaction.

There is no alembic.ini: store.schema builds the configuration (the script location, the
connection) in code, so an installed package migrates its database without a file beside it.
"""

from alembic import context

import store  # noqa: F401  (every table in Base.metadata)
from store.base import Base
from store.schema import tunewatch_tables

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    include_name=tunewatch_tables,
    render_as_batch=True,  # SQLite alters a table by copying it: revisions use batch mode
)
with context.begin_transaction():
    context.run_migrations()
