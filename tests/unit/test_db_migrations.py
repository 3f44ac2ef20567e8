"""The Alembic history on SQLite: it matches the models and round-trips cleanly."""

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from api.db.models import Base
from api.db.session import alembic_config, make_engine, upgrade_to_head


def test_autogenerate_finds_no_difference_after_upgrade(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_downgrade_to_base_and_upgrade_again(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    command.downgrade(alembic_config(sqlite_url), "base")
    assert inspect(engine).get_table_names() == ["alembic_version"]
    upgrade_to_head(sqlite_url)
    assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    engine.dispose()
