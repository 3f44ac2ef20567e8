"""The embedded queue of `loom serve`: the worker consumers run in threads of the API process.

This is the one module of `api/` that imports worker code (`worker.service.start_workers`), and only when the
queue starts, so an API process configured for external or Celery workers never loads torch. Completions and
per-token stream events arrive as direct callbacks; a submission wakes its model's consumer at once.

Limits: one process holds the API and every base model served; a crash of one is a crash of both.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from api.db.jobs import release_expired_leases
from api.db.types import utcnow
from api.queue import SignalledQueue
from contract.catalogue import Catalogue
from contract.settings import Settings


class EmbeddedQueue(SignalledQueue):
    def __init__(
        self,
        settings: Settings,
        catalogue: Catalogue,
        session_factory: sessionmaker[Session],
        progress: Callable[[str], None] = print,
    ) -> None:
        super().__init__(poll_interval=5.0)
        self.settings = settings
        self.catalogue = catalogue
        self.session_factory = session_factory
        self.progress = progress
        self._handles: dict = {}

    def prepare(self) -> None:
        self.start()

    def start(self) -> None:
        from worker.service import start_workers

        if self._handles:  # already started by `prepare`
            return

        with self.session_factory.begin() as session:
            # In embedded mode no other worker exists: leases left by a previous process are dead.
            later = utcnow() + timedelta(days=365)
            requeued = release_expired_leases(session, later, max_attempts=self.settings.max_attempts)
        if requeued:
            self.progress(f"requeued {requeued} request(s) left running by a previous server process")
        self._handles = start_workers(
            list(self.catalogue.entries.values()),
            self.session_factory,
            self.settings,
            on_finished=self.finished,
            progress=self.progress,
            on_stream=self.streams.publish,
        )

    def stop(self) -> None:
        for handle in self._handles.values():
            handle.shutdown()

    def submitted(self, base_model: str, placed_on: str | None = None, sampling: bool = False) -> None:
        handle = self._handles.get(base_model)
        if handle is not None:
            handle.wake()
