"""The contract between `worker.engine.Engine` and a sampler: what both sampling engines implement.

Implementations: `worker.sampling_engine.SamplingEngine` (Loom's own continuous batching, the default) and
`worker.vllm.engine.VllmSamplingEngine` (a vLLM server, `LOOM_SAMPLER_BACKEND=vllm`).

The engine calls `submit` for each new sample job, then `advance` on every tick while `busy`, so jobs arriving
mid-decode join the running batch. A sampler streams token events of OpenAI jobs that asked for streaming through
the `on_stream` sink it was built with (worker.sampling_engine.StreamSink), and gives the same result dicts
either way (`worker.job_payloads.sample_result` for Tinker jobs, `worker.sampling_engine.openai_result` for
OpenAI ones).
"""

from __future__ import annotations

from typing import Any, Protocol

from api.db.jobs import ClaimedJob


class SamplingBackend(Protocol):
    @property
    def busy(self) -> bool:
        """Jobs are queued or running: call `advance` again without waiting."""
        ...

    def submit(self, job: ClaimedJob) -> None:
        """Validate and queue a sample job; raises `worker.job_payloads.UserInputError` for input it cannot run."""
        ...

    def advance(self) -> list[tuple[ClaimedJob, dict[str, Any] | Exception]]:
        """Make progress for about one time slice; (job, result) for every job that finished, where a result that
        is an exception fails only that job. Raising fails every job the sampler holds (the caller then `reset`s)."""
        ...

    def reset(self) -> list[ClaimedJob]:
        """Drop every queued and running job; returns them so the caller can fail them."""
        ...

    def in_flight(self) -> set[str]:
        """Ids of the jobs held between calls (queued or running), so the consumer does not claim them again."""
        ...

    def close(self) -> None:
        """Release what the sampler holds (vLLM's server process)."""
        ...
