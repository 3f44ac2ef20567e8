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

When a batched forward itself fails (a prefill or a decode step, not one row's token choice), the batch is rebuilt
and every job it held is rerun from scratch alone, one at a time: the job that fails by itself is the offender and
fails alone; the others complete as they would have without it. A streaming job that already sent tokens cannot
be restarted invisibly, so it fails (as a server error) instead.

Limits: one decode batch per model; a job is admitted whole (all its `num_samples` rows at once). A rerun job
draws a fresh seed unless its request named one. An exception outside a forward (a bug in the engine's own
bookkeeping) escapes `advance`; the engine then fails every held job and calls `reset`.
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
from worker.openai_jobs import choice, reply_format
from worker.sampler import DecodeBatch, Row, SampleOutput, SampleWork
from worker.sampling_backend import SampleResult
from worker.text_stream import TextStream

log = logging.getLogger(__name__)

StreamSink = Callable[[str, list[TokenEvent]], None]


def openai_prompt(job: SampleJob) -> OpenAIPrompt | None:
    """The job's OpenAI prompt (its answer is OpenAI-shaped), or None for a Tinker `asample` job."""
    return None if isinstance(job.prompt, TinkerPrompt) else job.prompt


def job_work(lm: LoadedModel, job: SampleJob, slot: int | None) -> SampleWork:
    """The validated `SampleWork` of a sample job, an OpenAI prompt rendered in the model's chat format (raises
    `UserInputError` for an OpenAI prompt this model cannot run)."""
    tokens, images = prompt_tokens(lm, job)
    return sample_work(job, tokens, slot, images)


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


def openai_result(
    tokenizer,
    work: SampleWork,
    sequences: list,
    texts: list[TextStream],
    prompt: OpenAIPrompt,
    chat_format: str,
) -> OpenAISampleResult:
    """The result of a finished OpenAI job for `prompt` (the API shapes the final JSON from it); tool calls are
    parsed out in the model's `chat_format` when the prompt declared tools."""
    reply = reply_format(prompt, chat_format)
    return OpenAISampleResult(
        prompt_tokens=len(work.prompt),
        choices=[choice(tokenizer, seq, text, reply) for seq, text in zip(sequences, texts)],
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
    streamed: bool = False
    """Token events of this job were sent: it cannot be restarted without the client seeing it."""

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
        self.suspects: deque[_InFlight] = deque()
        """Jobs of a batch whose forward failed, each to be rerun alone (before anything else is admitted)."""
        self.alone: str | None = None
        """The suspect now running by itself: if the batch fails again, it is the offender."""

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.suspects)

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
        flights = list(self.waiting) + list(self.running.values()) + list(self.suspects)
        self.waiting.clear()
        self.running.clear()
        self.suspects.clear()
        self.alone = None
        self.batch = DecodeBatch(self.lm, self.batch.token_budget)
        for flight in flights:
            if flight.slot is not None:
                self.pool.unpin(flight.slot)
        return [flight.job for flight in flights]

    def in_flight(self) -> set[str]:
        return {flight.job.id for flight in (*self.waiting, *self.suspects)} | set(self.running)

    def close(self) -> None:
        """Nothing to release (the vLLM engine stops its server here)."""

    def _admit(self) -> None:
        if self.alone is not None:
            return  # a suspect runs by itself
        if self.suspects:
            flight = self.suspects.popleft()
            self.alone = flight.job.id
            self._prefill([flight])
            return
        group: list[_InFlight] = []
        while self.waiting and self.batch.fits([f.work for f in group] + [self.waiting[0].work]):
            group.append(self.waiting.popleft())
        if not group and self.waiting and not len(self.batch):
            group.append(self.waiting.popleft())  # alone it exceeds the budget: run it by itself anyway
        if group:
            self._prefill(group)

    def _prefill(self, group: list[_InFlight]) -> None:
        for flight in group:  # held before the prefill, so a prefill that raises isolates them, never loses them
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
        finished_jobs: list[tuple[ClaimedJob, SampleResult]] = []
        deadline = time.monotonic() + self.slice_seconds
        try:
            self._admit()
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
                if self.alone is None and self.suspects:
                    self._admit()  # a suspect that finished alone makes way for the next
        except Exception as exc:  # a batched forward failed: its jobs are rerun alone to find the offender
            finished_jobs += self._isolate(exc)
        return finished_jobs

    def _isolate(self, exc: Exception) -> list[tuple[ClaimedJob, SampleResult]]:
        """After a failed batched forward: rebuild the batch, fail the job that failed by itself (or a stream that
        already sent tokens), and queue the others to be rerun from scratch, one at a time."""
        flights = list(self.running.values())
        self.running.clear()
        self.batch = DecodeBatch(self.lm, self.batch.token_budget)
        offender = len(flights) == 1 or self.alone is not None
        log.error(
            "a decode batch of %d job(s) failed%s",
            len(flights),
            "" if offender else "; rerunning each alone",
            exc_info=exc,
        )
        self.alone = None
        failed: list[tuple[ClaimedJob, SampleResult]] = []
        for flight in flights:
            if offender or flight.streaming and flight.streamed:
                if flight.slot is not None:
                    self.pool.unpin(flight.slot)
                failed.append(
                    (flight.job, exc if offender else RuntimeError(f"the decode batch failed mid-stream: {exc}"))
                )
            else:
                flight.output, flight.done, flight.texts = None, {}, []
                self.suspects.append(flight)
        return failed

    def _retire(self, job_id: str) -> _InFlight:
        """Forget a running job whose rows have all left the batch, and unpin its adapter."""
        flight = self.running.pop(job_id)
        if self.alone == job_id:
            self.alone = None
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
                self.running[job_id].streamed = True
                self.on_stream(job_id, job_events)

    def _result(self, flight: _InFlight) -> SampleResult:
        flight.output.sequences = [flight.done[i].sequence() for i in range(flight.work.num_samples)]
        if flight.openai is None:
            return sample_result(flight.output)
        return openai_result(
            self.lm.tokenizer,
            flight.work,
            flight.output.sequences,
            flight.texts,
            flight.openai,
            self.lm.spec.chat_format,
        )
