"""The names and messages workers and the API exchange over the broker (Celery on Redis) in scaled-out deployments.

Wake-ups travel as the Celery task `WAKE_TASK(base_model)` to a worker's private queue (`worker_queue`) or to a base
model's shared training or sampling queue (`shared_queue`); they carry no work, only "look at the database now".
Workers publish on the Redis channel `EVENTS_CHANNEL` the ids of jobs whose results they recorded
(`finished_message`) and the token events of streaming OpenAI jobs (`stream_message`); `parse_event` reads both.

Limits: every message is best-effort; the database stays the truth (a lost message costs latency, never work).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TypedDict

WAKE_TASK = "loom.wake"
EVENTS_CHANNEL = "loom:events"


def worker_queue(worker_id: str) -> str:
    """The queue only this worker consumes: wake-ups for the runs placed on it."""
    return f"loom.worker.{worker_id}"


def shared_queue(base_model: str, sampling: bool) -> str:
    """The queue every training (or sampling) worker of a base model consumes."""
    return f"loom.{'sample' if sampling else 'train'}.{base_model}"


class TokenEvent(TypedDict):
    """One streamed token of an OpenAI sample job (a plain dict: one is made per decoded token)."""

    index: int
    """Which of the job's `n` choices."""
    text: str
    """The text this token completes (empty while a multi-byte character or a possible stop string is pending)."""
    token: int | None
    token_str: str
    logprob: float | None
    finish_reason: str | None
    """"stop" or "length" on the choice's last event ("tool_calls" too on the events an API process makes from a
    stored result)."""


@dataclass
class BrokerEvent:
    """A message from the events channel: finished job ids, and/or token events of one job."""

    finished: list[str] = field(default_factory=list)
    stream_job_id: str | None = None
    tokens: list[TokenEvent] = field(default_factory=list)


def finished_message(job_ids: list[str]) -> str:
    return json.dumps({"finished": job_ids})


def stream_message(job_id: str, events: list[TokenEvent]) -> str:
    return json.dumps({"stream": job_id, "events": events}, allow_nan=True)


def parse_event(data: bytes | str) -> BrokerEvent:
    message = json.loads(data)
    return BrokerEvent(
        finished=list(message.get("finished") or []),
        stream_job_id=message.get("stream"),
        tokens=list(message.get("events") or []),
    )
