"""The `loom` command: serve, worker, keys, runs.

    loom serve [--host H] [--port P]    API + embedded workers; prints the URL and an API key
    loom worker [--role train|sample]   workers only, for LOOM_QUEUE=external or celery deployments
    torchrun --nproc-per-node N -m api.cli worker --role train --zero3
                                        one worker whose base model is sharded over N ranks (worker/lockstep.py)
    loom migrate                        apply database migrations (alembic upgrade head) and exit
    loom gc [--grace-hours H]           delete expired checkpoints, then stored files no committed checkpoint uses
    loom keys create --owner O [--name N] / loom keys revoke KEY_ID --owner O
    loom runs [--owner O]               training runs with their checkpoints

Settings come from the environment (see `api/settings.py`). On first `serve`, a key for owner `local` is
created and its plaintext kept in `<data dir>/api_key` (mode 0600) so later runs print the same key.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from sqlalchemy import select

from api.db.keys import authenticate, create_api_key, revoke_api_key
from api.db.models import Checkpoint, TrainingRun
from api.db.session import make_engine, make_session_factory, upgrade_to_head
from api.settings import Settings


def _sessions(settings: Settings):
    upgrade_to_head(settings.database_url)
    return make_session_factory(make_engine(settings.database_url))


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def local_api_key(settings: Settings, sessions) -> str:
    """The embedded server's key for owner `local`, created once and remembered in the data dir."""
    key_file = settings.data_dir / "api_key"
    with sessions.begin() as session:
        if key_file.exists():
            key = key_file.read_text().strip()
            if authenticate(session, key) is not None:
                return key
        _, key = create_api_key(session, "local", "loom serve")
    key_file.write_text(key + "\n")
    os.chmod(key_file, 0o600)
    return key


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from api.app import build_state, create_app

    settings = Settings()
    state = build_state(settings, progress=lambda msg: print(f"[loom] {msg}", flush=True))
    key = local_api_key(settings, state.sessions)
    url = f"http://{args.host}:{args.port}"
    print(f"[loom] database   {_without_password(settings.database_url)}", flush=True)
    print(f"[loom] checkpoints {settings.checkpoint_url}", flush=True)
    print(f"[loom] models     {', '.join(state.queue.models)}", flush=True)
    print(f"[loom] serving    {url}", flush=True)
    print(f"[loom] use:       export TINKER_BASE_URL={url} TINKER_API_KEY={key}", flush=True)
    uvicorn.run(create_app(state=state), host=args.host, port=args.port, log_level=args.log_level)


def _zero3_engines(specs, settings: Settings, role: str, progress) -> dict | None:
    """This rank's part of a ZeRO-3 worker: rank 0's engine to serve with, or None once a follower rank is done."""
    from worker.checkpoint_store import open_checkpoint_store
    from worker.lockstep import follow, sharded_engine
    from worker.service import recovery_every_from_env

    if len(specs) != 1 or role != "train":
        raise SystemExit("loom worker --zero3 serves exactly one base model (set LOOM_BASE_MODELS) with --role train")
    engine, leader = sharded_engine(
        specs[0], open_checkpoint_store(settings.checkpoint_url), recovery_every_from_env(), progress
    )
    if leader:
        return {specs[0].name: engine}
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher signals every rank; rank 0 ends the group
    follow(engine)
    return None


def cmd_worker(args: argparse.Namespace) -> None:
    from api.queue import served_specs
    from worker.service import start_workers

    settings = Settings()
    progress = lambda m: print(f"[loom worker] {m}", flush=True)  # noqa: E731
    specs = served_specs(settings.base_models)
    engines = None
    if args.zero3:
        engines = _zero3_engines(specs, settings, args.role, progress)
        if engines is None:
            return
    sessions = _sessions(settings)
    if settings.queue == "celery":
        from worker.celery_worker import run_worker

        run_worker(
            specs,
            sessions,
            settings.checkpoint_url,
            settings.broker_url,
            args.role,
            dead_after=settings.worker_dead_seconds,
            visibility_timeout=settings.visibility_timeout,
            lease_seconds=settings.lease_seconds,
            heartbeat_file=settings.heartbeat_file,
            progress=progress,
            engines=engines,
        )
        return
    handles = start_workers(
        specs,
        sessions,
        settings.checkpoint_url,
        progress=progress,
        idle_wait=float(os.environ.get("LOOM_WORKER_POLL_SECONDS", "0.1")),
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


def cmd_migrate(args: argparse.Namespace) -> None:
    settings = Settings()
    upgrade_to_head(settings.database_url)
    print(f"[loom] database at head: {_without_password(settings.database_url)}", flush=True)


def cmd_gc(args: argparse.Namespace) -> None:
    from datetime import timedelta

    from sqlalchemy import delete

    from api.db.types import utcnow
    from worker.checkpoint_store import delete_checkpoint_uri, open_checkpoint_store

    settings = Settings()
    sessions = _sessions(settings)
    with sessions.begin() as session:
        expired = session.scalars(
            delete(Checkpoint).where(Checkpoint.expires_at < utcnow()).returning(Checkpoint.storage_uri)
        ).all()
        committed = list(session.scalars(select(Checkpoint.storage_uri).where(Checkpoint.committed.is_(True))))
    for uri in expired:
        delete_checkpoint_uri(uri)
    report = open_checkpoint_store(settings.checkpoint_url).gc(committed, timedelta(hours=args.grace_hours))
    print(
        f"[loom gc] {len(expired)} expired checkpoint(s) deleted; {len(report.deleted)} orphaned object(s) removed; "
        f"{len(report.aborted_uploads)} stale multipart upload(s) aborted",
        flush=True,
    )


def cmd_keys(args: argparse.Namespace) -> None:
    sessions = _sessions(Settings())
    with sessions.begin() as session:
        if args.action == "create":
            record, key = create_api_key(session, args.owner, args.name)
            print(f"{record.id}\t{key}")
        elif not revoke_api_key(session, args.key_id, args.owner):
            sys.exit(f"no active key {args.key_id} for owner {args.owner}")


def cmd_runs(args: argparse.Namespace) -> None:
    sessions = _sessions(Settings())
    with sessions.begin() as session:
        query = select(TrainingRun).order_by(TrainingRun.created_at)
        if args.owner:
            query = query.where(TrainingRun.owner == args.owner)
        for run in session.scalars(query):
            print(
                f"{run.id}\t{run.owner}\t{run.base_model}\trank={run.lora_rank}\t{run.status}\tnext_seq={run.next_seq_id}"
            )
            for c in session.scalars(
                select(Checkpoint).where(Checkpoint.run_id == run.id, Checkpoint.ephemeral.is_(False))
            ):
                print(f"    {c.tinker_path}\t{c.size_bytes} bytes")


def main(argv: list[str] | None = None) -> None:
    # The API and the workers share few cores: OpenMP threads that spin while waiting starve the other side
    # (measured several-fold slowdowns on a loaded 2-core box). Must be set before torch loads libgomp.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(
        prog="loom", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the API with embedded workers")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="warning")
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help="run workers for LOOM_QUEUE=external or celery")
    worker.add_argument("--role", choices=["all", "train", "sample"], default="all", help="which work to take")
    worker.add_argument(
        "--zero3",
        action="store_true",
        help="shard the base model over the ranks of a torchrun launch with DeepSpeed ZeRO-3 (train role only)",
    )
    worker.set_defaults(func=cmd_worker)
    sub.add_parser("migrate", help="apply database migrations and exit").set_defaults(func=cmd_migrate)
    gc = sub.add_parser("gc", help="delete expired checkpoints and orphaned stored files")
    gc.add_argument("--grace-hours", type=float, default=24.0, help="leave files younger than this (writes in flight)")
    gc.set_defaults(func=cmd_gc)
    keys = sub.add_parser("keys", help="create or revoke API keys")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create")
    create.add_argument("--owner", required=True)
    create.add_argument("--name", default="cli")
    revoke = keys_sub.add_parser("revoke")
    revoke.add_argument("key_id")
    revoke.add_argument("--owner", required=True)
    keys.set_defaults(func=cmd_keys)
    runs = sub.add_parser("runs", help="list training runs and checkpoints")
    runs.add_argument("--owner")
    runs.set_defaults(func=cmd_runs)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
