"""`retrieve_future`: the long-poll every Tinker client uses to collect results.

A poll returns as soon as the job is final, or after `long_poll_seconds` with `{"type": "try_again", ...}` and
the job's queue position. Results are read from the database, so they stay retrievable after an abandoned poll
and across server restarts. forward_backward and sample results go out as protobuf when the client asks for it
(`Accept: application/x-protobuf`, SDK >= 0.25), JSON otherwise; failures are `{"error", "category"}`.

Limits: results are never dropped from the database by this endpoint (no TTL on job rows yet).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from api.db.models import JobState
from api.deps import State, Tenant
from api.errors import not_found
from api.job_results import FINAL, wait_final
from api.proto.codec import encode_forward_backward_output, encode_sample_response
from contract.jobs import JobKind
from loom.types import FutureRetrieveRequest, RequestFailedResponse, TryAgainResponse

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
