"""Futures protocol wire types.

Role: every long-running call (create_model, forward_backward, optim_step,
save/load, asample…) answers with an :class:`UntypedAPIFuture`; the client then
long-polls ``POST /api/v1/retrieve_future`` with a :class:`FutureRetrieveRequest`.
A poll answers one of:

- :class:`TryAgainResponse` (``{"type": "try_again", ...}``; also the body of
  an HTTP 408) — poll again;
- :class:`FutureMetadataResponse` (``{"status": "complete_metadata", ...}``)
  when ``allow_metadata_only`` was set and the payload is large — poll again
  with ``allow_metadata_only=false``;
- :class:`RequestFailedResponse` (``{"error", "category"}``) — the request failed;
- anything else: the result type of the original request.

``/api/v1/retrieve_futures`` (flag ``sample_use_retrieve_futures``) is the
batched alternative for sampling: one long-poll per sampling session (clone)
reports which of its requests finished or failed since the client's cursor,
and the client then fetches each payload with ``retrieve_future``.
``/api/v1/cancel_future`` takes a :class:`CancelFutureRequest`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ._base import WireModel

RequestID = str
ModelID = str

RequestErrorCategory = Literal["unknown", "server", "user"]
"""Who is to blame for a failed request: ``user`` errors are not retried."""

QueueState = Literal["active", "paused_capacity", "paused_rate_limit"]


class UntypedAPIFuture(WireModel):
    """What a submit endpoint returns: a handle to poll."""

    request_id: RequestID
    model_id: ModelID | None = None
    sample_sequence_ids: list[str] | None = None
    """Sampling only: one id per requested sample, in result order."""


class FutureRetrieveRequest(WireModel):
    request_id: RequestID
    allow_metadata_only: bool = False


class TryAgainResponse(WireModel):
    type: Literal["try_again"] = "try_again"
    request_id: RequestID
    queue_state: QueueState = "active"
    queue_state_reason: str | None = None


class FutureMetadataResponse(WireModel):
    """The result is ready but too large to inline while metadata-only was allowed."""

    status: Literal["complete_metadata"] = "complete_metadata"
    response_payload_size: int


class RequestFailedResponse(WireModel):
    error: str
    category: RequestErrorCategory = "unknown"


class CancelFutureRequest(WireModel):
    request_id: RequestID


CLONE_SEQ_BLOCK = 1_000_000_000
"""A sampling session's client ``k`` numbers its requests from ``k * CLONE_SEQ_BLOCK`` (the original is client 0)."""

MAX_RETRIEVED_IDS = 10_000
"""The most ``retrieved_request_ids`` one ``retrieve_futures`` poll may report."""


class SamplingSessionFuturesTarget(WireModel):
    type: Literal["sampling_session"] = "sampling_session"
    sampling_session_id: str
    cloned_sampler_id: Annotated[int, Field(ge=0, lt=CLONE_SEQ_BLOCK)] = 0


class FuturesRetrieveRequest(WireModel):
    """One poll of a sampling session's (clone's) completions: those after ``prev_cursor``, waiting up to
    ``timeout`` seconds (the server's long-poll window when None) for the first one."""

    target: SamplingSessionFuturesTarget
    prev_cursor: Annotated[int, Field(ge=0)] = 0
    timeout: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    retrieved_request_ids: Annotated[list[str], Field(max_length=MAX_RETRIEVED_IDS)] = Field(default_factory=list)


class FutureFinished(WireModel):
    state: Literal["finished"] = "finished"
    request_id: RequestID
    response_payload_uncompressed_size: int | None = None


class FutureFailed(WireModel):
    state: Literal["failed"] = "failed"
    request_id: RequestID


FutureCompletion = Annotated[FutureFinished | FutureFailed, Field(discriminator="state")]


class FuturesRetrieveResponse(WireModel):
    completions: list[FutureCompletion] = Field(default_factory=list)
    cursor: int = 0
