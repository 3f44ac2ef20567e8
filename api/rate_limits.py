"""Per-tenant rate limits (requests and tokens per minute) and quotas (concurrent runs, stored bytes).

- **Rates** are counted in fixed one-minute windows (UTC minute boundaries) per tenant. Every authenticated request
  counts one request, except the SDK's own plumbing (`RATE_EXEMPT_PATHS`: futures polls, heartbeats, the limits
  themselves), whose pace the SDK picks, not its user. Every queued job counts its tokens (`submitted_tokens`:
  training tokens; sampling's Tinker prompt plus n × max_tokens). A request over a rate is refused with 429
  `rate_limit_exceeded`, `Retry-After` (seconds to the next window) and `x-should-retry: true`, which the official
  SDKs (tinker, openai) obey by waiting and sending it again; a refused training op takes no seq_id, so the run
  waits for its retry (`api/refusals.py` leaves retryable refusals alone). A request that alone needs more tokens
  than a minute allows is refused with `x-should-retry: false`.
- **Quotas** are checked when a request would grow them: creating a run while `concurrent_runs` runs are live
  (loaded, in a session heard from in the last two minutes), or saving a checkpoint while the tenant's listed
  checkpoints hold `stored_bytes` or more. Both answer 429 `quota_exceeded` with `x-should-retry: false`: waiting
  does not help; unloading runs or deleting checkpoints does.
- Every counted response carries `x-ratelimit-limit-*`, `x-ratelimit-remaining-*` and `x-ratelimit-reset-*`
  (`requests`, `tokens`; reset in seconds, as `12s`) for the limits the tenant has (`RateLimitHeaders`).

Limits come from the tenant's row (`api/db/tenants.py`) over the deployment's `LOOM_TENANT_*` defaults; none is set
by default. Counters live in Redis (`LOOM_BROKER_URL`) when the queue is `celery`, so every API process of a
deployment shares them; otherwise in this process's memory (one API process: embedded or external queue). Fixed
windows let a tenant burst up to twice a rate across a minute boundary.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fastapi import Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.db.models import Checkpoint, ClientSession, RunStatus, TrainingRun
from api.db.tenants import LIMIT_COLUMNS, TenantLimits, effective_limits
from api.db.types import utcnow
from api.errors import APIError, ErrorCode
from api.paths import listed_checkpoint
from api.session_records import STALE_AFTER
from contract.jobs import JobPayload, SampleJob, TinkerPrompt
from contract.settings import Settings

WINDOW_SECONDS = 60
RATE_EXEMPT_PATHS = frozenset(
    {"/api/v1/retrieve_future", "/api/v1/retrieve_futures", "/api/v1/session_heartbeat", "/api/v1/limits"}
)
STATE_KEY = "rate_limits"
"""Where a request's window readings wait for `RateLimitHeaders` (in the ASGI scope's `state`)."""


@dataclass(frozen=True)
class WindowReading:
    """A tenant's use of one rate in the current window, after this request."""

    limit: int
    used: int
    reset_seconds: float

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


class Windows(Protocol):
    def take(self, key: str, amount: int, limit: int, window: int) -> tuple[bool, int]:
        """Add `amount` to `key`'s count in `window` if it stays within `limit`: (taken, the count after)."""
        ...


class MemoryWindows:
    """Counters of this process (one API process serves the deployment)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = {}
        self._newest = 0
        self._lock = threading.Lock()

    def take(self, key: str, amount: int, limit: int, window: int) -> tuple[bool, int]:
        with self._lock:
            if window > self._newest:  # a new minute: forget the ones before it, once
                self._newest = window
                self._counts = {k: n for k, n in self._counts.items() if k[1] >= window}
            used = self._counts.get((key, window), 0)
            if used + amount > limit:
                return False, used
            self._counts[key, window] = used + amount
            return True, used + amount


TAKE_SCRIPT = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {0, used} end
used = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, used}
"""
"""Check and add in one step on the Redis server, so concurrent API processes never overshoot together."""


class RedisWindows:
    """Counters in Redis, shared by every API process of a deployment."""

    def __init__(self, url: str) -> None:
        import redis

        self._take = redis.Redis.from_url(url).register_script(TAKE_SCRIPT)

    def take(self, key: str, amount: int, limit: int, window: int) -> tuple[bool, int]:
        taken, used = self._take(keys=[f"loom:rate:{key}:{window}"], args=[amount, limit, 2 * WINDOW_SECONDS])
        return bool(taken), int(used)


def submitted_tokens(payload: JobPayload) -> int:
    """Tokens a job counts against tokens/minute: what it trains on, or what a sample reads and may write. Only what
    the API knows counts: an OpenAI prompt's text is tokenized by the worker, and a sample without `max_tokens`
    counts no output."""
    if isinstance(payload, SampleJob):
        prompt = payload.prompt.model_input.length if isinstance(payload.prompt, TinkerPrompt) else 0
        return prompt + payload.num_samples * (payload.sampling_params.max_tokens or 0)
    return payload.cost_tokens()


def live_runs(session: Session, owner: str) -> int:
    """The tenant's loaded runs in sessions that are neither finished nor silent for longer than `STALE_AFTER`."""
    return session.scalar(
        select(func.count(TrainingRun.id))
        .join(ClientSession, ClientSession.id == TrainingRun.session_id)
        .where(
            TrainingRun.owner == owner,
            TrainingRun.status == RunStatus.ACTIVE.value,
            ClientSession.finished_at.is_(None),
            ClientSession.last_heartbeat_at > utcnow() - STALE_AFTER,
        )
    )


def stored_bytes(session: Session, owner: str) -> int:
    """Bytes of the tenant's listed checkpoints (what it sees, and can delete to make room)."""
    total = session.scalar(
        select(func.sum(Checkpoint.size_bytes)).where(Checkpoint.owner == owner, listed_checkpoint())
    )
    return int(total or 0)


def _quota_exceeded(message: str) -> APIError:
    return APIError(429, ErrorCode.QUOTA_EXCEEDED, message, headers={"x-should-retry": "false"})


class RateLimiter:
    """The deployment's limits and counters; one per API process (`AppState.rate_limiter`)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.defaults = TenantLimits(**{limit: getattr(settings, f"tenant_{limit}") for limit in LIMIT_COLUMNS})
        self.windows: Windows = RedisWindows(settings.broker_url) if settings.queue == "celery" else MemoryWindows()
        self.clock = clock

    def limits(self, session: Session, owner: str) -> TenantLimits:
        return effective_limits(session, owner, self.defaults)

    def admit_request(self, request: Request, owner: str, limits: TenantLimits) -> None:
        """Count this request against the tenant's requests/minute (429 beyond); plumbing paths are not counted."""
        if limits.requests_per_minute is not None and request.url.path not in RATE_EXEMPT_PATHS:
            self._take(request, "requests", owner, 1, limits.requests_per_minute)

    def admit_tokens(self, request: Request, owner: str, limits: TenantLimits, tokens: int) -> None:
        """Count a queued job's tokens against the tenant's tokens/minute (429 beyond)."""
        if limits.tokens_per_minute is None or tokens == 0:
            return
        if tokens > limits.tokens_per_minute:
            raise APIError(
                429,
                ErrorCode.RATE_LIMITED,
                f"this request counts {tokens} tokens, more than the {limits.tokens_per_minute} tokens per minute "
                "your tenant may submit: split it",
                headers={"x-should-retry": "false"},
            )
        self._take(request, "tokens", owner, tokens, limits.tokens_per_minute)

    def check_new_run(self, session: Session, owner: str, limits: TenantLimits) -> None:
        if limits.concurrent_runs is not None and live_runs(session, owner) >= limits.concurrent_runs:
            raise _quota_exceeded(
                f"your tenant already has {limits.concurrent_runs} live training runs, its limit: unload one "
                "(TrainingClient.unload_model) or finish its session first"
            )

    def check_new_checkpoint(self, session: Session, owner: str, limits: TenantLimits) -> None:
        if limits.stored_bytes is not None and (used := stored_bytes(session, owner)) >= limits.stored_bytes:
            raise _quota_exceeded(
                f"your tenant stores {used} bytes of checkpoints, its limit is {limits.stored_bytes}: delete some "
                "(`tinker checkpoint delete`) before saving more"
            )

    def reading(self, owner: str, rate: str, limit: int | None) -> WindowReading | None:
        """The tenant's use of a rate in the current window, counting nothing (None without a limit)."""
        return None if limit is None else self._count(owner, rate, 0, limit)[1]

    def _count(self, owner: str, rate: str, amount: int, limit: int) -> tuple[bool, WindowReading]:
        now = self.clock()
        window = int(now // WINDOW_SECONDS)
        taken, used = self.windows.take(f"{owner}:{rate}", amount, limit, window)
        return taken, WindowReading(limit, used, (window + 1) * WINDOW_SECONDS - now)

    def _take(self, request: Request, rate: str, owner: str, amount: int, limit: int) -> None:
        taken, reading = self._count(owner, rate, amount, limit)
        used, reset = reading.used, reading.reset_seconds
        setattr(request.state, STATE_KEY, {**getattr(request.state, STATE_KEY, {}), rate: reading})
        if not taken:
            raise APIError(
                429,
                ErrorCode.RATE_LIMITED,
                f"your tenant's limit of {limit} {rate} per minute is used up ({used} this minute); "
                f"retry in {math.ceil(reset)} s",
                headers={"Retry-After": str(math.ceil(reset)), "x-should-retry": "true"},
            )


class RateLimitHeaders:
    """Add `x-ratelimit-*` headers for the rates a request was counted against (success or 429 alike)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: Message) -> None:
            readings: dict[str, WindowReading] = scope.get("state", {}).get(STATE_KEY, {})
            if message["type"] == "http.response.start" and readings:
                headers = list(message.get("headers", []))
                for rate, reading in readings.items():
                    headers += [
                        (f"x-ratelimit-limit-{rate}".encode(), str(reading.limit).encode()),
                        (f"x-ratelimit-remaining-{rate}".encode(), str(reading.remaining).encode()),
                        (f"x-ratelimit-reset-{rate}".encode(), f"{math.ceil(reading.reset_seconds)}s".encode()),
                    ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
