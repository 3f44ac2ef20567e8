"""A scaled-out Loom on loopback for fault tests: private Redis, a throw-away PostgreSQL database, one API
process (`LOOM_QUEUE=celery`) and any number of `loom worker` processes that can be SIGKILLed.

Redis is a private `redis-server` on a free port (never the machine's shared one, which other tests use), so
a test may kill -9 and restart it. Workers declare a peer dead after `DEAD_AFTER` seconds of silence.

`datum(offset)` is the deterministic SL example these tests and benchmarks/scaleout.py train on; `training_client`
and `train` run it through the official SDK.

Limits: models come from the shared model cache; every process loads its own copy of the base model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
import tinker
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from tinker import types

from api.db.models import Checkpoint, Job, TrainingRun, Worker
from api.db.session import make_engine, make_session_factory
from contract.checkpoint_store import open_checkpoint_store
from tests.e2e.server import LoomServer, free_port

TINY = "loom/tiny-kimi-k2"
DEAD_AFTER = 3.0
REPO = Path(__file__).resolve().parents[2]


@dataclass
class PrivateRedis:
    folder: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory-policy",
                "noeviction",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def kill9(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


class Cluster:
    def __init__(self, folder: Path, database_url: str, redis_: PrivateRedis, **env: str) -> None:
        self.folder = folder
        self.redis = redis_
        self.env = {
            "LOOM_QUEUE": "celery",
            "LOOM_DATABASE_URL": database_url,
            "LOOM_BROKER_URL": redis_.url,
            "LOOM_BASE_MODELS": TINY,
            "LOOM_CHECKPOINT_DIR": str(folder / "checkpoints"),
            "LOOM_WORKER_DEAD_SECONDS": str(DEAD_AFTER),
            "OMP_NUM_THREADS": "1",
            **env,
        }
        self.api = LoomServer(folder / "api", free_port(), env_extra=self.env)
        self.workers: dict[int, subprocess.Popen] = {}
        self.sessions: sessionmaker[Session] = make_session_factory(make_engine(database_url))

    def start(self) -> Cluster:
        """Start the API (it migrates the database); workers are started by each test."""
        (self.folder / "api").mkdir(parents=True, exist_ok=True)
        self.api.start()
        return self

    def start_worker(self, role: str = "all") -> subprocess.Popen:
        log = open(self.folder / f"worker-{len(self.workers)}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "worker", "--role", role],
            env={**os.environ, "LOOM_DATA_DIR": str(self.folder / "api"), **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.workers[process.pid] = process
        return process

    def registered(self) -> list[Worker]:
        with self.sessions() as session:
            return list(session.scalars(select(Worker)))

    def wait_for_workers(self, count: int, timeout: float = 120.0) -> None:
        wait_until(lambda: len(self.registered()) >= count, timeout, f"{count} registered worker(s)")
        time.sleep(1.0)  # registration precedes model loading and the Celery consumer: let them come up

    def process_of(self, worker_id: str) -> subprocess.Popen:
        """The process behind a registered worker id (`<host>-<pid>-<hex>`)."""
        return self.workers[int(worker_id.split("-")[-2])]

    def placement(self, model_id: str) -> str | None:
        with self.sessions() as session:
            return session.get(TrainingRun, model_id).worker_id

    def jobs(self, model_id: str) -> list[Job]:
        with self.sessions() as session:
            return list(session.scalars(select(Job).where(Job.model_id == model_id).order_by(Job.seq_id)))

    def checkpoint_folder(self, tinker_path: str) -> Path:
        """A committed checkpoint's verified files, read through the store the workers write (local or S3)."""
        with self.sessions() as session:
            uri = session.scalar(select(Checkpoint.storage_uri).where(Checkpoint.tinker_path == tinker_path))
        location = self.env.get("LOOM_CHECKPOINT_URL") or self.env["LOOM_CHECKPOINT_DIR"]
        return open_checkpoint_store(location, self.folder / "reader-cache").open(uri)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.folder.glob("**/*.log")))

    def stop(self) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.workers.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.api.stop()
        self.sessions.kw["bind"].dispose()


@contextmanager
def running_cluster(folder: Path, database_url: str, **env: str) -> Iterator[Cluster]:
    """A private Redis and a started API for the duration; worker logs are printed if the body fails."""
    redis_ = PrivateRedis(folder / "redis").start()
    cluster = Cluster(folder, database_url, redis_, **env)
    try:
        cluster.start()
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
        redis_.kill9()


def datum(offset: int, length: int = 24) -> types.Datum:
    """A deterministic SL datum of `length` tiny-Kimi tokens (different per `offset`) for the official SDK."""
    tokens = [(offset * 37 + i * 11) % 5000 + 10 for i in range(length + 1)]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:]}
    )


ADAM = types.AdamParams(learning_rate=1e-2)


def training_client(seed: int = 7):
    """A LoRA run (rank 4) on the tiny Kimi K2 through the official SDK (TINKER_BASE_URL / TINKER_API_KEY)."""
    return tinker.ServiceClient().create_lora_training_client(base_model=TINY, rank=4, seed=seed).result()


def train(client, steps: int, batch: int = 2) -> list[float]:
    """`steps` pipelined SL steps; returns the losses."""
    futures = []
    for step in range(steps):
        fb = client.forward_backward([datum(step * batch + i) for i in range(batch)], "cross_entropy")
        futures.append((fb, client.optim_step(ADAM)))
    losses = [fb.result().metrics["loss:sum"] for fb, _ in futures]
    for _, optim in futures:
        optim.result()
    return losses


def wait_until(condition, timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
