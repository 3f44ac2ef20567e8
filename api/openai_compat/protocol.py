"""OpenAI request and response shapes for `/v1/chat/completions`, `/v1/completions` and `/v1/models`.

Requests accept the fields the official `openai` client sends and validate the ones Loom honours; unknown
fields are ignored (newer clients add some). Limits enforced here: `n` ≤ 8, `max_tokens` ≤ 4096 (and the model's
context, checked by the worker), `top_logprobs` ≤ 20, at most 4 stop strings, temperature in [0, 2], `seed` in
[0, MAX_SEED], prompt token ids non-negative 64-bit integers, and a message content part's `text` a string.
`image_url` parts (a `data:` URL, or http(s) from an allowed host) go to vision-language models only.

Limits: no `response_format`, `logit_bias`, `presence_penalty`/`frequency_penalty` (accepted only at 0),
`suffix` or `echo`; `tool_choice` is accepted and ignored (the worker parses whatever tool calls the model
makes, in its chat format).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loom.types.bounded import Count64, JsonObject, Seed, ShallowJson

MAX_N = 8
MAX_TOKENS = 4096
MAX_TOP_LOGPROBS = 20


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Sampling(_Lenient):
    model: str
    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("penalties are not supported (only 0)")
        return value


class ImageUrl(_Lenient):
    url: str = Field(min_length=1)
    detail: str | None = None
    """Accepted and ignored: images are always tiled at the model's own resolution range."""


class ContentPart(_Lenient):
    """One part of a message's content: `text`, or `image_url` for a vision model (the API fetches, checks and
    counts the image, `api/images.py`); the worker refuses other kinds by name."""

    type: str
    text: str | None = None
    image_url: ImageUrl | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[JsonObject] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[JsonObject] | None = None
    tool_choice: ShallowJson = None

    @property
    def token_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256


class CompletionRequest(_Sampling):
    prompt: str | list[Count64]
    max_tokens: int = Field(default=16, ge=1, le=MAX_TOKENS)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[Count64]) -> str | list[Count64]:
        if not value:
            raise ValueError("prompt must not be empty")
        return value

    @property
    def token_limit(self) -> int:
        return self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int | None = None
    """For base models: the catalogue's context length (as vLLM reports it)."""
