"""The futures protocol: `retrieve_future` (collect one result), `retrieve_futures` (which samples of a sampling
session completed) and `cancel_future` (give up on a queued request).

A poll returns as soon as the job is final, or after `long_poll_seconds` with `{"type": "try_again", ...}` and
the job's queue position. Results are read from the database, so they stay retrievable after an abandoned poll
and across server restarts. forward_backward and sample results go out as protobuf when the client asks for it
(`Accept: application/x-protobuf`, SDK >= 0.25), JSON otherwise; failures are `{"error", "category"}`.

`retrieve_futures` is the batched poll of SDK 0.38's sampling clients (`api/sampler_completions.py`).
`cancel_future` fails a request that is still queued with "cancelled by the client" (its future resolves with that
error; an ordered training op is passed over, so the run's later ops still run); a request a worker already holds
is never interrupted and one that is final stays as it is: the answer says which happened.

Limits: results are never dropped from the database by these endpoints (no TTL on job rows yet).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from api.db.jobs import CANCELLED_ERROR, cancel_queued_job
from api.db.models import JobState, SamplingSession
from api.deps import State, Tenant
from api.errors import not_found
from api.job_results import FINAL, wait_final
from api.proto.codec import encode_forward_backward_output, encode_sample_response
from api.sampler_completions import Target, poll_completions
from contract.jobs import JobKind
from loom.types import (
    CancelFutureRequest,
    CancelFutureResponse,
    FutureRetrieveRequest,
    FuturesRetrieveRequest,
    RequestFailedResponse,
    TryAgainResponse,
)

router = APIRouter(prefix="/api/v1")

PROTO = "application/x-protobuf"
PROTO_ENCODERS = {
    JobKind.FORWARD_BACKWARD.value: encode_forward_backward_output,
    JobKind.FORWARD.value: encode_forward_backward_output,
    JobKind.SAMPLE.value: encode_sample_response,
}


def _final_response(job: dict[str, Any], accept: str) -> Response | dict[str, Any]:
    if job["state"] == JobState.FAILED.value:
        return RequestFailedResponse(error=job["error"] or "failed", category=job["category"] or "unknown").to_wire()
    encoder = PROTO_ENCODERS.get(job["kind"])
    if encoder is not None and PROTO in accept:
        return Response(encoder(job["result"]), media_type=PROTO)
    return job["result"]


@router.post("/retrieve_future")
async def retrieve_future(body: FutureRetrieveRequest, request: Request, state: State, owner: Tenant):
    job = await wait_final(state, owner, body.request_id, state.settings.long_poll_seconds)
    if job is None:
        raise not_found(f"request {body.request_id!r} not found")
    if job["state"] in FINAL:
        return await run_in_threadpool(_final_response, job, request.headers.get("accept", ""))
    reason = f"{job['position']} request(s) ahead in the queue" if job["position"] else "running"
    return TryAgainResponse(request_id=body.request_id, queue_state="active", queue_state_reason=reason).to_wire()


@router.post("/retrieve_futures")
async def retrieve_futures(body: FuturesRetrieveRequest, state: State, owner: Tenant) -> dict[str, Any]:
    sampler_id = body.target.sampling_session_id

    def owned() -> bool:
        with state.reading() as session:
            found = session.get(SamplingSession, sampler_id)
            return found is not None and found.owner == owner

    if not await run_in_threadpool(owned):
        raise not_found(f"sampling session {sampler_id!r} not found")
    timeout = (
        state.settings.long_poll_seconds
        if body.timeout is None
        else min(body.timeout, state.settings.long_poll_seconds)
    )
    return await poll_completions(state, Target(sampler_id, body.target.cloned_sampler_id), body.prev_cursor, timeout)


def _cancel_answer(request_id: str, job_state: str, error: str | None) -> CancelFutureResponse:
    """What a cancel did to a job now in `job_state` (a repeated cancel answers like the first)."""
    if job_state == JobState.LEASED.value:
        message = "a worker is already running this request; Loom does not interrupt it and its result will come"
        return CancelFutureResponse(request_id=request_id, cancelled=False, state="running", message=message)
    if job_state == JobState.DONE.value:
        message = "this request had already finished; its result stays retrievable"
        return CancelFutureResponse(request_id=request_id, cancelled=False, state="done", message=message)
    if error == CANCELLED_ERROR:
        message = f"cancelled: its future fails with {CANCELLED_ERROR!r}"
        return CancelFutureResponse(request_id=request_id, cancelled=True, state="failed", message=message)
    message = f"this request had already failed: {error}"
    return CancelFutureResponse(request_id=request_id, cancelled=False, state="failed", message=message)


@router.post("/cancel_future")
def cancel_future(body: CancelFutureRequest, state: State, owner: Tenant) -> dict[str, Any]:
    with state.transaction() as session:
        job = cancel_queued_job(session, body.request_id, owner)
        if job is None:
            raise not_found(f"request {body.request_id!r} not found")
        answer = _cancel_answer(body.request_id, job.state, job.error)
    return answer.to_wire()
