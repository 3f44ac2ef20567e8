"""Server settings, read once from the environment (all optional; the defaults are the embedded laptop setup).

| variable | default | meaning |
|---|---|---|
| `LOOM_DATA_DIR` | `./.loom` | where the SQLite database and the local checkpoint store live |
| `LOOM_DATABASE_URL` | `sqlite:///<data dir>/loom.db` | any SQLAlchemy URL (PostgreSQL: `postgresql+psycopg://...`) |
| `LOOM_CHECKPOINT_DIR` | `<data dir>/checkpoints` | local checkpoint store root |
| `LOOM_CHECKPOINT_URL` | the checkpoint dir | where workers store checkpoints: a local folder, or `s3://bucket/prefix` (endpoint and credentials from the standard `AWS_*` variables, e.g. `AWS_ENDPOINT_URL`) |
| `LOOM_CHECKPOINT_CACHE_DIR` | `~/.cache/loom/checkpoints` | with `s3://`: where workers keep verified downloads, up to `LOOM_CHECKPOINT_CACHE_BYTES` (20 GiB) |
| `LOOM_BASE_MODELS` | all built-in | comma-separated base models to serve |
| `LOOM_QUEUE` | `embedded` | `embedded` (workers in this process), `external` (separate `loom worker`s polling the database) or `celery` (workers woken through Celery on Redis, runs pinned to workers) |
| `LOOM_BROKER_URL` | `redis://127.0.0.1:6379/0` | with `celery`: the Redis that carries wake-ups and completion/stream events |
| `LOOM_WORKER_DEAD_SECONDS` | 15 | with `celery`: a worker silent this long is reaped (its runs move, its requests are retried) |
| `LOOM_VISIBILITY_TIMEOUT` | 3600 | with `celery`: seconds before Redis redelivers an unacknowledged wake-up |
| `LOOM_LEASE_SECONDS` | 60 | with `celery`: a worker's claim on a job lasts this long, renewed by its heartbeat |
| `LOOM_HEARTBEAT_FILE` | unset | a worker touches this file every heartbeat (for container liveness probes) |
| `LOOM_MAX_BODY_BYTES` | 64 MiB | larger request bodies get 413 |
| `LOOM_LONG_POLL_SECONDS` | 30 | how long `retrieve_future` holds a poll before answering `try_again` |
| `LOOM_MAX_STREAMS_PER_KEY` | 8 | concurrent OpenAI streams per tenant; more get 429 |
| `LOOM_WORKER_POLL_SECONDS` | 0.1 | how often a separate `loom worker` polls the database when idle |
| `LOOM_SAMPLER_BACKEND` | `loom` | how workers sample: `loom` (our engine) or `vllm` (a vLLM server per base model, from `.venv-vllm`; read by worker/service.py) |
| `LOOM_VLLM_MAX_ADAPTERS` / `LOOM_VLLM_CONCURRENCY` | 4 / 32 | with `vllm`: checkpoints sampled at once (LoRA slots), requests open to vLLM at once (worker/vllm_sampling.py) |
| `LOOM_RECOVERY_EVERY` | 50 | optimizer steps between a run's hidden recovery checkpoints (bounds the replay when a run is rebuilt on another worker; 0 = never; read by worker/service.py) |
| `LOOM_VLLM_VENV` | `<repo>/.venv-vllm` | with `vllm`: the virtual environment vLLM runs from |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _models_from_env() -> list[str]:
    raw = os.environ.get("LOOM_BASE_MODELS", "")
    return [m.strip() for m in raw.split(",") if m.strip()]


@dataclass
class Settings:
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("LOOM_DATA_DIR", ".loom")).resolve())
    database_url: str | None = field(default_factory=lambda: os.environ.get("LOOM_DATABASE_URL"))
    checkpoint_dir: Path | None = field(
        default_factory=lambda: Path(p) if (p := os.environ.get("LOOM_CHECKPOINT_DIR")) else None
    )
    checkpoint_url: str | None = field(default_factory=lambda: os.environ.get("LOOM_CHECKPOINT_URL"))
    base_models: list[str] = field(default_factory=_models_from_env)
    queue: str = field(default_factory=lambda: os.environ.get("LOOM_QUEUE", "embedded"))
    max_body_bytes: int = field(default_factory=lambda: int(os.environ.get("LOOM_MAX_BODY_BYTES", 64 * 1024 * 1024)))
    long_poll_seconds: float = field(default_factory=lambda: float(os.environ.get("LOOM_LONG_POLL_SECONDS", 30)))
    max_streams_per_key: int = field(default_factory=lambda: int(os.environ.get("LOOM_MAX_STREAMS_PER_KEY", 8)))
    broker_url: str = field(default_factory=lambda: os.environ.get("LOOM_BROKER_URL", "redis://127.0.0.1:6379/0"))
    worker_dead_seconds: float = field(default_factory=lambda: float(os.environ.get("LOOM_WORKER_DEAD_SECONDS", 15)))
    visibility_timeout: float = field(default_factory=lambda: float(os.environ.get("LOOM_VISIBILITY_TIMEOUT", 3600)))
    lease_seconds: float = field(default_factory=lambda: float(os.environ.get("LOOM_LEASE_SECONDS", 60)))
    heartbeat_file: str | None = field(default_factory=lambda: os.environ.get("LOOM_HEARTBEAT_FILE"))

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'loom.db'}"
        if self.checkpoint_dir is None:
            self.checkpoint_dir = self.data_dir / "checkpoints"
        if self.checkpoint_url is None:
            self.checkpoint_url = str(self.checkpoint_dir)
