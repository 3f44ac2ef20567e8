"""Bounded waits on PostgreSQL: a paused or unreachable server turns into a fast error, never a hung request.

A PostgreSQL server that is stopped (SIGSTOP, a frozen VM, a black-holed network) keeps its sockets open: the
kernel still accepts connections and acknowledges bytes, so neither TCP keepalives nor the server's own
``statement_timeout`` ever fire and a query waits forever. This module bounds those waits:

- Engines made by ``api.db.session.make_engine`` open ``WatchedConnection``s: every wait of psycopg on the
  socket (statement, commit, rollback, the pool's pre-ping) is registered with the URL's ``Watchdog``.
- The watchdog's thread looks at the registered waits every ``TICK_S``. When one is older than
  ``SUSPECT_AFTER_S`` it probes the server with a fresh connection. A probe that gets no answer within
  ``PROBE_TIMEOUT_S`` (or cannot reach the server at all) marks the database *down* and severs every wait
  older than ``SUSPECT_AFTER_S`` (socket shutdown): psycopg then raises ``OperationalError`` on a broken
  connection, which SQLAlchemy invalidates and the API answers with 503. A probe that gets any answer from the
  server (even an error such as "too many clients") means it is alive but slow: its ``statement_timeout``
  bounds the query, not this module.
- While down, the thread probes every ``PROBE_INTERVAL_S`` until one succeeds, and new connections wait up to
  ``DOWN_CONNECT_WAIT_S`` for that before failing, so clients that retry without backing off are paced.

Limits: a severed statement's outcome is unknown to its caller (a COMMIT already sent applies when the server
resumes), so callers must retry idempotently. Only the synchronous psycopg 3 driver is watched. One thread per
database URL, started on first use and exiting after ``IDLE_EXIT_S`` without waits.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

log = logging.getLogger(__name__)

TICK_S = 0.25
SUSPECT_AFTER_S = 0.5
PROBE_TIMEOUT_S = 2  # libpq's (and psycopg's) smallest connect_timeout
PROBE_INTERVAL_S = 1.0
DOWN_CONNECT_WAIT_S = 1.0
IDLE_EXIT_S = 30.0


class WatchedConnection(psycopg.Connection):
    """A psycopg connection whose socket waits are visible to a ``Watchdog`` (set by ``Watchdog.connect``)."""

    watchdog: Watchdog | None = None

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        watchdog = self.watchdog
        if watchdog is None:
            return super().wait(*args, **kwargs)
        token = watchdog.enter(self)
        try:
            return super().wait(*args, **kwargs)
        finally:
            watchdog.leave(token)


class Watchdog:
    """Severs waits on an unresponsive server and tracks whether the database is up (see the module doc)."""

    def __init__(self, probe: Callable[[], None]) -> None:
        self._probe = probe
        self._lock = threading.Lock()
        self._waits: dict[int, tuple[WatchedConnection, float]] = {}
        self._next_token = 0
        self._thread: threading.Thread | None = None
        self._last_activity = time.monotonic()
        self._last_probe = 0.0
        self._up = threading.Event()
        self._up.set()

    @property
    def down(self) -> bool:
        return not self._up.is_set()

    # -- used by connections ------------------------------------------------------------------------------

    def connect(self, cargs: tuple, cparams: dict[str, Any]) -> WatchedConnection:
        """Open a watched connection; while the database is down, fail after a short wait for it to return."""
        if self.down and not self._up.wait(DOWN_CONNECT_WAIT_S):
            raise psycopg.OperationalError("database unavailable: PostgreSQL is not answering")
        conn = WatchedConnection.connect(*cargs, **cparams)
        conn.watchdog = self
        return conn

    def enter(self, conn: WatchedConnection) -> int:
        now = time.monotonic()
        with self._lock:
            self._next_token += 1
            token = self._next_token
            self._waits[token] = (conn, now)
            self._last_activity = now
            if self._thread is None:
                self._start_thread()
        return token

    def leave(self, token: int) -> None:
        with self._lock:
            self._waits.pop(token, None)

    # -- the thread ---------------------------------------------------------------------------------------

    def _start_thread(self) -> None:  # caller holds the lock
        self._thread = threading.Thread(target=self._run, name="loom-db-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(TICK_S)
            now = time.monotonic()
            with self._lock:
                suspects = [token for token, (_, started) in self._waits.items() if now - started > SUSPECT_AFTER_S]
                if not suspects and not self.down and now - self._last_activity > IDLE_EXIT_S:
                    self._thread = None
                    return
            if (suspects or self.down) and now - self._last_probe >= PROBE_INTERVAL_S:
                self._check()
            if self.down:
                self._sever(suspects)

    def _check(self) -> None:
        self._last_probe = time.monotonic()
        try:
            self._probe()
        except Exception as exc:
            if not isinstance(exc, psycopg.Error):
                log.exception("database probe failed unexpectedly; treating the database as up")
                self._up.set()
                return
            # No answer, or nothing listening: down. An error the server sent (SQLSTATE set) proves it is alive.
            if isinstance(exc, psycopg.errors.ConnectionTimeout) or exc.sqlstate is None:
                if not self.down:
                    log.warning("PostgreSQL is not answering (%s); failing waits on it", exc)
                self._up.clear()
                return
        if self.down:
            log.warning("PostgreSQL answers again")
        self._up.set()

    def _sever(self, tokens: list[int]) -> None:
        with self._lock:
            conns = [self._waits[token][0] for token in tokens if token in self._waits]
            for conn in conns:
                _shutdown_socket(conn)


def _shutdown_socket(conn: WatchedConnection) -> None:
    """Wake the thread blocked on ``conn`` with an EOF: libpq then marks the connection broken."""
    try:
        dup = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except (OSError, psycopg.Error):
        return  # already closed
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()


_watchdogs: dict[str, Watchdog] = {}
_watchdogs_lock = threading.Lock()


def watchdog_for(key: str, probe: Callable[[], None]) -> Watchdog:
    """The process-wide watchdog of one database (``key``: its URL), made with ``probe`` on first use."""
    with _watchdogs_lock:
        if key not in _watchdogs:
            _watchdogs[key] = Watchdog(probe)
        return _watchdogs[key]
