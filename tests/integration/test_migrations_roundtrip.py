"""The Alembic history, one revision at a time, on a fresh PostgreSQL database and on a SQLite file.

- Every revision's downgrade restores exactly the schema that was there before its upgrade (tables, columns
  and types, keys, indexes, unique and check constraints), and on PostgreSQL leaves no sequence or type behind;
  each revision changes the schema, except the data-only ones (`DATA_ONLY`), which must leave it alone.
- After upgrade head -> downgrade base -> upgrade head the schema equals the first head schema, and
  autogenerate (types and server defaults compared) finds no difference from ``api.db.models``.
- ``loom migrate`` (the deploy images' migration step) brings an empty database to head, and a second run is a
  no-op that exits 0.

``tests/integration/test_db_postgres.py`` and ``tests/unit/test_db_migrations.py`` hold the coarser
whole-history round trip (table names only) and the autogenerate check at first upgrade.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from api.db.models import Base
from api.db.session import alembic_config, make_engine, upgrade_to_head

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_ONLY = {"0004"}
"""Revisions that convert stored data and leave the schema as it was."""
Snapshot = dict[str, dict[str, Any]]


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database with no tables: a new SQLite file, or a uniquely named PostgreSQL database (conftest)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'loom.db'}"
    return request.getfixturevalue("postgres_url")


def revisions_base_to_head(url: str) -> list[str]:
    script = ScriptDirectory.from_config(alembic_config(url))
    return [revision.revision for revision in reversed(list(script.walk_revisions()))]


def schema(engine: Engine) -> Snapshot:
    """Everything a migration may create, per table (Alembic's own bookkeeping table left out)."""
    inspector = inspect(engine)
    snapshot: Snapshot = {}
    for table in sorted(set(inspector.get_table_names()) - {"alembic_version"}):
        snapshot[table] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "foreign_keys": sorted(
                (fk["name"], tuple(fk["constrained_columns"]), fk["referred_table"], tuple(fk["referred_columns"]))
                for fk in inspector.get_foreign_keys(table)
            ),
            "indexes": sorted(
                (ix["name"], tuple(ix["column_names"]), bool(ix["unique"])) for ix in inspector.get_indexes(table)
            ),
            "unique": sorted((uq["name"], tuple(uq["column_names"])) for uq in inspector.get_unique_constraints(table)),
            "checks": sorted((ck["name"], ck["sqltext"]) for ck in inspector.get_check_constraints(table)),
        }
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            snapshot["<sequences>"] = {"names": sorted(connection.scalars(text(_PG_SEQUENCES)))}
            snapshot["<types>"] = {"names": sorted(connection.scalars(text(_PG_USER_TYPES)))}
    return snapshot


_PG_SEQUENCES = "SELECT sequence_name FROM information_schema.sequences WHERE sequence_schema = 'public'"
# Enums, domains and composite types of our own (table row types excluded).
_PG_USER_TYPES = """
SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd', 'c')
  AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.reltype = t.oid)
"""


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def assert_matches_models(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(context, Base.metadata) == []


def test_each_revision_downgrades_to_the_schema_before_it(empty_url: str) -> None:
    config, engine = alembic_config(empty_url), make_engine(empty_url)
    try:
        base = schema(engine)
        assert not [name for name in base if not name.startswith("<")], "the database is not empty"
        before: list[Snapshot] = []
        for revision in revisions_base_to_head(empty_url):
            before.append(schema(engine))
            command.upgrade(config, revision)
            assert current_revision(engine) == revision
            if revision in DATA_ONLY:  # rewrites rows (tests/unit/test_job_contract.py), not the schema
                assert schema(engine) == before[-1], f"data-only revision {revision} changed the schema"
            else:
                assert schema(engine) != before[-1], f"revision {revision} changed nothing"

        for revision, expected in reversed(list(zip(revisions_base_to_head(empty_url), before))):
            assert current_revision(engine) == revision
            command.downgrade(config, "-1")
            assert schema(engine) == expected, f"downgrade of {revision} did not restore the schema before it"
        assert current_revision(engine) is None
        assert schema(engine) == base
    finally:
        engine.dispose()


def test_upgrade_after_full_downgrade_rebuilds_the_same_schema(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        upgrade_to_head(empty_url)
        first = schema(engine)
        assert set(first) - {"<sequences>", "<types>"} == set(Base.metadata.tables)

        command.downgrade(alembic_config(empty_url), "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}

        upgrade_to_head(empty_url)
        assert schema(engine) == first
        assert_matches_models(engine)
    finally:
        engine.dispose()


def test_loom_migrate_reaches_head_and_is_idempotent(empty_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "LOOM_DATABASE_URL": empty_url, "LOOM_DATA_DIR": str(tmp_path / "data")}
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "api.cli", "migrate"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    engine = make_engine(empty_url)
    try:
        assert current_revision(engine) == revisions_base_to_head(empty_url)[-1]
        assert_matches_models(engine)
    finally:
        engine.dispose()
