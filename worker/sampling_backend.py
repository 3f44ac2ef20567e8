"""The interface every sampling backend of a worker implements (`SamplingEngine`, `VllmSamplingEngine`).

The engine hands each claimed sample job to `submit`, then calls `advance` on every tick while `busy`: a backend
runs its own batching (continuous decode, or a vLLM server) and returns the jobs that finished since the last call.

Limits: a backend is driven from one thread (the consumer's); it may run threads of its own behind `advance`.
"""

from __future__ import annotations

from typing import Protocol

from contract.jobs import ClaimedJob, OpenAISampleResult, SampleJob
from loom.types import SampleResponse

SampleResult = SampleResponse | OpenAISampleResult
"""A Tinker `asample` answer, or an OpenAI job's choices."""


class SamplingBackend(Protocol):
    @property
    def busy(self) -> bool:
        """Jobs are queued or running: call `advance` again without waiting for new work."""
        ...

    def submit(self, job: ClaimedJob, payload: SampleJob) -> None:
        """Queue a sample job (`payload` is its parsed payload); raises `UserInputError` for input this model cannot
        run, or another exception that fails this job alone."""
        ...

    def advance(self) -> list[tuple[ClaimedJob, SampleResult | Exception]]:
        """Make progress for about one time slice; returns every job that finished, with its result or the
        exception that fails it alone. An exception raised by `advance` itself fails every job it holds."""
        ...

    def reset(self) -> list[ClaimedJob]:
        """Drop every queued and running job (after `advance` raised); returns them so they can be failed."""
        ...

    def in_flight(self) -> set[str]:
        """Ids of the jobs held between calls."""
        ...

    def close(self) -> None:
        """Release what the backend holds (a server process, threads)."""
        ...
