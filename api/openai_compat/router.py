"""HTTP layer of the OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Authentication is the Loom API key as a Bearer token (what the `openai` client sends). Each completion becomes one
`sample` job for the base model's worker; the request waits for it, or with `stream: true` answers with
server-sent events carrying text deltas as the worker produces them (from embedded workers directly, from
separate worker processes over Redis), ending with `data: [DONE]`. Whatever text the token events did not bring
(none reach a process polling external workers; events are lost while Redis is down) is sent from the stored
result before the end, so a stream always reassembles to the full answer.

Limits: `LOOM_MAX_STREAMS_PER_KEY` concurrent streams per tenant (429 beyond); a non-streaming request waits at
most 10 minutes.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.admission import WorkerBudget
from api.db.models import JobState
from api.deps import AppState, State, Tenant, enqueue
from api.errors import APIError, ErrorCode, error_body
from api.job_results import FINAL, snapshot, wait_final
from api.openai_compat import service
from api.openai_compat.protocol import ChatCompletionRequest, CompletionRequest
from contract.jobs import OpenAISampleResult

router = APIRouter(prefix="/v1")

RESULT_TIMEOUT = 600.0


class StreamLimiter:
    """Counts open streams per tenant."""

    def __init__(self) -> None:
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, owner: str, limit: int) -> None:
        with self._lock:
            if self._open[owner] >= limit:
                raise APIError(429, ErrorCode.RATE_LIMITED, f"at most {limit} concurrent streams per API key", "stream")
            self._open[owner] += 1

    def release(self, owner: str) -> None:
        with self._lock:
            self._open[owner] -= 1


STREAMS = StreamLimiter()


def _submit(
    state: AppState, request: Request, owner: str, body: ChatCompletionRequest | CompletionRequest
) -> tuple[str, str]:
    with state.transaction() as session:
        model = service.resolve_model(state, session, owner, body.model)
        entry = state.model(model.base_model)
        budget = WorkerBudget.of(entry, state.settings)
        budget.check_sample(0, body.token_limit, body.n, "n")  # the prompt's length is known only to the worker
        job_id = enqueue(
            session,
            request,
            owner=owner,
            base_model=model.base_model,
            model_id=None,
            seq_id=None,
            payload=service.sample_job(body, model, entry, state.settings),
        )
    return job_id, model.base_model


def _failure(job: dict[str, Any]) -> APIError:
    if job["category"] == "user":
        return APIError(400, ErrorCode.INVALID_REQUEST, job["error"] or "invalid request")
    return APIError(500, ErrorCode.INTERNAL, job["error"] or "the worker failed")


async def _complete(body: ChatCompletionRequest | CompletionRequest, request: Request, state: AppState, owner: str):
    if body.stream:
        STREAMS.acquire(owner, state.settings.max_streams_per_key)
    try:
        job_id, base_model = await run_in_threadpool(_submit, state, request, owner, body)
        await run_in_threadpool(state.queue.submitted, base_model, None, True)
    except BaseException:
        if body.stream:
            STREAMS.release(owner)
        raise
    chat = isinstance(body, ChatCompletionRequest)
    response_id = service.new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        return StreamingResponse(_events(body, state, owner, job_id, response_id), media_type="text/event-stream")
    job = await wait_final(state, owner, job_id, RESULT_TIMEOUT)
    if job["state"] == JobState.FAILED.value:
        raise _failure(job)
    if job["state"] != JobState.DONE.value:
        raise APIError(504, ErrorCode.INTERNAL, "the model did not answer in time")
    shape = service.chat_response if chat else service.completion_response
    return shape(body, OpenAISampleResult.model_validate(job["result"]), response_id)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, allow_nan=True)}\n\n"


async def _events(body, state: AppState, owner: str, job_id: str, response_id: str) -> AsyncIterator[str]:
    chat = isinstance(body, ChatCompletionRequest)
    chunk = service.chunk
    try:
        if chat:
            yield _sse(
                chunk(
                    body,
                    response_id,
                    [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        for i in range(body.n)
                    ],
                )
            )
        sent = service.SentText(service.holds_finish(body))
        if state.queue.streams is not None:
            deadline = time.monotonic() + RESULT_TIMEOUT
            async for events in state.queue.streams.subscribe(job_id):
                if events:
                    sent.add(events)
                    yield _sse(chunk(body, response_id, service.stream_choices(body, events)))
                elif time.monotonic() > deadline or await _final(state, owner, job_id):
                    break  # its finish signal was lost (Redis down): the result below completes the stream
        job = await wait_final(state, owner, job_id, RESULT_TIMEOUT)
        if job["state"] != JobState.DONE.value:
            error = (
                _failure(job)
                if job["state"] == JobState.FAILED.value
                else APIError(504, ErrorCode.INTERNAL, "timed out")
            )
            yield _sse(error_body(error.code, error.message, error.param, error.status))
            return
        result = OpenAISampleResult.model_validate(job["result"])
        missing = sent.missing(result.choices)  # all of it when no token stream reached this process
        if missing:
            yield _sse(chunk(body, response_id, service.stream_choices(body, missing, result)))
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _sse(chunk(body, response_id, [], service.usage(result)))
        yield "data: [DONE]\n\n"
    finally:
        STREAMS.release(owner)


async def _final(state: AppState, owner: str, job_id: str) -> bool:
    job = await run_in_threadpool(snapshot, state, owner, job_id)
    return job is None or job["state"] in FINAL


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State, owner: Tenant):
    return await _complete(body, request, state, owner)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, state: State, owner: Tenant):
    return await _complete(body, request, state, owner)


@router.get("/models")
def models(state: State, owner: Tenant) -> dict[str, Any]:
    with state.reading() as session:
        cards = service.list_models(state, session, owner)
    return {"object": "list", "data": [c.model_dump() for c in cards]}


@router.get("/models/{model_id:path}")
def model(model_id: str, state: State, owner: Tenant) -> dict[str, Any]:
    with state.reading() as session:
        for card in service.list_models(state, session, owner):
            if card.id == model_id:
                return card.model_dump()
    raise service.model_not_found(model_id)
