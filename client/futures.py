"""Futures: :class:`APIFuture` and the ``retrieve_future`` long-poll loop.

Role: a submit endpoint answers ``{"request_id": ...}``; :func:`poll_result`
then POSTs ``/api/v1/retrieve_future`` until the result is there:

- 200 ``{"type": "try_again", ...}``, HTTP 408 -> poll again (the server holds
  each poll open for a while; a fast reply is followed by a short pause);
- 200 ``{"error", "category"}`` -> :class:`loom.errors.RequestFailedError`;
- 200 anything else -> the result, validated into the expected type;
- 5xx / 429 / connection errors / a poll timing out -> back off (for the
  response's ``Retry-After`` when it has one) and poll again (a bounded number
  of consecutive times);
- other 4xx (including 410 "expired") -> the typed :class:`APIStatusError`.

:class:`APIFuture` wraps the ``concurrent.futures.Future`` of that coroutine:
``result(timeout)`` blocks (``TimeoutError`` on timeout, the work continues),
``await fut`` / ``await fut.result_async(timeout)`` work from any event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar, Union

import httpx

from . import errors
from .http import HttpClient, sleep_backoff
from .types import FutureRetrieveRequest

T = TypeVar("T")

POLL_TIMEOUT_S = 45.0
"""Client-side timeout of one long-poll (as in tinker)."""
MAX_CONSECUTIVE_POLL_FAILURES = 30
FAST_REPLY_S = 0.5
"""A ``try_again`` faster than this is followed by a short sleep (no busy loop)."""


class APIFuture(Generic[T]):
    """Handle to a result computed by the SDK's background loop."""

    def __init__(self, future: "concurrent.futures.Future[T]", request_type: str = "") -> None:
        self._future = future
        self.request_type = request_type

    def result(self, timeout: float | None = None) -> T:
        """Block until done; ``TimeoutError`` if ``timeout`` seconds pass first."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            raise TimeoutError(f"{self.request_type or 'request'} not done after {timeout}s") from exc

    async def result_async(self, timeout: float | None = None) -> T:
        """Await the result from any event loop (timing out does not cancel the work)."""
        wrapped = asyncio.shield(asyncio.wrap_future(self._future))
        try:
            return await asyncio.wait_for(wrapped, timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"{self.request_type or 'request'} not done after {timeout}s") from exc

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    def done(self) -> bool:
        return self._future.done()

    def future(self) -> "concurrent.futures.Future[T]":
        """The underlying ``concurrent.futures.Future``."""
        return self._future

    def add_done_callback(self, fn: Callable[["APIFuture[T]"], Any]) -> None:
        self._future.add_done_callback(lambda _f: fn(self))

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<APIFuture {self.request_type} {state}>"


Parser = Union[type, Callable[[Any], Any]]


def _parse(result_type: Parser, body: Any) -> Any:
    validate = getattr(result_type, "model_validate", None)
    return validate(body) if validate is not None else result_type(body)


async def poll_result(
    http: HttpClient,
    request_id: str,
    result_type: Parser,
    *,
    request_type: str = "",
) -> Any:
    """Long-poll ``/api/v1/retrieve_future`` for ``request_id``; return the parsed result.

    Polls never set ``allow_metadata_only``, so the server always inlines the
    result (it answers ``complete_metadata`` only to polls that allow it).
    """
    body = FutureRetrieveRequest(request_id=request_id).to_wire()
    iteration = 0
    failures = 0
    while True:
        headers = {
            "X-Tinker-Request-Iteration": str(iteration),
            "X-Tinker-Request-Type": request_type,
        }
        iteration += 1
        started = time.monotonic()
        try:
            response = await http.send(
                "POST", "/api/v1/retrieve_future", json=body, headers=headers, timeout=POLL_TIMEOUT_S
            )
        except httpx.TimeoutException:
            continue  # the long-poll ran out; just ask again
        except httpx.TransportError as exc:
            failures += 1
            if failures > MAX_CONSECUTIVE_POLL_FAILURES:
                raise errors.APIConnectionError(f"polling {request_id} failed: {exc!r}") from exc
            await sleep_backoff(failures)
            continue

        status = response.status_code
        payload: Any
        try:
            payload = response.json() if response.content else None
        except ValueError:
            payload = response.text

        if status == 200 and isinstance(payload, dict):
            failures = 0
            if payload.get("type") == "try_again":
                if time.monotonic() - started < FAST_REPLY_S:
                    await asyncio.sleep(0.1)
                continue
            if "error" in payload:
                raise errors.RequestFailedError(
                    str(payload["error"]),
                    request_id=request_id,
                    category=str(payload.get("category") or "unknown"),
                )
            return _parse(result_type, payload)
        if status == 408:
            failures = 0
            if time.monotonic() - started < FAST_REPLY_S:
                await asyncio.sleep(0.1)
            continue
        if status >= 500 or status == 429 or (status == 200 and not isinstance(payload, dict)):
            failures += 1
            if failures > MAX_CONSECUTIVE_POLL_FAILURES:
                raise errors.status_error(status, payload, request_id=request_id)
            await sleep_backoff(failures, cap=30.0 if status == 429 else 5.0, response=response)
            continue
        raise errors.status_error(status, payload, request_id=request_id)


async def submit(http: HttpClient, path: str, body: Any, *, headers: dict[str, str] | None = None) -> str:
    """POST a request that answers with an ``UntypedAPIFuture``; return its ``request_id``.

    Retries transient failures with one idempotency key (see :mod:`loom.http`).
    """
    from .types import UntypedAPIFuture

    payload = await http.post_json(path, body, headers=headers)
    return UntypedAPIFuture.model_validate(payload).request_id


async def submit_and_poll(
    http: HttpClient,
    path: str,
    body: Any,
    result_type: Parser,
    *,
    request_type: str = "",
    headers: dict[str, str] | None = None,
) -> Any:
    """:func:`submit` then :func:`poll_result`."""
    request_id = await submit(http, path, body, headers=headers)
    return await poll_result(http, request_id, result_type, request_type=request_type)
