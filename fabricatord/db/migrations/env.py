"""Alembic environment: migrations run on the connection `fabricatord.db.engine.migrate` hands in."""

from alembic import context
from sqlalchemy import create_engine

from fabricatord.db.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # the alembic command line, for writing new revisions
    with create_engine(config.get_main_option("sqlalchemy.url") or "").connect() as own:
        context.configure(connection=own, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
