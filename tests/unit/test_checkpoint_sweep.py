"""Expired checkpoints leave the store on their own: a worker's idle pass deletes their rows and files, and keeps
every checkpoint whose TTL has not passed (the same sweep `loom gc` runs, see test_cli_gc.py)."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

from sqlalchemy import select

import worker.consumer
from api.db.checkpoints import sweep_expired_checkpoints
from api.db.models import Checkpoint, CheckpointKind
from api.db.types import utcnow
from contract.checkpoint_store import LocalCheckpointStore
from tests.unit.api_fixtures import commit_checkpoint
from worker.consumer import Consumer


def _weights(folder: Path) -> None:
    (folder / "adapter.bin").write_bytes(b"w" * 8)


def stored(store: LocalCheckpointStore, session_factory, run_id: str, name: str, expires_in: timedelta | None) -> Path:
    uri = commit_checkpoint(session_factory.begin, store, run_id, f"weights/{name}", CheckpointKind.TRAINING, _weights)
    if expires_in is not None:
        with session_factory.begin() as session:
            session.scalar(select(Checkpoint).where(Checkpoint.storage_uri == uri)).expires_at = utcnow() + expires_in
    return Path(uri.removeprefix("file://"))


def test_an_idle_worker_sweeps_expired_checkpoints(tmp_path, session_factory, make_run, monkeypatch) -> None:
    store = LocalCheckpointStore(tmp_path / "ckpt")
    run_id = make_run()
    expired = stored(store, session_factory, run_id, "expired", timedelta(seconds=-1))
    later = stored(store, session_factory, run_id, "later", timedelta(hours=1))
    forever = stored(store, session_factory, run_id, "forever", None)

    stop = threading.Event()
    swept: list[int] = []

    def sweep_then_stop(sessions) -> int:
        swept.append(sweep_expired_checkpoints(sessions))
        stop.set()  # one idle pass is enough
        return swept[-1]

    monkeypatch.setattr(worker.consumer, "sweep_expired_checkpoints", sweep_then_stop)
    idle_engine = SimpleNamespace(busy=False, lm=SimpleNamespace(spec=SimpleNamespace(name="tiny-kimi-k2")))
    Consumer(idle_engine, session_factory, "w1", lease_seconds=60).run_forever(stop, idle_wait=0)

    assert swept == [1]
    assert not expired.exists() and later.exists() and forever.exists()
    with session_factory() as session:
        names = sorted(session.scalars(select(Checkpoint.checkpoint_id)))
    assert names == ["weights/forever", "weights/later"]


def test_a_sweep_whose_file_deletion_fails_still_drops_the_row(
    tmp_path, session_factory, make_run, monkeypatch
) -> None:
    """The row goes either way: files without a row are what `loom gc` removes."""
    store = LocalCheckpointStore(tmp_path / "ckpt")
    folder = stored(store, session_factory, make_run(), "expired", timedelta(seconds=-1))

    def unreachable(uri: str) -> None:
        raise OSError("store unreachable")

    monkeypatch.setattr("contract.checkpoint_store.delete_checkpoint_uri", unreachable)
    assert sweep_expired_checkpoints(session_factory) == 1
    assert folder.exists()
    with session_factory() as session:
        assert session.scalar(select(Checkpoint)) is None
