"""Alembic environment: migrates the database named by ``-x url=...`` or ``sqlalchemy.url``.

Connects through ``api.db.session.make_engine`` so migrations see the same SQLite
pragmas (foreign keys, WAL) as the servers. Logging is configured only when run
from the ``alembic`` CLI with an ini file; programmatic upgrades leave the host
process's logging alone. SQLite needs batch mode for most ALTERs, so it is on.
"""

from logging.config import fileConfig

from alembic import context

from api.db.models import Base
from api.db.session import make_engine

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: pass -x url=... or set sqlalchemy.url")
    return url


url = _database_url()


def run_migrations_offline() -> None:
    """Emit the migration SQL to stdout (``alembic upgrade head --sql``)."""
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
