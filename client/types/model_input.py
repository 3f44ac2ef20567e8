"""Model inputs: :class:`ModelInput` and its chunks, plus :class:`Datum`.

Role: the prompt / training-sequence representation shared by training and
sampling requests. JSON shape (tinker)::

    {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}, ...]}

Chunk kinds, discriminated by ``type``:
- ``encoded_text``: token ids (the only kind Loom's text models accept).
- ``image`` (png/jpeg bytes, base64 in JSON) and ``image_asset_pointer`` (a ``data:`` or http(s) URL): accepted by
  vision-language base models, where an image takes ``expected_tokens`` positions; text models refuse them.
- ``dmel`` is declared so requests validate and the server can reject it with a clear error.
A chunk without ``type`` is read as ``encoded_text``.

``Datum`` = ``model_input`` + ``loss_fn_inputs`` (name -> :class:`TensorData`), plus optional provenance:
``model_input_spans`` / ``loss_fn_input_spans``, runs of :class:`ProvenanceSpan` tiling the input tokens and the
rows of ``target_tokens`` (SDK 0.38's ``Datum.with_provenance``; on the wire only in protobuf bodies, decoded by
``api/proto``). ``stable_reinforce`` needs them; other losses ignore them.
Raw lists, numpy arrays and torch tensors given for ``loss_fn_inputs`` are
converted; lists get tinker's per-key default dtype (``target_tokens`` int64,
the float keys float32).
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_serializer, field_validator, model_validator

from ._base import WireModel
from .bounded import Count64
from .limits import MAX_TENSOR_ELEMENTS
from .tensors import TensorData, TensorDtype, coerce_tensor


class EncodedTextChunk(WireModel):
    """A run of token ids."""

    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


def _b64_in(value: Any) -> Any:
    return base64.b64decode(value) if isinstance(value, str) else value


class ImageChunk(WireModel):
    """Raw image bytes (base64 in JSON). ``expected_tokens`` is advisory."""

    data: bytes
    format: Literal["png", "jpeg"]
    expected_tokens: Count64 | None = None
    type: Literal["image"] = "image"

    @field_validator("data", mode="before")
    @classmethod
    def _decode(cls, value: Any) -> Any:
        return _b64_in(value)

    @field_serializer("data", when_used="json")
    def _encode(self, value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")

    @property
    def length(self) -> int:
        if self.expected_tokens is None:
            raise ValueError("ImageChunk.expected_tokens must be set to compute the length")
        return self.expected_tokens


class ImageAssetPointerChunk(WireModel):
    """An image referenced by path/URL (not fetched by Loom)."""

    format: Literal["png", "jpeg"]
    location: str
    expected_tokens: Count64 | None = None
    type: Literal["image_asset_pointer"] = "image_asset_pointer"

    @property
    def length(self) -> int:
        if self.expected_tokens is None:
            raise ValueError("ImageAssetPointerChunk.expected_tokens must be set to compute the length")
        return self.expected_tokens


class DmelChunk(WireModel):
    """Serialized audio token tensor (tinker's Inkling models); never accepted by Loom."""

    dmel: bytes
    type: Literal["dmel"] = "dmel"

    @field_validator("dmel", mode="before")
    @classmethod
    def _decode(cls, value: Any) -> Any:
        return _b64_in(value)

    @field_serializer("dmel", when_used="json")
    def _encode(self, value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")

    @property
    def length(self) -> int:
        raise ValueError("the length of a dmel chunk is not known client-side")


def _chunk_kind(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("type", "encoded_text")
    return getattr(value, "type", "encoded_text")


ModelInputChunk = Annotated[
    Annotated[EncodedTextChunk, Tag("encoded_text")]
    | Annotated[ImageChunk, Tag("image")]
    | Annotated[ImageAssetPointerChunk, Tag("image_asset_pointer")]
    | Annotated[DmelChunk, Tag("dmel")],
    Discriminator(_chunk_kind),
]
"""One chunk of a :class:`ModelInput`, discriminated by ``type``."""


class ModelInput(WireModel):
    """A sequence of chunks; for text models, a list of token ids."""

    chunks: list[ModelInputChunk] = Field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: list[int]) -> "ModelInput":
        return cls(chunks=[EncodedTextChunk(tokens=list(tokens))])

    @classmethod
    def empty(cls) -> "ModelInput":
        return cls(chunks=[])

    def token_ids(self, image_token_id: int) -> list[int]:
        """Every position as a token id, an image chunk as ``expected_tokens`` copies of ``image_token_id`` (what a
        vision-language model sees: Qwen3-VL's ``<|image_pad|>``); raises ``ValueError`` for an image chunk
        without ``expected_tokens`` or a dmel chunk."""
        out: list[int] = []
        for chunk in self.chunks:
            if isinstance(chunk, EncodedTextChunk):
                out.extend(chunk.tokens)
            else:
                out.extend([image_token_id] * chunk.length)
        return out

    def to_ints(self) -> list[int]:
        """All token ids; raises ``ValueError`` if a chunk is not text."""
        out: list[int] = []
        for chunk in self.chunks:
            if not isinstance(chunk, EncodedTextChunk):
                raise ValueError(f"to_ints needs text-only input, found a {chunk.type!r} chunk")
            out.extend(chunk.tokens)
        return out

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: Any) -> "ModelInput":
        """A new ModelInput with ``chunk`` added at the end."""
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> "ModelInput":
        return self.append(EncodedTextChunk(tokens=[token]))


LOSS_FN_INPUT_DTYPES: dict[str, TensorDtype] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
    "sequence_ratio_mask": "float32",
}
"""Default dtype of raw-list ``loss_fn_inputs`` by key (as in tinker)."""


class ProvenanceSpan(WireModel):
    """A run of ``length`` consecutive datum positions claimed to be positions ``[offset, offset + length)`` of the
    prompt (``prompt_tokens``) or of the sampled tokens (``sampled_tokens``) of the sequence ``sequence_id``
    (``SampledSequence.sequence_id``): SDK 0.38's ``PromptProvenanceSpan`` / ``SampledProvenanceSpan``."""

    type: Literal["prompt_tokens", "sampled_tokens"]
    sequence_id: str = Field(min_length=1, max_length=256)
    offset: Count64 = 0
    length: Count64


class Datum(WireModel):
    """One training example: the input sequence and the loss's per-token tensors."""

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)
    model_input_spans: list[ProvenanceSpan] | None = Field(default=None, max_length=MAX_TENSOR_ELEMENTS)
    """Provenance of the input tokens: runs whose lengths sum to ``model_input``'s length."""
    loss_fn_input_spans: list[ProvenanceSpan] | None = Field(default=None, max_length=MAX_TENSOR_ELEMENTS)
    """Provenance of the loss rows: runs whose lengths sum to ``target_tokens``' first dimension."""

    @model_validator(mode="before")
    @classmethod
    def _convert_inputs(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("loss_fn_inputs"), dict):
            converted = {}
            for key, value in data["loss_fn_inputs"].items():
                dtype = LOSS_FN_INPUT_DTYPES.get(key) if isinstance(value, (list, tuple)) else None
                converted[key] = coerce_tensor(value, dtype=dtype)
            data = {**data, "loss_fn_inputs": converted}
        return data
