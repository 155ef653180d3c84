"""Alembic environment: uses the caller's connection when given one (the server and the
tests do), else AUDIENCE_DATABASE_URL."""

import os

from alembic import context
from sqlalchemy import Connection

from audience_server.db import make_engine
from audience_server.models import metadata
from audience_server.settings import Settings


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


given = context.config.attributes.get("connection")
if given is not None:
    run(given)
else:
    # Only the database's variable: another AUDIENCE_* setting has no say in a migration.
    database = {"AUDIENCE_DATABASE_URL": os.environ.get("AUDIENCE_DATABASE_URL", "")}
    configured = context.config.get_main_option("sqlalchemy.url")
    url = configured or Settings.from_env(database).database_url
    engine = make_engine(url)
    with engine.begin() as conn:
        run(conn)
    engine.dispose()
