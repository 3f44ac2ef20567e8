"""`retrieve_futures`: which sample requests of one sampling session (clone) finished since the client's cursor.

With `sample_use_retrieve_futures` on, each SamplingClient of SDK 0.38 runs one background long-poll for its
sampling session and clone (the clone's requests are its block of seq_ids, `loom.types.futures.CLONE_SEQ_BLOCK`)
instead of one `retrieve_future` poll per request, and fetches each payload with `retrieve_future` once told that
the request is final. A poll answers the final (done or failed) sample jobs of the target not yet reported, oldest
completion first, and a new cursor; it waits up to its timeout for the first one.

The cursor packs the newest reported completion time (µs since `CURSOR_EPOCH`) with how many of the target's
requests had completed by then (mod `2**COUNT_BITS`). Completion times are written by workers before they commit,
so a completion may become visible after a later one was already reported; the count tells: when more requests
completed by the cursor's time than the cursor says, everything completed is reported again from the start (the
SDK takes a repeated completion as a no-op), so no completion is ever lost and, in the common case, none is
reported twice.

Limits: at most `MAX_COMPLETIONS` per answer (a burst is reported over several polls); the `retrieved_request_ids`
a client reports are accepted and ignored (Loom keeps results until the job rows go, so `retrieve_future` can
always be repeated); the payload size is not announced, so the SDK fetches each result with one metadata poll.
New submissions wake a waiting poll only within this process (`note_submitted`); across API replicas a poll notices
them within the queue's poll interval.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.db.models import Job, JobState, lane_for
from api.deps import AppState
from api.queue import Waiters
from contract.jobs import JobKind
from loom.types import FutureCompletion, FutureFailed, FutureFinished, FuturesRetrieveResponse
from loom.types.futures import CLONE_SEQ_BLOCK

CURSOR_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
COUNT_BITS = 12
"""Low bits of the cursor: the completed count (mod 4096); the rest is the time, so a cursor fits 63 bits until
2095."""
MAX_COMPLETIONS = 1000
MAX_WATCHED = 256
"""Pending requests whose completion wakes a waiting poll at once; others are noticed within the poll interval."""

_FINAL = (JobState.DONE.value, JobState.FAILED.value)
_SAMPLE_LANE = lane_for(JobKind.SAMPLE)
_ONE_US = timedelta(microseconds=1)

_submissions = Waiters()
"""Per sampling session: the polls waiting on it, woken when a sample is submitted to it in this process."""


def note_submitted(sampling_session_id: str) -> None:
    """A sample of this sampling session was queued: wake its waiting polls so they watch the new request too."""
    _submissions.wake([sampling_session_id])


@dataclass(frozen=True)
class Target:
    sampling_session_id: str
    clone_id: int


@dataclass(frozen=True)
class _Completed:
    request_id: str
    failed: bool
    finished_at: datetime


def _pack(mark: datetime, count: int) -> int:
    return ((mark - CURSOR_EPOCH) // _ONE_US << COUNT_BITS) | (count % (1 << COUNT_BITS))


def _unpack(cursor: int) -> tuple[datetime, int]:
    return CURSOR_EPOCH + (cursor >> COUNT_BITS) * _ONE_US, cursor & ((1 << COUNT_BITS) - 1)


def _of_target(query: Select, target: Target) -> Select:
    low = target.clone_id * CLONE_SEQ_BLOCK
    return query.where(
        Job.model_id == target.sampling_session_id,
        Job.lane == _SAMPLE_LANE,
        Job.seq_id >= low,
        Job.seq_id < low + CLONE_SEQ_BLOCK,
    )


def _pending_ids(state: AppState, target: Target) -> list[str]:
    with state.reading() as session:
        query = _of_target(select(Job.id), target).where(Job.state.not_in(_FINAL)).limit(MAX_WATCHED)
        return list(session.scalars(query))


def _completed(session: Session, target: Target, after: datetime | None, limit: int) -> list[_Completed]:
    query = _of_target(select(Job.id, Job.state, Job.finished_at), target).where(Job.state.in_(_FINAL))
    if after is not None:
        query = query.where(Job.finished_at > after)
    rows = session.execute(query.order_by(Job.finished_at, Job.id).limit(limit + 1)).all()
    if len(rows) > limit:  # never cut an instant in two: the cursor's time must cover all or none of it
        boundary = rows[limit][2]
        whole = [row for row in rows[:limit] if row[2] != boundary]
        rows = (
            whole
            or session.execute(
                _of_target(select(Job.id, Job.state, Job.finished_at), target)
                .where(Job.state.in_(_FINAL), Job.finished_at == boundary)
                .order_by(Job.id)
            ).all()
        )
    return [_Completed(job_id, job_state == JobState.FAILED.value, at) for job_id, job_state, at in rows]


def _poll_once(state: AppState, target: Target, cursor: int) -> tuple[list[_Completed], int]:
    """The completions to report after `cursor`, and the cursor that follows them (see the module docstring)."""
    mark, count = _unpack(cursor)
    with state.reading() as session:
        # Count before listing: a completion that becomes visible in between is counted next time, not now.
        seen = session.scalar(
            _of_target(select(func.count()).select_from(Job), target).where(
                Job.state.in_(_FINAL), Job.finished_at <= mark
            )
        )
        in_step = (seen or 0) % (1 << COUNT_BITS) == count
        completed = _completed(session, target, mark if in_step else None, MAX_COMPLETIONS)
    if not completed:
        return [], _pack(mark, seen or 0)
    reported = (seen or 0) + len(completed) if in_step else len(completed)
    return completed, _pack(completed[-1].finished_at, reported)


async def _wait_any(events: list[asyncio.Event], timeout: float) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _wire(completion: _Completed) -> FutureCompletion:
    if completion.failed:
        return FutureFailed(request_id=completion.request_id)
    return FutureFinished(request_id=completion.request_id)


async def poll_completions(state: AppState, target: Target, cursor: int, timeout: float) -> dict[str, Any]:
    """Answer one `retrieve_futures` poll, holding it up to `timeout` seconds until something completes."""
    deadline = time.monotonic() + timeout
    while True:
        with ExitStack() as stack:
            # Watch before reading, so a completion in between still wakes us.
            events = [stack.enter_context(_submissions.watch(target.sampling_session_id))]
            for job_id in await run_in_threadpool(_pending_ids, state, target):
                events.append(stack.enter_context(state.queue.watch(job_id)))
            completed, next_cursor = await run_in_threadpool(_poll_once, state, target, cursor)
            remaining = deadline - time.monotonic()
            if completed or remaining <= 0:
                return FuturesRetrieveResponse(completions=[_wire(c) for c in completed], cursor=next_cursor).to_wire()
            await _wait_any(events, min(remaining, state.queue.poll_interval))
            cursor = next_cursor
