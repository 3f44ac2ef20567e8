"""The worker's program, `loom-worker` (`loom worker ...` and `loom gc ...` hand over to it).

    loom-worker run [--role all|train|sample]
                                        workers only, for LOOM_QUEUE=external or celery deployments
    torchrun --nproc-per-node N -m worker.cli run --role train --zero3
                                        one worker whose base model is sharded over N ranks (worker/lockstep.py)
    loom-worker gc [--grace-hours H]    delete expired checkpoints, then stored files no committed checkpoint (nor
                                        the published tokenizer of a catalogue model) uses

Settings come from the environment (`contract/settings.py`), read once here and passed down.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from datetime import timedelta

from api.db.checkpoints import committed_uris, sweep_expired_checkpoints
from api.db.session import make_engine, make_session_factory, upgrade_to_head
from contract.catalogue import BaseModelEntry
from contract.catalogue_file import CatalogueError, load_catalogue, served_catalogue
from contract.checkpoint_store import configured_checkpoint_store
from contract.published_tokenizers import published_tokenizer_uris
from contract.settings import Settings, load_settings
from worker.engine import Engine
from worker.service import start_workers


def _progress(message: str) -> None:
    print(f"[loom worker] {message}", flush=True)


def _zero3_engine(entries: list[BaseModelEntry], settings: Settings, role: str) -> Engine | None:
    """This rank's part of a ZeRO-3 worker: rank 0's engine to serve with, or None once a follower rank is done."""
    from worker.lockstep import follow, sharded_engine

    if len(entries) != 1 or role != "train":
        raise SystemExit("loom worker --zero3 serves exactly one base model (set LOOM_BASE_MODELS) with --role train")
    engine, leader = sharded_engine(
        entries[0],
        configured_checkpoint_store(settings),
        settings.recovery_every,
        settings.train_token_budget,
        settings.model_cache_dir,
        _progress,
    )
    if leader:
        return engine
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher signals every rank; rank 0 ends the group
    follow(engine)
    return None


def cmd_worker(args: argparse.Namespace, settings: Settings) -> None:
    entries = list(served_catalogue(settings).in_pool(settings.worker_pool).entries.values())
    if not entries:
        raise SystemExit(f"loom worker: no catalogue entry is in pool {settings.worker_pool!r}")
    engines = None
    if args.zero3:
        engine = _zero3_engine(entries, settings, args.role)
        if engine is None:
            return
        engines = {entries[0].name: engine}
    upgrade_to_head(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    if settings.queue == "celery":
        from worker.celery_worker import run_worker

        run_worker(entries, sessions, settings, args.role, progress=_progress, engines=engines)
        return
    handles = start_workers(
        entries,
        sessions,
        settings,
        progress=_progress,
        idle_wait=settings.worker_poll_seconds,
        role=args.role,
        engines=engines,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    for handle in handles.values():
        handle.shutdown()


def cmd_gc(args: argparse.Namespace, settings: Settings) -> None:
    upgrade_to_head(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    expired = sweep_expired_checkpoints(sessions)
    with sessions.begin() as session:
        committed = committed_uris(session)
    store = configured_checkpoint_store(settings)
    tokenizers = published_tokenizer_uris(store, load_catalogue(settings.model_catalogue).entries.values())
    report = store.gc(committed + tokenizers, timedelta(hours=args.grace_hours))
    print(
        f"[loom gc] {expired} expired checkpoint(s) deleted; {len(report.deleted)} orphaned object(s) removed; "
        f"{len(report.aborted_uploads)} stale multipart upload(s) aborted",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="loom-worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("run", help="run workers for LOOM_QUEUE=external or celery")
    worker.add_argument("--role", choices=["all", "train", "sample"], default="all", help="which work to take")
    worker.add_argument(
        "--zero3",
        action="store_true",
        help="shard the base model over the ranks of a torchrun launch with DeepSpeed ZeRO-3 (train role only)",
    )
    worker.set_defaults(func=cmd_worker)
    gc = sub.add_parser("gc", help="delete expired checkpoints and orphaned stored files")
    gc.add_argument("--grace-hours", type=float, default=24.0, help="leave files younger than this (writes in flight)")
    gc.set_defaults(func=cmd_gc)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args, load_settings())
    except CatalogueError as exc:
        raise SystemExit(f"loom worker: {exc}") from None


if __name__ == "__main__":
    main()
