"""Alembic is the schema's only authority: the migrations build what the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from audience_server import db
from audience_server.models import metadata


def test_models_match_the_migrations(engine: Engine) -> None:
    """On both databases: a fresh database migrated to head has the models' tables exactly."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []
        assert db.current_revision(conn) == db.head_revision()


def test_the_head_revision_is_the_last_of_one_line() -> None:
    """One head: two migrations branching from one parent would leave the schema ambiguous."""
    script = ScriptDirectory.from_config(db.alembic_config())
    assert script.get_heads() == [db.head_revision()]
    revisions = list(script.walk_revisions())
    assert [r.down_revision for r in revisions][-1] is None  # the first one has no parent
    assert len({r.revision for r in revisions}) == len(revisions)
