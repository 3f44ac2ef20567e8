"""A training op refused at the door must not wedge its run: its seq_id is marked as taken by the refusal.

The client numbers a run's ops itself (the tinker SDK reserves each `seq_id` when the call is made), and the job
store runs them strictly in that order, waiting for a missing one. So when the API refuses an op with a 4xx after
the op named its run and seq_id (bad values, a cost over the limits, a bad checkpoint name), that seq_id would stay
missing forever and every later op of the run would wait behind it. `install(app)` wraps the error handlers of
`APIError` and of request-validation errors so that such a refusal is recorded at its seq_id
(`api.db.jobs.record_refusal`), and the run moves past it like past any failed request.

Routes say which op a request is (`note_ordered_op`) as soon as they know its tenant, run and seq_id; a body that
fails validation before the route runs is identified from the parsed body and the caller's API key.

A refusal the client is told to retry as it is (429 `rate_limit_exceeded` with `x-should-retry: true`) records
nothing: the SDK sends the same seq_id again after `Retry-After`, and the run waits for it meanwhile.

A client that does not use up a seq_id on a refusal (Loom's SDK) sends its next op with that same seq_id, which
takes the placeholder's place as long as no later op of the run has started (`api.db.jobs.submit_job`).

Limits: a refusal whose seq_id is out of the window, already passed or already submitted (a conflicting replay)
records nothing; a body that is not valid JSON names no seq_id, so nothing is recorded
and a client that numbered it must resend that seq_id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from api.db.jobs import record_refusal
from api.db.keys import authenticate
from api.deps import api_key, app_state
from api.errors import APIError, invalid_from_validation
from contract.jobs import JobKind

log = logging.getLogger(__name__)

ORDERED_ROUTES: dict[str, JobKind] = {
    "/api/v1/forward_backward": JobKind.FORWARD_BACKWARD,
    "/api/v1/forward": JobKind.FORWARD,
    "/api/v1/optim_step": JobKind.OPTIM_STEP,
    "/api/v1/save_weights": JobKind.SAVE_WEIGHTS,
    "/api/v1/save_weights_for_sampler": JobKind.SAVE_WEIGHTS_FOR_SAMPLER,
    "/api/v1/save_weights_external": JobKind.SAVE_WEIGHTS_EXTERNAL,
    "/api/v1/load_weights": JobKind.LOAD_WEIGHTS,
}
"""The routes of ops a client numbers within a run, and the kind of job each queues."""


@dataclass(frozen=True)
class OrderedOp:
    owner: str
    model_id: str
    seq_id: int
    kind: JobKind


def note_ordered_op(request: Request, owner: str, model_id: str, seq_id: int, kind: JobKind) -> None:
    """This request is op `seq_id` of run `model_id`: if it is refused from here on, the refusal takes that seq."""
    request.state.ordered_op = OrderedOp(owner, model_id, seq_id, kind)


def _op_from_body(request: Request, body: Any) -> OrderedOp | None:
    """The op a request whose body failed validation names, if its route is ordered and its key valid."""
    kind = ORDERED_ROUTES.get(request.url.path)
    if kind is None or not isinstance(body, dict):
        return None
    model_id, seq_id, key = body.get("model_id"), body.get("seq_id"), api_key(request)
    if not isinstance(model_id, str) or type(seq_id) is not int or key is None:
        return None
    with app_state(request).reading() as session:
        record = authenticate(session, key)
    return None if record is None else OrderedOp(record.owner, model_id, seq_id, kind)


def _record(request: Request, status: int, message: str, body: Any = None, retryable: bool = False) -> None:
    if not 400 <= status < 500 or retryable:
        return
    op = getattr(request.state, "ordered_op", None) or _op_from_body(request, body)
    if op is None:
        return
    with app_state(request).transaction() as session:
        recorded = record_refusal(
            session, owner=op.owner, model_id=op.model_id, seq_id=op.seq_id, kind=op.kind, error=message
        )
    if recorded:
        log.info("seq %s of %s refused at submit (%s): the run moves past it", op.seq_id, op.model_id, message)


def install(app: FastAPI) -> None:
    """Wrap the app's `APIError` and validation-error handlers (installed before) to record refused ops."""
    api_error, validation_error = app.exception_handlers[APIError], app.exception_handlers[RequestValidationError]

    async def refused(request: Request, exc: APIError):
        retryable = (exc.headers or {}).get("x-should-retry") == "true"  # the client sends this seq_id again
        await run_in_threadpool(_record, request, exc.status, exc.message, None, retryable)
        return await api_error(request, exc)

    async def invalid_body(request: Request, exc: RequestValidationError):
        response = await validation_error(request, exc)
        message = invalid_from_validation(exc.errors()).message
        await run_in_threadpool(_record, request, response.status_code, message, exc.body)
        return response

    app.add_exception_handler(APIError, refused)
    app.add_exception_handler(RequestValidationError, invalid_body)
