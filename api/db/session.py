"""Engines, session factories and schema migration for a database URL.

SQLite (the embedded default; the database file's folder is created if missing) is configured for a
multi-threaded server:
WAL journal, a 30 s busy timeout, foreign keys on, connections shareable across
threads, and every transaction opened with ``BEGIN IMMEDIATE``. Taking the write
lock up front makes SQLite transactions serializable and avoids the
``database is locked`` error a deferred read-then-write transaction gets when
another writer commits first. The cost: a session holds the database's write
lock from its first statement until commit, rollback or close, and sessions on
one SQLite file run one at a time. So keep sessions short, never hold one open
across a wait (long-poll, sleep, network call), and never open a second session
while one is open in the same thread: it would wait the 30 s busy timeout and
then fail with "database is locked".

Writers in one process queue on a process-wide lock per database file before
``BEGIN IMMEDIATE`` (released at commit or rollback), so the API's request
threads and the embedded workers hand the write lock over at once instead of
through SQLite's busy handler, which sleeps 1, 2, 5, 10... ms between retries
(measured: most of a 12 ms ``optim_step`` submission was such sleeps). Writers
in other processes still meet the busy handler.

PostgreSQL connections are pinged before use, so a restarted server does not
surface stale pooled connections, and every wait on the server is bounded: a
connection attempt by ``CONNECT_TIMEOUT_S``, a pool checkout by
``POOL_TIMEOUT_S``, a statement by the server's ``statement_timeout``, and a
server that stops answering altogether by ``api.db.watchdog``. Each of these
surfaces as a SQLAlchemy ``OperationalError``/``TimeoutError``, which the API
answers with 503 and ``Retry-After``.

The schema is created and upgraded only through Alembic (``upgrade_to_head``).
"""

import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from api.db import json_codec
from api.db.watchdog import PROBE_TIMEOUT_S, watchdog_for

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
CONNECT_TIMEOUT_S = 3
POOL_TIMEOUT_S = 5.0
POSTGRES_OPTIONS = (
    "-c statement_timeout=30000"  # ms; Loom's statements are short, a longer one is a stuck one
    " -c idle_in_transaction_session_timeout=60000"  # frees the row locks of a client that vanished mid-transaction
)


def database_unavailable(exc: BaseException) -> bool:
    """True for errors that mean "the database cannot serve right now" rather than a bug in the request or value."""
    if isinstance(exc, (OperationalError, PoolTimeoutError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """An engine for ``url`` with Loom's per-backend connection settings.

    ``read_only`` engines (for request paths that only read) skip SQLite's ``BEGIN IMMEDIATE``: in WAL mode
    their reads then never wait for, nor block, the write lock.
    """
    json_args = {"json_serializer": json_codec.dumps, "json_deserializer": json_codec.loads}
    if make_url(url).get_backend_name() != "sqlite":
        return _postgres_engine(url, json_args)
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False}, **json_args)
    event.listen(engine, "connect", _configure_sqlite_connection)
    if not read_only:
        _serialize_writers(engine, _write_lock(str(Path(make_url(url).database or "").resolve())))
    return engine


_WRITE_LOCKS: dict[str, threading.RLock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock(database: str) -> threading.RLock:
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(database, threading.RLock())


def _serialize_writers(engine: Engine, lock: threading.RLock) -> None:
    """Every transaction takes `lock`, then SQLite's write lock (``BEGIN IMMEDIATE``); both go at its end."""

    def begin(connection: Connection) -> None:
        lock.acquire()
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            lock.release()
            raise
        connection.info["loom_write_lock"] = True

    def end(connection: Connection) -> None:
        if connection.info.pop("loom_write_lock", False):
            lock.release()

    event.listen(engine, "begin", begin)
    event.listen(engine, "commit", end)
    event.listen(engine, "rollback", end)


def _postgres_engine(url: str, json_args: dict[str, Any]) -> Engine:
    parsed = make_url(url)
    connect_args: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S}
    if "options" not in parsed.query:
        connect_args["options"] = POSTGRES_OPTIONS
    engine = create_engine(url, pool_pre_ping=True, pool_timeout=POOL_TIMEOUT_S, connect_args=connect_args, **json_args)
    if parsed.get_driver_name() != "psycopg":
        return engine  # the watchdog hooks into psycopg 3 only
    cargs, cparams = engine.dialect.create_connect_args(engine.url)

    def probe() -> None:
        engine.dialect.loaded_dbapi.connect(*cargs, **{**cparams, "connect_timeout": PROBE_TIMEOUT_S}).close()

    watchdog = watchdog_for(parsed.render_as_string(hide_password=False), probe)
    event.listen(engine, "do_connect", lambda _dialect, _record, c_args, c_params: watchdog.connect(c_args, c_params))
    return engine


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (``expire_on_commit=False``)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` that finds ``migrations/`` wherever the process runs."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Config values go through configparser interpolation: escape '%' (e.g. in passwords).
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_to_head(url: str) -> None:
    """Run ``alembic upgrade head`` against ``url``; servers call this at start-up."""
    command.upgrade(alembic_config(url), "head")
