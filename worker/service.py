"""Start consumers for a set of base models: what `loom worker`, the Celery worker and the embedded server run.

`start_workers` loads each base model once (frozen), builds its engine (with the sampling backend the settings
choose: Loom's continuous-batching engine, or a vLLM server per base model) and its consumer, publishes the model's
client tokenizer for the API to serve (`contract/published_tokenizers.py`), and runs each consumer in its own daemon
thread. The caller gets `WorkerHandle`s to wake (after a submission) and to stop them.
Every setting arrives in the `Settings` the process's entry point read.

Limits: one consumer thread per base model; models load sequentially at start-up.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from contract.catalogue import BaseModelEntry
from contract.checkpoint_store import CheckpointStore, configured_checkpoint_store
from contract.published_tokenizers import publish_tokenizer
from contract.settings import TRAIN_PASSES_PER_TICK, Settings
from worker.consumer import Consumer
from worker.engine import Engine
from worker.heap import cap_heap_blocks
from worker.models.loader import LoadedModel, load_base_model
from worker.models.runtime import runtime_for
from worker.sampling_backend import SamplingBackend
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


def build_engine(
    lm: LoadedModel, store: CheckpointStore, settings: Settings, on_stream: StreamSink | None = None
) -> Engine:
    """The engine for one loaded base model, sampling with the backend `settings.sampler_backend` names; a
    vision-language model always samples with Loom's own sampler (the vLLM backend takes token ids, not images,
    and vLLM applies no vision-tower LoRA). LoRA deltas are computed where `settings.lora_kernels` says."""
    lm.router.kernels = settings.lora_kernels
    sampling: SamplingBackend | None = None
    if settings.sampler_backend == "vllm" and lm.images is not None:
        log.warning("%s is a vision-language model: it samples with Loom's sampler, not vLLM", lm.spec.name)
    elif settings.sampler_backend == "vllm":
        from worker.vllm.engine import VllmSamplingEngine  # starts a vLLM server for this model

        sampling = VllmSamplingEngine(
            lm,
            store,
            on_stream,
            venv=settings.vllm_venv,
            max_adapters=settings.vllm_max_adapters,
            concurrency=settings.vllm_concurrency,
            kv_cache_gib=settings.vllm_kv_cache_gib,
        )
    return Engine(
        lm,
        store,
        sampling,
        on_stream=on_stream,
        token_budget=settings.token_budget,
        train_token_budget=settings.train_token_budget,
        recovery_every=settings.recovery_every,
    )


def start_workers(
    entries: Sequence[BaseModelEntry],
    session_factory: sessionmaker[Session],
    settings: Settings,
    *,
    on_finished: Callable[[list[str]], None] = lambda ids: None,
    progress: Callable[[str], None] = log.info,
    idle_wait: float = 1.0,
    on_stream: StreamSink | None = None,
    worker_id: str | None = None,
    role: str = "all",
    sticky: bool = False,
    engines: dict[str, Engine] | None = None,
) -> dict[str, WorkerHandle]:
    """`idle_wait`: seconds between database polls when idle (a `wake()` cuts it short; separate worker
    processes get no wake-ups, so they poll more often). `on_stream(job_id, events)` receives per-token text
    deltas of streaming OpenAI requests. `worker_id` names this process in leases and placements (default: one id
    per model thread); `role` and `sticky` are passed to the consumers. `engines`: engines built by the caller, by
    base model name (a ZeRO-3 `LockstepEngine`); the rest are built here."""
    if cap_heap_blocks(settings.malloc_mmap_threshold):
        progress(f"freed memory blocks of {settings.malloc_mmap_threshold} bytes and more go back to the OS at once")
    store = configured_checkpoint_store(settings)
    handles: dict[str, WorkerHandle] = {}
    for entry in entries:
        engine = (engines or {}).get(entry.name)
        if engine is None:
            progress(f"loading {entry.name} ...")
            lm = load_base_model(entry, settings.model_cache_dir, runtime_for(settings))
            engine = build_engine(lm, store, settings, on_stream)
        revision = publish_tokenizer(store, entry, entry.tokenizer_folder(settings.model_cache_dir))
        progress(f"{entry.name} tokenizer published (revision {revision[:12]})")
        lease_owner = worker_id or f"{socket.gethostname()}:{entry.cache_name}:{threading.get_native_id()}"
        consumer = Consumer(
            engine,
            session_factory,
            lease_owner,
            on_finished,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
            tick_tokens=settings.train_token_budget * TRAIN_PASSES_PER_TICK,
            role=role,
            sticky=sticky,
        )
        stop = threading.Event()
        thread = threading.Thread(
            target=consumer.run_forever, args=(stop, idle_wait), name=f"loom-worker-{entry.cache_name}", daemon=True
        )
        thread.start()
        handles[entry.name] = WorkerHandle(consumer, thread, stop)
        params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.lm.model.parameters())  # ZeRO-3: full size
        progress(f"{entry.name} ready ({params / 1e6:.0f}M params, frozen)")
    return handles
