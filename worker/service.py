"""Start consumers for a set of base models: the entry point both `loom worker` and the embedded server use.

`start_workers` loads each base model once (frozen), builds its engine and consumer, and runs each consumer in
its own daemon thread. The caller gets `WorkerHandle`s to wake (after a submission) and to stop them.

The sampler backend is `LOOM_SAMPLER_BACKEND` (read here, like every worker-side setting): `loom` (default, our
continuous-batching engine) or `vllm` (a vLLM server per base model, worker/vllm/).
`LOOM_RECOVERY_EVERY` (default 50; 0 turns it off): every that many optimizer steps of a run, its worker writes a
hidden recovery checkpoint, so a run rebuilt after a crash replays at most that many steps (worker/run_recovery.py).

Limits: one consumer thread per base model; models load sequentially at start-up.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from worker.checkpoint_store import open_checkpoint_store
from worker.consumer import Consumer
from worker.engine import Engine
from worker.models.loader import load_base_model
from worker.models.registry import BaseModelSpec
from worker.sampling_engine import StreamSink

log = logging.getLogger(__name__)


@dataclass
class WorkerHandle:
    consumer: Consumer
    thread: threading.Thread
    stop: threading.Event

    def wake(self) -> None:
        self.consumer.wake.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        self.stop.set()
        self.consumer.wake.set()
        self.thread.join(timeout)
        self.consumer.engine.close()


def sampler_backend_from_env() -> str:
    """`LOOM_SAMPLER_BACKEND`: `loom` (default) or `vllm`."""
    return os.environ.get("LOOM_SAMPLER_BACKEND", "").strip().lower() or "loom"


def recovery_every_from_env() -> int:
    """`LOOM_RECOVERY_EVERY`: optimizer steps between a run's recovery checkpoints (default 50, 0 = never)."""
    value = int(os.environ.get("LOOM_RECOVERY_EVERY", "50"))
    if value < 0:
        raise ValueError(f"LOOM_RECOVERY_EVERY must be >= 0, not {value}")
    return value


def start_workers(
    specs: Sequence[BaseModelSpec],
    session_factory: sessionmaker[Session],
    checkpoint_root: str | Path,
    on_finished: Callable[[list[str]], None] = lambda ids: None,
    progress: Callable[[str], None] = log.info,
    idle_wait: float = 1.0,
    on_stream: StreamSink | None = None,
    sampler_backend: str | None = None,
    worker_id: str | None = None,
    role: str = "all",
    sticky: bool = False,
    lease_seconds: float = 600.0,
    engines: dict[str, Engine] | None = None,
) -> dict[str, WorkerHandle]:
    """`idle_wait`: seconds between database polls when idle (a `wake()` cuts it short; separate worker
    processes get no wake-ups, so they poll more often). `on_stream(job_id, events)` receives per-token text
    deltas of streaming OpenAI requests. `checkpoint_root`: a local folder or `s3://bucket/prefix`.
    `sampler_backend`: `loom` or `vllm` (default: `LOOM_SAMPLER_BACKEND`). `worker_id` names this process in
    leases and placements (default: one id per model thread); `role` and `sticky` are passed to the consumers.
    `engines`: engines built by the caller, by base model name (a ZeRO-3 `LockstepEngine`); the rest are built here."""
    sampler_backend = sampler_backend or sampler_backend_from_env()
    recovery_every = recovery_every_from_env()
    store = open_checkpoint_store(checkpoint_root)
    handles: dict[str, WorkerHandle] = {}
    for spec in specs:
        engine = (engines or {}).get(spec.name)
        if engine is None:
            progress(f"loading {spec.name} ...")
            lm = load_base_model(spec)
            engine = Engine(lm, store, on_stream, sampler_backend=sampler_backend, recovery_every=recovery_every)
        lease_owner = worker_id or f"{socket.gethostname()}:{spec.cache_name}:{threading.get_native_id()}"
        consumer = Consumer(
            engine, session_factory, lease_owner, on_finished, lease_seconds=lease_seconds, role=role, sticky=sticky
        )
        stop = threading.Event()
        thread = threading.Thread(
            target=consumer.run_forever, args=(stop, idle_wait), name=f"loom-worker-{spec.cache_name}", daemon=True
        )
        thread.start()
        handles[spec.name] = WorkerHandle(consumer, thread, stop)
        params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.lm.model.parameters())  # ZeRO-3: full size
        progress(f"{spec.name} ready ({params / 1e6:.0f}M params, frozen)")
    return handles
