"""Sampling wire types: ``/api/v1/create_sampling_session`` and ``/api/v1/asample``.

Role: :class:`SamplingParams`, :class:`SampleRequest` (every field SDK 0.38
can send) and the JSON form of :class:`SampleResponse`::

    {"type": "sample",
     "sequences": [{"stop_reason": "stop"|"length", "tokens": [...], "logprobs": [...]}],
     "prompt_logprobs": [null, -1.2, ...],
     "topk_prompt_logprobs": [null, [[tok, lp], ...], ...]}

Limits: SDK ≥0.25 insists on protobuf for ``SampleResponse``; that encoding
lives on the server (``api/proto``), not here. Newer optional request fields
(``target_prompt_logprobs``, ``prompt_alt_tokens_k``, ``record_stability_info``,
``topk_sample_logprobs``…) are declared so they validate; a server may refuse them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ._base import WireModel
from .bounded import Count64, Int64, Seed
from .limits import MAX_SAMPLES
from .model_input import ModelInput
from .tensors import TensorData

StopReason = Literal["length", "stop"]

TopkEntry = list[tuple[int, float]]
"""Up to k ``(token_id, logprob)`` pairs at one position."""


class SamplingParams(WireModel):
    max_tokens: Int64 | None = None
    seed: Seed | None = None
    stop: str | list[str] | list[int] | None = None
    """Stop strings or stop token ids. ``None`` keeps EOS stopping; ``[]`` disables it."""
    temperature: float = 1.0
    top_k: Int64 = -1
    """-1 = no limit."""
    top_p: float = 1.0


class CreateSamplingSessionRequest(WireModel):
    session_id: str
    sampling_session_seq_id: Count64
    base_model: str | None = None
    model_path: str | None = None
    """A ``tinker://…/sampler_weights/…`` (or ``weights``) path."""
    type: Literal["create_sampling_session"] = "create_sampling_session"


class CreateSamplingSessionResponse(WireModel):
    sampling_session_id: str
    type: Literal["create_sampling_session"] = "create_sampling_session"


class JoinSamplingSessionRequest(WireModel):
    sampling_session_id: str
    type: Literal["join_sampling_session"] = "join_sampling_session"


class JoinSamplingSessionResponse(WireModel):
    client_counter: int
    type: Literal["join_sampling_session"] = "join_sampling_session"


class SampleRequest(WireModel):
    """Body of ``POST /api/v1/asample``.

    Address either a sampling session (``sampling_session_id`` + ``seq_id``) or,
    as SDK 0.1 did, a ``model_path`` / ``base_model`` directly.
    """

    num_samples: int = Field(default=1, ge=1, le=MAX_SAMPLES)
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: Int64 | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: Count64 = 0
    topk_sample_logprobs: Count64 = 0
    target_prompt_logprobs: TensorData | None = None
    prompt_alt_tokens_k: Count64 = 0
    prompt_logprobs_last_n: Count64 | None = None
    record_stability_info: bool | None = None
    type: Literal["sample"] = "sample"

    @model_validator(mode="after")
    def _has_target(self) -> "SampleRequest":
        if self.sampling_session_id is None and self.model_path is None and self.base_model is None:
            raise ValueError("asample needs sampling_session_id, model_path or base_model")
        return self


class SampledSequence(WireModel):
    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None
    sequence_id: str | None = None
    """Session-scoped id (SDK ≥0.3x); optional in JSON."""
    topk_logprobs: list[TopkEntry | None] | None = None


class PromptAltTokens(WireModel):
    tokens: TensorData
    logprobs: TensorData


class SampleResponse(WireModel):
    sequences: list[SampledSequence]
    type: Literal["sample"] = "sample"
    prompt_logprobs: list[float | None] | None = None
    """One entry per prompt token; entry 0 is ``None``."""
    topk_prompt_logprobs: list[TopkEntry | None] | None = None
    prompt_cache_hit_tokens: int = 0
    target_prompt_logprobs: TensorData | None = None
    prompt_alt_tokens: PromptAltTokens | None = None
