"""The HTTP client of one vLLM server: `SampleWork` in, `SampleOutput` out, with `run_sampling`'s semantics.

`VllmClient.stream_one(work, model)` runs one work as one streaming `/v1/completions` request whose `prompt` is
the token-id list (`request_body`), on the served `model` (the base model or a registered adapter, see
`worker.vllm.adapters`), handing each chunk to an optional `emit` callback; `parse_choice` turns the assembled
choices into `SampledSequence`s. `load_adapter` / `unload_adapter` / `models` are the server's adapter endpoints.
httpx only: nothing here imports vllm or torch.

What matches `run_sampling` (checked in float32 by tests/integration/test_vllm_backend.py, base model and LoRA
adapters mixed in one batch, `train_unembed` adapters included): greedy tokens token for token; stop on EOS /
stop tokens / stop strings (the token that completes a stop string is kept, as in our engine); `stop_at_eos`;
`num_samples`; "stop" / "length" stop reasons; `prompt_logprobs`, `topk_prompt_logprobs` and per-token
`top_logprobs`. Sampled-token logprobs are vLLM's "processed" logprobs, log_softmax(z / τ) (τ = 1 when greedy):
the quantity our engine returns as long as no top-k / top-p truncation is asked for (the server must run with
`--logprobs-mode processed_logprobs`, `VllmServer`'s default).

vLLM 0.32 computes prompt logprobs with the per-sequence LoRA mapping, which crashes the engine core (CPU) when
several sequences share the batch. A work asking for prompt logprobs is therefore scored first by a separate
1-token request (`scoring_body`) that runs alone: a reader-writer gate makes it wait for this client's other
requests and holds them back meanwhile. So this client must be the server's only one.

Limits:
- With top-k / top-p truncation vLLM's sampled-token logprob is renormalised over the kept tokens (≥ ours).
- Seeded sampling is reproducible within vLLM but draws from vLLM's generators, not ours: at temperature > 0 the
  two backends agree in distribution only.
- The implicit EOS stop is vLLM's: the tokenizer's EOS plus generation_config.json's `eos_token_id`s; ours uses
  generation_config's (the tokenizer's if it has none). They agree for SmolLM2 and tiny Kimi K2.
- Works with prompt logprobs cost an extra prefill that runs alone.
- `prompt_cache_hit_tokens` is vLLM's prefix-cache count (block-granular; the server needs
  `--enable-prompt-tokens-details`), not our prefix cache's.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from worker.sampler import SampledSequence, SampleOutput, SampleWork

Emit = Callable[[int, list[int], list[float], "str | None"], None]
"""(sample index, new tokens, their logprobs, finish reason once finished)."""


class VllmError(RuntimeError):
    """The vLLM server refused a request or returned something this client cannot read."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def wants_prompt_logprobs(work: SampleWork) -> bool:
    return bool(work.prompt_logprobs or work.topk_prompt_logprobs)


def request_body(work: SampleWork, model: str) -> dict:
    """The streaming /v1/completions body that reproduces `run_sampling`'s semantics (prompt scores aside)."""
    greedy = work.temperature <= 0
    body: dict = {
        "model": model,
        "prompt": list(work.prompt),
        # vLLM refuses n > 1 when greedy; greedy samples are all the same, so ask once (see stream_one).
        "n": 1 if greedy else work.num_samples,
        "max_tokens": work.max_tokens,
        "temperature": max(float(work.temperature), 0.0),
        # Greedy rows batched with sampled ones still go through vLLM's top-k / top-p, which would truncate
        # their logprobs; run_sampling ignores truncation when greedy, so drop it.
        "top_p": float(work.top_p) if 0 < work.top_p <= 1 and not greedy else 1.0,
        "top_k": int(work.top_k) if work.top_k and work.top_k > 0 and not greedy else -1,
        # generation_config.json may carry penalties that run_sampling never applies: switch them off.
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "logprobs": max(int(work.top_logprobs), 0),  # 0: only the sampled token's logprob
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,  # top_logprobs keys become "token_id:<id>"
        "skip_special_tokens": False,  # stop strings see special tokens, as in run_sampling
        "include_stop_str_in_output": True,
        "stop": list(work.stop_strings),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if work.stop_tokens:
        body["stop_token_ids"] = list(work.stop_tokens)
    # run_sampling: explicit stop tokens replace the implicit EOS stop, and stop_at_eos=False drops it.
    body["ignore_eos"] = bool(work.stop_tokens) or not work.stop_at_eos
    if work.seed is not None:
        body["seed"] = int(work.seed)
    return body


def scoring_body(work: SampleWork, model: str) -> dict:
    """A 1-token greedy request that only collects the prompt's logprobs (top-k when asked)."""
    return {
        "model": model,
        "prompt": list(work.prompt),
        "n": 1,
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": int(work.topk_prompt_logprobs or 0),
        "return_token_ids": True,
    }


def _token_id(key: str) -> int:
    if not key.startswith("token_id:"):
        raise VllmError(f"vLLM returned a top-logprob key without a token id: {key!r}")
    return int(key[len("token_id:") :])


def parse_choice(choice: dict, top_k: int = 0) -> SampledSequence:
    """One finished completion choice (token_ids, logprobs, finish_reason) as a `SampledSequence`."""
    tokens = choice.get("token_ids")
    logprobs = choice.get("logprobs") or {}
    values = logprobs.get("token_logprobs")
    if tokens is None or values is None or len(tokens) != len(values):
        raise VllmError(f"vLLM choice lacks token ids or logprobs: {str(choice)[:500]}")
    reason = choice.get("finish_reason")
    if reason not in ("stop", "length"):
        raise VllmError(f"vLLM finished a sequence with reason {reason!r}")
    top = None
    if top_k > 0:
        # Each entry holds the k best tokens plus the sampled one when it is not among them.
        top = [
            sorted(((_token_id(k), float(v)) for k, v in (entry or {}).items()), key=lambda x: -x[1])[:top_k]
            for entry in logprobs.get("top_logprobs") or []
        ]
        if len(top) != len(tokens):
            raise VllmError("vLLM returned top logprobs for the wrong number of tokens")
    return SampledSequence([int(t) for t in tokens], [float(x) for x in values], reason, top)


def parse_prompt_logprobs(
    work: SampleWork, entries: list | None
) -> tuple[list[float | None] | None, list[list[tuple[int, float]] | None] | None]:
    """(prompt logprobs, top-k prompt logprobs) of a scoring response, each None unless the work asked for it."""
    if not wants_prompt_logprobs(work):
        return None, None
    if entries is None or len(entries) != len(work.prompt):
        raise VllmError("vLLM returned no prompt logprobs (or the wrong number)")
    lps: list[float | None] | None = [None] if work.prompt_logprobs else None
    top: list[list[tuple[int, float]] | None] | None = [None] if work.topk_prompt_logprobs else None
    for token, entry in zip(work.prompt[1:], entries[1:]):
        if lps is not None:
            lps.append(float(entry[str(token)]["logprob"]))
        if top is not None:
            ranked = sorted(
                ((int(t), float(v["logprob"]), int(v["rank"])) for t, v in entry.items()),
                key=lambda x: x[2],
            )
            top.append([(t, lp) for t, lp, rank in ranked if rank <= work.topk_prompt_logprobs])
    return lps, top


class _ScoringGate:
    """Prompt-logprob requests run alone in the engine; all other requests may overlap one another."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class _Choice:
    """One streamed choice, assembled chunk by chunk into the shape `parse_choice` reads."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[dict | None] = []
        self.finish: str | None = None

    def add(self, chunk: dict) -> tuple[list[int], list[float], str | None]:
        """Append one chunk; returns its tokens, their logprobs and its finish reason."""
        tokens = [int(t) for t in chunk.get("token_ids") or []]
        logprobs = chunk.get("logprobs") or {}
        values = [float(x) for x in logprobs.get("token_logprobs") or []]
        if len(values) != len(tokens):
            raise VllmError(f"vLLM streamed {len(tokens)} tokens with {len(values)} logprobs")
        self.tokens += tokens
        self.logprobs += values
        self.top += logprobs.get("top_logprobs") or []
        finish = chunk.get("finish_reason")
        if finish is not None:
            self.finish = finish
        return tokens, values, finish

    def choice(self) -> dict:
        logprobs = {"token_logprobs": self.logprobs, "top_logprobs": self.top}
        return {"token_ids": self.tokens, "logprobs": logprobs, "finish_reason": self.finish}


class VllmClient:
    """Requests to the vLLM server at `base_url`; thread-safe (one `httpx.Client`, the scoring gate)."""

    def __init__(self, base_url: str, *, model: str | None = None, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._model = model
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._gate = _ScoringGate()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> VllmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- models and adapters -------------------------------------------------------------------------------

    def _post(self, path: str, body: dict) -> httpx.Response:
        try:
            response = self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise VllmError(f"vLLM server at {self.base_url} unreachable: {exc}") from exc
        if response.status_code >= 400:
            raise VllmError(f"vLLM {path} -> {response.status_code}: {response.text[:2000]}", response.status_code)
        return response

    def models(self) -> list[dict]:
        """/v1/models entries: the base model (`parent` None, `root` its folder) and registered adapters."""
        try:
            return self._client.get("/v1/models").raise_for_status().json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise VllmError(f"cannot list models at {self.base_url}: {exc}") from exc

    @property
    def model(self) -> str:
        """The base model's served name (asked from /v1/models once if not given)."""
        if self._model is None:
            roots = [m["id"] for m in self.models() if not m.get("parent")]
            if not roots:
                raise VllmError(f"vLLM at {self.base_url} serves no base model")
            self._model = roots[0]
        return self._model

    def load_adapter(self, name: str, folder: Path) -> None:
        """Register the PEFT adapter in `folder` as `name`; re-points a name another client registered."""
        request = {"lora_name": name, "lora_path": str(folder)}
        try:
            self._post("/v1/load_lora_adapter", request)
        except VllmError as exc:
            if exc.status != 400 or "already been loaded" not in str(exc):
                raise
            self._post("/v1/load_lora_adapter", dict(request, load_inplace=True))

    def unload_adapter(self, name: str) -> None:
        self._post("/v1/unload_lora_adapter", {"lora_name": name})

    # -- sampling ------------------------------------------------------------------------------------------

    def stream_one(
        self, work: SampleWork, model: str, emit: Emit | None = None, cancelled: threading.Event | None = None
    ) -> SampleOutput:
        """`run_sampling(lm, [work])[0]` on the served `model` (`work.slot` is ignored), streamed: `emit` sees
        each chunk. Prompt logprobs come first from a scoring request that runs alone. When `cancelled` is set
        the request is aborted and the output so far returned (without sequences)."""
        output = SampleOutput([])
        if wants_prompt_logprobs(work):
            with self._gate.exclusive():
                scored = self._post("/v1/completions", scoring_body(work, model)).json()
            entries = scored["choices"][0].get("prompt_logprobs")
            output.prompt_logprobs, output.topk_prompt_logprobs = parse_prompt_logprobs(work, entries)
        body = request_body(work, model)
        copies = work.num_samples if body["n"] == 1 else 1  # greedy: one request, identical copies
        parts = [_Choice() for _ in range(body["n"])]
        with self._gate.shared():
            for event in self._events(body):
                if cancelled is not None and cancelled.is_set():
                    return output  # closing the stream aborts the request in vLLM
                usage = event.get("usage") or {}
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                if cached is not None:
                    output.cache_hit_tokens = int(cached)
                for chunk in event.get("choices") or []:
                    part = parts[chunk["index"]]
                    tokens, values, finish = part.add(chunk)
                    if emit is not None and (tokens or finish is not None):
                        for k in range(copies):
                            emit(chunk["index"] + k, tokens, values, finish)
        sequences = [parse_choice(part.choice(), work.top_logprobs) for part in parts]
        output.sequences = sequences + [copy.deepcopy(sequences[0]) for _ in range(copies - 1)]
        return output

    def _events(self, body: dict) -> Iterator[dict]:
        """The server-sent events of one streaming completion."""
        try:
            with self._client.stream("POST", "/v1/completions", json=body) as response:
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
        except httpx.HTTPError as exc:
            raise VllmError(f"vLLM server at {self.base_url} unreachable: {exc}") from exc
