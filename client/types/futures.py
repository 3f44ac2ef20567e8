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

``/api/v1/retrieve_futures`` (batched, flag ``sample_use_retrieve_futures``)
and ``/api/v1/cancel_future`` types are declared too.
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


class SamplingSessionFuturesTarget(WireModel):
    type: Literal["sampling_session"] = "sampling_session"
    sampling_session_id: str
    cloned_sampler_id: int = 0


class FuturesRetrieveRequest(WireModel):
    target: SamplingSessionFuturesTarget
    prev_cursor: int = 0
    timeout: float | None = None
    retrieved_request_ids: list[str] = Field(default_factory=list)


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
