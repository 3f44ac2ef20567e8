"""`loom gc` on the local store: expired checkpoints go (row and files), orphans and crashed-write staging
folders older than the grace period go, committed checkpoints and young files stay. Run as the real command, so
the `loom` program's hand-over to the worker's (`python -m worker.cli gc`) is exercised too."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from api.db.models import Checkpoint
from api.db.types import utcnow
from contract.checkpoint_store import LocalCheckpointStore


def write(store: LocalCheckpointStore, run: str, name: str) -> str:
    return store.write("alice", run, name, lambda folder: (folder / "adapter_model.safetensors").write_bytes(b"x"))[0]


def folder(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def age(path: Path, hours: float) -> None:
    then = time.time() - hours * 3600
    for p in [path, *path.rglob("*")]:
        os.utime(p, (then, then))


def test_gc_deletes_expired_and_orphaned_files_only(tmp_path, sqlite_url, session_factory, make_run):
    store = LocalCheckpointStore(tmp_path / "ckpt")
    env = os.environ | {
        "LOOM_DATABASE_URL": sqlite_url,
        "LOOM_DATA_DIR": str(tmp_path / "data"),
        "LOOM_CHECKPOINT_DIR": str(store.root),
    }
    run = make_run()
    kept, expired, orphan = (write(store, run, name) for name in ("weights/kept", "weights/old", "weights/orphan"))
    young_orphan = write(store, run, "weights/young")
    staging = store.root / "alice" / ".staging-crashed"
    staging.mkdir()
    with session_factory.begin() as session:
        for uri, expires in ((kept, None), (expired, utcnow() - timedelta(minutes=1))):
            name = uri.rsplit("/", 1)[1]
            session.add(
                Checkpoint(
                    run_id=run,
                    owner="alice",
                    checkpoint_id=f"weights/{name}",
                    kind="training",
                    tinker_path=f"tinker://{run}/weights/{name}",
                    storage_uri=uri,
                    size_bytes=1,
                    expires_at=expires,
                    committed=True,
                )
            )
    for uri in (kept, expired, orphan):
        age(folder(uri), hours=48)
    age(staging, hours=48)

    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "gc", "--grace-hours", "24"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "1 expired checkpoint(s) deleted" in done.stdout

    exists = {uri: folder(uri).exists() for uri in (kept, expired, orphan, young_orphan)}
    assert exists == {kept: True, expired: False, orphan: False, young_orphan: True}
    assert not staging.exists()
    with session_factory() as session:
        assert list(session.scalars(select(Checkpoint.storage_uri))) == [kept]
