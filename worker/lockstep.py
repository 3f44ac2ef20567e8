"""A training worker whose frozen base model is sharded over several ranks with ZeRO-3, driven in lockstep.

`loom worker --zero3`, launched once per rank by `torchrun` (or DeepSpeed's launcher), serves one base model
whose parameters are partitioned across the ranks (`worker/sharded_base.py`): each rank stores 1/N of the base,
while every rank holds every resident run's LoRA adapter and Adam state in full. Every forward pass is a
collective (ZeRO-3 all-gathers each module's parameters just before it runs), so all ranks must make the same
engine calls in the same order:

- rank 0 is the ordinary worker (database claims, leases, results, checkpoints, Celery or polling) with a
  `LockstepEngine`, which broadcasts each call that runs the model or changes a run (`execute`, `restore`,
  `drop_run`) to the other ranks before running it itself;
- ranks 1..N-1 `follow`: they apply the same calls to their own `Engine`, whose checkpoint store reads but never
  writes (rank 0 writes every checkpoint), and stop when rank 0 closes.

Every rank runs the whole batch (the ranks split memory, not work), so all ranks compute the same gradients and
stay identical without an all-reduce. When idle, rank 0 sends a no-op every `PING_SECONDS` so the followers'
wait never reaches the process group's timeout.

Limits: training only (`--role train`; sampling of a base this large belongs to a tensor-parallel vLLM);
one base model per worker; a failure on one rank only (e.g. out of memory there) desynchronises the ranks,
which then stop at the next collective's timeout and are restarted by the launcher (their runs are rebuilt
elsewhere from the database, as after any worker crash).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from contract.catalogue import BaseModelEntry
from contract.checkpoint_store import CheckpointStore
from contract.jobs import ClaimedJob
from worker.engine import Engine
from worker.outcomes import Outcome
from worker.run_recovery import RestorePlan
from worker.sharded_base import init_distributed, load_sharded_model, partition_sizes

log = logging.getLogger(__name__)

PING_SECONDS = 60.0


def _broadcast(command: tuple[Any, ...] | None) -> tuple[Any, ...]:
    box = [command]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class LockstepEngine(Engine):
    """Rank 0's engine: each call that runs the model or changes a run is broadcast, then run here too."""

    def __init__(self, *args: Any, ping_seconds: float = PING_SECONDS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()  # a broadcast and the collectives of the call it announces never interleave
        self._last_sent = time.monotonic()
        self._closed = threading.Event()
        self._pinger = threading.Thread(target=self._ping, args=(ping_seconds,), name="loom-lockstep-ping", daemon=True)
        self._pinger.start()

    def _lead(self, command: tuple[Any, ...], run: Callable[[], Any]) -> Any:
        with self._lock:
            _broadcast(command)
            self._last_sent = time.monotonic()
            return run()

    def execute(self, jobs: Sequence[ClaimedJob]) -> list[Outcome]:
        jobs = list(jobs)
        return self._lead(("execute", jobs), lambda: super(LockstepEngine, self).execute(jobs))

    def restore(self, plan: RestorePlan) -> None:
        self._lead(("restore", plan), lambda: super(LockstepEngine, self).restore(plan))

    def drop_run(self, model_id: str) -> bool:
        return self._lead(("drop_run", model_id), lambda: super(LockstepEngine, self).drop_run(model_id))

    def close(self) -> None:
        self._closed.set()
        self._pinger.join()
        self._lead(("close",), lambda: super(LockstepEngine, self).close())

    def _ping(self, every: float) -> None:
        while not self._closed.wait(every / 4):
            with self._lock:
                if time.monotonic() - self._last_sent >= every and not self._closed.is_set():
                    _broadcast(("ping",))
                    self._last_sent = time.monotonic()


def sharded_engine(
    entry: BaseModelEntry,
    store: CheckpointStore,
    recovery_every: int,
    train_token_budget: int,
    model_cache_dir: Path,
    progress: Callable[[str], None] = log.info,
) -> tuple[Engine, bool]:
    """Join the launcher's process group and load `entry` partitioned over it. Returns this rank's engine and
    whether it leads: rank 0 gets a `LockstepEngine` to serve with, the others an engine to `follow` with. Every
    rank gets the same `train_token_budget`, so all cut a pass into the same micro-batches (the same collectives)."""
    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    progress(f"rank {rank}/{world}: loading {entry.name} sharded with ZeRO-3 ...")
    lm = load_sharded_model(entry, model_cache_dir)
    sizes = partition_sizes(lm.model)
    progress(f"rank {rank}/{world}: stores {sizes['owned'] / 1e6:.2f}M of {sizes['full'] / 1e6:.2f}M base parameters")
    if rank == 0:
        return LockstepEngine(lm, store, train_token_budget=train_token_budget, recovery_every=recovery_every), True
    return Engine(lm, FollowerStore(store), train_token_budget=train_token_budget), False


class FollowerStore:
    """A follower's view of the shared checkpoint store: reads verify as usual; writes are rank 0's alone."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store

    def write(self, owner: str, run_id: str, checkpoint_id: str, fill: Callable[[Path], None], overwrite: bool = False):
        return "", 0

    def open(self, uri: str) -> Path:
        return self.store.open(uri)


def follow(engine: Engine) -> None:
    """Ranks 1..N-1: apply rank 0's calls to `engine` until rank 0 closes. A call that fails here failed on rank 0
    too (same inputs, same checks), so it is logged and the loop goes on."""
    calls: dict[str, Callable[..., Any]] = {
        "execute": engine.execute,
        "restore": engine.restore,
        "drop_run": engine.drop_run,
        "ping": lambda: None,
    }
    while True:
        name, *args = _broadcast(None)
        if name == "close":
            engine.close()
            return
        try:
            calls[name](*args)
        except Exception:
            log.exception("lockstep %s failed on rank %d", name, torch.distributed.get_rank())
