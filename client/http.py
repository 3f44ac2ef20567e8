"""HTTP transport: a private asyncio loop thread, an ``httpx.AsyncClient`` and retries.

Role: every SDK call runs as a coroutine on one background event loop owned by
the :class:`HttpClient` (as tinker does). Sync methods block on
``concurrent.futures`` futures; async methods await them from the caller's loop.

Wire conventions:
- ``X-API-Key: <key>`` on every request; JSON bodies; ``Accept: application/json``
  (never protobuf). Non-finite floats are written as ``-Infinity``/``NaN``
  (Python ``json``'s extension), which Python servers parse.
- Every non-GET request carries ``X-Idempotency-Key``: one uuid4 per logical
  request, reused by all of its retries, so a server can de-duplicate a submit
  whose first attempt did reach it.
- Retries (when enabled for the call): connection errors, timeouts, 408, 429
  and 5xx (e.g. 503 while the server's database is unavailable), with
  exponential backoff ``base * 2**n`` capped at ``max_delay``, honouring
  ``Retry-After``/``retry-after-ms`` (up to 60 s) and ``x-should-retry``;
  bounded by ``max_attempts`` and by ``max_total_seconds`` since the first
  attempt. Other statuses raise the typed errors of :mod:`loom.errors` at once.

Limits: one loop thread per ``HttpClient`` (i.e. per ``ServiceClient``); calling
a blocking method from that thread raises instead of deadlocking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json as _json
import logging
import random
import threading
import uuid
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from time import monotonic
from typing import Any, TypeVar

import httpx

from . import errors

logger = logging.getLogger("loom")

T = TypeVar("T")

IDEMPOTENCY_HEADER = "X-Idempotency-Key"
API_KEY_HEADER = "X-API-Key"
RETRYABLE_STATUSES = frozenset({408, 429})


@dataclass(frozen=True)
class RetryPolicy:
    """How submits retry transient failures."""

    max_attempts: int = 10
    base_delay: float = 0.5
    max_delay: float = 30.0
    jitter: float = 0.25
    """Fraction of the delay added at random."""
    max_total_seconds: float = 120.0
    """No retry starts later than this after the first attempt (outages longer than that raise)."""

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None and 0 <= retry_after <= 60:
            return retry_after
        d = min(self.base_delay * (2**attempt), self.max_delay)
        return d * (1 + self.jitter * random.random())


def _retry_after(response: httpx.Response) -> float | None:
    for header, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = response.headers.get(header)
        if value is not None:
            try:
                return float(value) * scale
            except ValueError:
                return None
    return None


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _sdk_version() -> str:
    try:
        from importlib.metadata import version

        return version("loom")
    except Exception:  # pragma: no cover - not installed
        return "0.0.0"


class HttpClient:
    """Owns the loop thread and the async HTTP client of one ``ServiceClient``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),
        transport: httpx.AsyncBaseTransport | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self.sdk_version = _sdk_version()
        default_headers = {
            "Accept": "application/json",
            "User-Agent": f"loom-python/{self.sdk_version}",
        }
        if api_key:
            default_headers[API_KEY_HEADER] = api_key
        default_headers.update(headers or {})
        self._transport = transport
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loom-http", daemon=True)
        self._thread.start()
        self._closed = False

        async def _make() -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=self.base_url,
                headers=default_headers,
                timeout=httpx.Timeout(timeout, connect=10.0),
                transport=transport,
                follow_redirects=False,
            )

        self._client: httpx.AsyncClient = self.call(_make())

    # ----------------------------------------------------------- loop plumbing
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def closed(self) -> bool:
        return self._closed

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, coro: Coroutine[Any, Any, T]) -> "concurrent.futures.Future[T]":
        """Schedule ``coro`` on the SDK loop; returns a concurrent future."""
        if self._closed:
            coro.close()
            raise errors.LoomError("client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the SDK loop and block for its result."""
        if self.on_loop_thread():
            coro.close()
            raise RuntimeError("blocking Loom call made from the SDK's own event loop thread")
        return self.run(coro).result(timeout)

    async def call_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the SDK loop and await it from any loop."""
        if self.on_loop_thread():
            return await coro
        return await asyncio.wrap_future(self.run(coro))

    def close(self) -> None:
        if self._closed:
            return

        async def _shutdown() -> None:
            await self._client.aclose()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            if not self.on_loop_thread():
                self.run(_shutdown()).result(10)
        except Exception:  # pragma: no cover - best effort
            logger.debug("error while closing the HTTP client", exc_info=True)
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        if not self.on_loop_thread():
            self._thread.join(5)

    # --------------------------------------------------------------- requests
    async def send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """One attempt, no retry, no status check. Transport errors surface as httpx errors."""
        kwargs: dict[str, Any] = {"headers": dict(headers or {})}
        if json is not None:
            # allow_nan: -inf logprobs must not make the request unsendable
            kwargs["content"] = _json.dumps(json, separators=(",", ":"), allow_nan=True).encode()
            kwargs["headers"]["Content-Type"] = "application/json"
        if params:
            kwargs["params"] = {k: v for k, v in params.items() if v is not None}
        if timeout is not None:
            kwargs["timeout"] = timeout
        return await self._client.request(method, path, **kwargs)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        retry: bool = True,
        ok_statuses: tuple[int, ...] = (),
    ) -> httpx.Response:
        """Send with retries; raise typed errors for error statuses.

        ``ok_statuses`` lists extra non-2xx statuses to hand back (e.g. 302).
        """
        headers = dict(headers or {})
        if method.upper() != "GET":
            headers.setdefault(IDEMPOTENCY_HEADER, uuid.uuid4().hex)
        attempts = self.retry.max_attempts if retry else 1
        deadline = monotonic() + self.retry.max_total_seconds
        last_exc: BaseException | None = None
        for attempt in range(attempts):
            if attempt:
                headers["X-Loom-Retry-Count"] = str(attempt)
            try:
                response = await self.send(method, path, json=json, params=params, headers=headers, timeout=timeout)
            except httpx.TimeoutException as exc:
                last_exc = errors.APITimeoutError(f"{method} {path} timed out: {exc}")
                delay = self.retry.delay(attempt)
            except httpx.TransportError as exc:
                last_exc = errors.APIConnectionError(f"{method} {path} failed: {exc!r}")
                delay = self.retry.delay(attempt)
            else:
                status = response.status_code
                if status < 300 or status in ok_statuses:
                    return response
                body = _json_or_text(response)
                err = errors.status_error(status, body, request_id=response.headers.get("x-request-id"))
                should = response.headers.get("x-should-retry")
                retryable = status in RETRYABLE_STATUSES or status >= 500
                if should is not None:
                    retryable = should.lower() == "true"
                if not retryable:
                    raise err
                last_exc = err
                delay = self.retry.delay(attempt, _retry_after(response))
            if attempt + 1 < attempts and monotonic() + delay <= deadline:
                logger.info("retrying %s %s in %.2fs after %s", method, path, delay, last_exc)
                await asyncio.sleep(delay)
            else:
                break
        assert last_exc is not None
        raise last_exc

    async def post_json(self, path: str, body: Any, **kwargs: Any) -> Any:
        response = await self.request("POST", path, json=body, **kwargs)
        return _json_or_text(response) if response.content else None

    async def get_json(self, path: str, params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        response = await self.request("GET", path, params=params, **kwargs)
        return _json_or_text(response) if response.content else None

    async def download(self, url: str, dest: Path) -> int:
        """GET the absolute, signed ``url`` into the file ``dest`` (written to ``<dest>.part``, then renamed) and
        return its size. Sent without this client's API key: a signed URL may point at another host (a bucket)."""
        async with httpx.AsyncClient(transport=self._transport, timeout=60.0, follow_redirects=True) as plain:
            async with plain.stream("GET", url) as response:
                if response.status_code >= 300:
                    await response.aread()
                    request_id = response.headers.get("x-request-id")
                    raise errors.status_error(response.status_code, _json_or_text(response), request_id=request_id)
                partial = dest.with_name(dest.name + ".part")
                size = 0
                with partial.open("wb") as out:
                    async for chunk in response.aiter_bytes(1 << 20):
                        out.write(chunk)
                        size += len(chunk)
        partial.replace(dest)
        return size


def sleep_backoff(
    attempt: int, base: float = 0.2, cap: float = 5.0, response: httpx.Response | None = None
) -> Awaitable[None]:
    """``asyncio.sleep`` for a capped exponential delay, or for the ``response``'s ``Retry-After`` (up to 60 s)
    when it has one (used by the poller)."""
    retry_after = _retry_after(response) if response is not None else None
    if retry_after is not None and 0 <= retry_after <= 60:
        return asyncio.sleep(retry_after)
    return asyncio.sleep(min(base * (2**attempt), cap))
