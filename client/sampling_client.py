"""SamplingClient: generation and prompt logprobs from one sampling session.

Role: ``POST /api/v1/asample`` with ``sampling_session_id`` + a per-client
``seq_id`` (0, 1, …, as tinker), then the futures poll.

- ``sample(...)`` / ``compute_logprobs(...)`` return an :class:`APIFuture` at
  once; ``sample_async`` / ``compute_logprobs_async`` return the *result*
  (tinker's behaviour for the sampling client).
- ``compute_logprobs`` = ``sample(max_tokens=1, include_prompt_logprobs=True)``;
  element 0 of the list is ``None``.
- A 429 from ``asample`` is retried with backoff by the transport.

Limits: not picklable (the session lives in the owning ``ServiceClient``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Union

from . import types
from .futures import APIFuture, submit_and_poll
from .http import HttpClient
from .tokenizers import fetch_tokenizer, load_tokenizer

PromptLike = Union[types.ModelInput, Sequence[int], dict[str, Any]]


def _as_model_input(prompt: PromptLike) -> types.ModelInput:
    if isinstance(prompt, types.ModelInput):
        return prompt
    if isinstance(prompt, dict):
        return types.ModelInput.model_validate(prompt)
    return types.ModelInput.from_ints(list(prompt))


class SamplingClient:
    """Client of one sampling session (a fixed set of weights)."""

    def __init__(
        self,
        http: HttpClient,
        sampling_session_id: str,
        *,
        base_model: str | None = None,
        model_path: str | None = None,
    ) -> None:
        self._http = http
        self.sampling_session_id = sampling_session_id
        self.model_path = model_path
        self._base_model = base_model
        self._seq_lock = threading.Lock()
        self._next_seq = 0

    def __repr__(self) -> str:
        return f"SamplingClient(sampling_session_id={self.sampling_session_id!r})"

    def _reserve_seq_id(self) -> int:
        with self._seq_lock:
            seq_id = self._next_seq
            self._next_seq += 1
            return seq_id

    def _request(
        self,
        prompt: PromptLike,
        num_samples: int,
        sampling_params: types.SamplingParams | dict[str, Any],
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: int,
    ) -> types.SampleRequest:
        return types.SampleRequest(
            sampling_session_id=self.sampling_session_id,
            seq_id=self._reserve_seq_id(),
            num_samples=num_samples,
            prompt=_as_model_input(prompt),
            sampling_params=types.SamplingParams.model_validate(sampling_params, from_attributes=True),
            prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
        )

    async def _run(self, request: types.SampleRequest) -> types.SampleResponse:
        return await submit_and_poll(
            self._http, "/api/v1/asample", request.to_wire(), types.SampleResponse, request_type="Sample"
        )

    # ----------------------------------------------------------------- sample
    def sample(
        self,
        prompt: PromptLike,
        num_samples: int,
        sampling_params: types.SamplingParams | dict[str, Any],
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> APIFuture[types.SampleResponse]:
        """Draw ``num_samples`` completions of ``prompt``."""
        request = self._request(prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs)
        return APIFuture(self._http.run(self._run(request)), "Sample")

    async def sample_async(
        self,
        prompt: PromptLike,
        num_samples: int,
        sampling_params: types.SamplingParams | dict[str, Any],
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> types.SampleResponse:
        return await self.sample(prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs)

    # ------------------------------------------------------- compute_logprobs
    async def _logprobs(self, request: types.SampleRequest) -> list[float | None]:
        response = await self._run(request)
        return list(response.prompt_logprobs or [])

    def compute_logprobs(self, prompt: PromptLike) -> APIFuture[list[float | None]]:
        """log p(token_i | tokens_<i) for every prompt token (``None`` at 0)."""
        request = self._request(prompt, 1, types.SamplingParams(max_tokens=1), True, 0)
        return APIFuture(self._http.run(self._logprobs(request)), "ComputeLogprobs")

    async def compute_logprobs_async(self, prompt: PromptLike) -> list[float | None]:
        return await self.compute_logprobs(prompt)

    # ------------------------------------------------------------------- info
    async def _fetch_base_model(self) -> str:
        if self._base_model is None:
            body = await self._http.get_json(f"/api/v1/samplers/{self.sampling_session_id}")
            self._base_model = types.GetSamplerResponse.model_validate(body).base_model
        return self._base_model

    def get_base_model(self) -> str:
        return self._http.call(self._fetch_base_model())

    async def get_base_model_async(self) -> str:
        return await self._http.call_async(self._fetch_base_model())

    def get_tokenizer(self) -> Any:
        """The server's tokenizer of the base model, downloaded from the server and cached locally
        (:mod:`loom.tokenizers`; needs ``transformers``)."""
        return load_tokenizer(self._http.call(fetch_tokenizer(self._http, self.get_base_model())))
