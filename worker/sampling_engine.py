"""Continuous-batching sampling for one base model: sample jobs join the running decode batch between steps.

`submit(job)` validates a Tinker `asample` or OpenAI job and queues it; `advance()` admits queued jobs while the
KV token budget allows, runs decode steps for about `slice_seconds`, streams per-token text deltas of jobs that
asked for streaming through `on_stream`, and returns the result of every job whose rows have all finished, or
the exception that failed a job's row alone (non-finite logits of a diverged adapter: `NonFiniteLogits`).
The consumer calls `advance()` on every tick while `busy`, claiming new jobs in between, so a request that
arrives mid-decode starts on the next step instead of waiting for the batch to drain.

Sampler adapters in use by live rows are pinned in the adapter pool so the LRU never evicts them.

The module-level helpers (`job_work`, `openai_prompt`, `token_event`, `openai_result`) turn jobs into work and
rows into results; `worker.vllm.engine.VllmSamplingEngine` uses them too, so both backends give the same shapes.

Limits: one decode batch per model; a job is admitted whole (all its `num_samples` rows at once). An exception
in a batched forward pass itself (not one row's) escapes `advance`; the engine then fails every held job and
calls `reset`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from contract.broker import TokenEvent
from contract.checkpoint_store import CheckpointStore
from contract.jobs import ClaimedJob, OpenAIPrompt, OpenAISampleResult, SampleJob, TinkerPrompt
from contract.settings import DEFAULT_TOKEN_BUDGET
from worker.adapter_pool import AdapterPool
from worker.job_payloads import UserInputError, prompt_tokens, sample_result, sample_work
from worker.models.loader import LoadedModel
from worker.openai_jobs import choice
from worker.sampler import DecodeBatch, Row, SampleOutput, SampleWork
from worker.sampling_backend import SampleResult
from worker.text_stream import TextStream

log = logging.getLogger(__name__)

StreamSink = Callable[[str, list[TokenEvent]], None]


def openai_prompt(job: SampleJob) -> OpenAIPrompt | None:
    """The job's OpenAI prompt (its answer is OpenAI-shaped), or None for a Tinker `asample` job."""
    return None if isinstance(job.prompt, TinkerPrompt) else job.prompt


def job_work(lm: LoadedModel, job: SampleJob, slot: int | None) -> SampleWork:
    """The validated `SampleWork` of a sample job (raises `UserInputError` for an OpenAI prompt this model cannot
    run)."""
    return sample_work(job, prompt_tokens(lm, job), slot)


def token_event(
    tokenizer, text: TextStream, index: int, delta: str, token: int | None, logprob: float | None, stop: str | None
) -> TokenEvent:
    """One streamed token of an OpenAI job as `on_stream` receives it; `stop` is the row's stop reason, if done."""
    return TokenEvent(
        index=index,
        text=delta,
        token=token,
        token_str="" if token is None else tokenizer.decode([token], skip_special_tokens=False),
        logprob=logprob,
        finish_reason=None if stop is None else ("stop" if stop == "stop" or text.stopped else "length"),
    )


def openai_result(tokenizer, work: SampleWork, sequences: list, texts: list[TextStream]) -> OpenAISampleResult:
    """The result of a finished OpenAI job (the API shapes the final JSON from it)."""
    return OpenAISampleResult(
        prompt_tokens=len(work.prompt),
        choices=[choice(tokenizer, seq, text) for seq, text in zip(sequences, texts)],
    )


@dataclass
class _InFlight:
    job: ClaimedJob
    work: SampleWork
    slot: int | None
    openai: OpenAIPrompt | None
    output: SampleOutput | None = None
    done: dict[int, Row] = field(default_factory=dict)
    texts: list[TextStream] = field(default_factory=list)

    @property
    def streaming(self) -> bool:
        return self.openai is not None and self.openai.stream


class SamplingEngine:
    def __init__(
        self,
        lm: LoadedModel,
        pool: AdapterPool,
        store: CheckpointStore,
        on_stream: StreamSink | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        slice_seconds: float = 0.05,
    ) -> None:
        self.lm, self.pool, self.store = lm, pool, store
        self.on_stream = on_stream
        self.batch = DecodeBatch(lm, token_budget)
        self.slice_seconds = slice_seconds
        self.waiting: deque[_InFlight] = deque()
        self.running: dict[str, _InFlight] = {}

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def submit(self, job: ClaimedJob, payload: SampleJob) -> None:
        """Queue a sample job (`payload` is its payload); raises `UserInputError` for input this model cannot run."""
        uri = payload.storage_uri
        slot = None if uri is None else self.pool.sampler_slot(uri, self.store.open)
        work = job_work(self.lm, payload, slot)
        need = work.num_samples * (len(work.prompt) + work.max_tokens)
        if (
            need > self.batch.token_budget
        ):  # the API checks Tinker prompts; only the worker knows an OpenAI one's length
            raise UserInputError(
                f"{work.num_samples} samples × ({len(work.prompt)} prompt + {work.max_tokens} new) tokens = {need} "
                f"exceed the {self.batch.token_budget} tokens one decode batch holds; ask for fewer samples or tokens"
            )
        work.cache_key = (job.owner, slot)  # slots are never reused, so a slot names exact weights
        if slot is not None:
            self.pool.pin(slot)
        self.waiting.append(_InFlight(job, work, slot, openai_prompt(payload)))

    def reset(self) -> list[ClaimedJob]:
        """Drop every queued and running job (after a failed decode step); returns them so they can be failed."""
        flights = list(self.waiting) + list(self.running.values())
        self.waiting.clear()
        self.running.clear()
        self.batch = DecodeBatch(self.lm, self.batch.token_budget)
        for flight in flights:
            if flight.slot is not None:
                self.pool.unpin(flight.slot)
        return [flight.job for flight in flights]

    def in_flight(self) -> set[str]:
        return {flight.job.id for flight in self.waiting} | set(self.running)

    def close(self) -> None:
        """Nothing to release (the vLLM engine stops its server here)."""

    def _admit(self) -> None:
        group: list[_InFlight] = []
        while self.waiting and self.batch.fits([f.work for f in group] + [self.waiting[0].work]):
            group.append(self.waiting.popleft())
        if not group and self.waiting and not len(self.batch):
            group.append(self.waiting.popleft())  # alone it exceeds the budget: run it by itself anyway
        if not group:
            return
        for flight in group:  # held before the prefill, so a prefill that raises fails them in `reset`, not loses them
            self.running[flight.job.id] = flight
        outputs = self.batch.admit([f.work for f in group], [f.job.id for f in group])
        for flight, output in zip(group, outputs):
            flight.output = output
            if flight.openai is not None:
                flight.texts = [
                    TextStream(self.lm.tokenizer, flight.work.stop_strings) for _ in range(flight.work.num_samples)
                ]

    def advance(self) -> list[tuple[ClaimedJob, SampleResult]]:
        """Admit, decode for one time slice, and return (job, result) for every job that finished."""
        self._admit()
        finished_jobs = []
        deadline = time.monotonic() + self.slice_seconds
        while len(self.batch) and time.monotonic() < deadline:
            step = self.batch.step()
            for tag, exc in step.failed.items():  # its rows already left the batch; the others go on
                finished_jobs.append((self._retire(tag).job, exc))
            self._stream(step.emitted)
            for row in step.finished:
                flight = self.running[row.tag]
                flight.done[row.index] = row
                if len(flight.done) == flight.work.num_samples:
                    finished_jobs.append((self._retire(row.tag).job, self._result(flight)))
        return finished_jobs

    def _retire(self, job_id: str) -> _InFlight:
        """Forget a running job whose rows have all left the batch, and unpin its adapter."""
        flight = self.running.pop(job_id)
        if flight.slot is not None:
            self.pool.unpin(flight.slot)
        return flight

    def _stream(self, emitted: list[tuple[Row, int]]) -> None:
        events: dict[str, list[TokenEvent]] = {}
        for row, token in emitted:
            flight = self.running[row.tag]
            if flight.openai is None:
                continue
            text = flight.texts[row.index]
            delta = text.push(token)
            if row.stop_reason is not None:
                delta += text.finish()
            if not flight.streaming:
                continue
            events.setdefault(row.tag, []).append(
                token_event(self.lm.tokenizer, text, row.index, delta, token, row.logprobs[-1], row.stop_reason)
            )
        if self.on_stream is not None:
            for job_id, job_events in events.items():
                self.on_stream(job_id, job_events)

    def _result(self, flight: _InFlight) -> SampleResult:
        flight.output.sequences = [flight.done[i].sequence() for i in range(flight.work.num_samples)]
        if flight.openai is None:
            return sample_result(flight.output)
        return openai_result(self.lm.tokenizer, flight.work, flight.output.sequences, flight.texts)
