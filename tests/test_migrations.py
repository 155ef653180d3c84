"""Alembic is the schema's only authority: the migrations build what the models describe."""

from __future__ import annotations

import datetime as dt

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from audience_server import db, store
from audience_server.models import metadata


def test_models_match_the_migrations(engine: Engine) -> None:
    """On both databases: a fresh database migrated to head has the models' tables exactly."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []
        assert db.current_revision(conn) == db.head_revision()
        assert db.current_revision(conn) == MigrationContext.configure(conn).get_current_revision()


def test_the_head_revision_is_the_last_of_one_line() -> None:
    """One head: two migrations branching from one parent would leave the schema ambiguous."""
    script = ScriptDirectory.from_config(db.alembic_config())
    assert script.get_heads() == [db.SCHEMA_HEAD]  # bump SCHEMA_HEAD with a new migration
    revisions = list(script.walk_revisions())
    assert [r.down_revision for r in revisions][-1] is None  # the first one has no parent
    assert len({r.revision for r in revisions}) == len(revisions)


def test_sessions_assembled_before_0003_show_every_user_assembled(engine: Engine) -> None:
    """``assembled_users`` (0003) is NULL for a session not yet assembled, and the session's
    total for one assembled before the column existed."""
    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    with engine.begin() as conn:
        config = db.alembic_config()
        config.attributes["connection"] = conn
        command.downgrade(config, "0002")
        for key in ("assembled", "waiting"):
            store.create_session_if_absent(
                conn, "t", key, name="S", type="custom", total_batches=1, total_users=5,
                now=now, expires_at=now,
            )  # fmt: skip
        store.update_session(conn, "t", "assembled", unique_users=4)
        command.upgrade(config, "head")
    with db.read_transaction(engine) as conn:
        assembled = store.get_session(conn, "t", "assembled")
        waiting = store.get_session(conn, "t", "waiting")
    assert assembled is not None and (assembled.assembled_users, assembled.unique_users) == (5, 4)
    assert waiting is not None and waiting.assembled_users is None
