"""Reading a job's state for the API: one short transaction per look, and an async wait until it is final.

Both `retrieve_future` (which answers `try_again` when its window closes) and the OpenAI endpoint (which holds
the HTTP request until the answer exists) read jobs through here.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.concurrency import run_in_threadpool

from api.db.jobs import get_job, queue_position
from api.db.models import JobState
from api.deps import AppState

FINAL = (JobState.DONE.value, JobState.FAILED.value)


def snapshot(state: AppState, owner: str, job_id: str) -> dict[str, Any] | None:
    with state.reading() as session:
        job = get_job(session, job_id, owner)
        if job is None:
            return None
        position = queue_position(session, job) if job.state == JobState.QUEUED.value else 0
        return {
            "state": job.state,
            "kind": job.kind,
            "result": job.result,
            "error": job.error,
            "category": job.error_category,
            "position": position,
        }


async def wait_final(state: AppState, owner: str, job_id: str, timeout: float) -> dict[str, Any] | None:
    """The job once final, or its latest snapshot when `timeout` runs out (None if it does not exist)."""
    deadline = time.monotonic() + timeout
    with state.queue.watch(job_id) as woken:  # registered before each read: a finish in between still wakes us
        while True:
            woken.clear()
            job = await run_in_threadpool(snapshot, state, owner, job_id)
            remaining = deadline - time.monotonic()
            if job is None or job["state"] in FINAL or remaining <= 0:
                return job
            await state.queue.wait(woken, remaining)
