"""Annotated number types that carry the bounds of `limits.py` into the wire types.

Role: one definition per kind of number (64-bit id, seq_id, seed, TTL, learning rate, tensor dimension), so each
wire field declares its bound by its type: pydantic enforces it in the SDK and at the API door (a 400 naming the
field), and the OpenAPI schema publishes it (`minimum`/`maximum`). Free-form JSON (`JsonObject`, `ShallowJson`)
is bounded in depth, so no value is too deep to store or serialise.

Limits: only bounds that do not depend on the base model live here; vocabulary and context checks are in
`validation.py`, which needs the model's sizes.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field

from .limits import INT64_MAX, MAX_JSON_DEPTH, MAX_LEARNING_RATE, MAX_SEED, MAX_TTL_SECONDS, MIN_TTL_SECONDS

INT64_MIN = -INT64_MAX - 1

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
"""Any value a signed 64-bit integer holds (what the database and the engine's tensors store)."""

Count64 = Annotated[int, Field(ge=0, le=INT64_MAX)]
"""A non-negative 64-bit integer: ids, sequence numbers, offsets, dimensions."""

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
"""A random seed (LoRA initialisation, sampling)."""

TtlSeconds = Annotated[int, Field(ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS)]
"""A checkpoint time-to-live in seconds."""

LearningRate = Annotated[float, Field(ge=0.0, le=MAX_LEARNING_RATE, allow_inf_nan=False)]
"""An Adam learning rate."""


def _shallow(value: Any) -> Any:
    """`value` itself if it nests at most `MAX_JSON_DEPTH` containers deep (checked without recursion)."""
    level = [value]
    for _ in range(MAX_JSON_DEPTH + 1):
        level = [
            child
            for item in level
            if isinstance(item, (dict, list, tuple))
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return value
    raise ValueError(f"JSON nests more than {MAX_JSON_DEPTH} levels deep")


ShallowJson = Annotated[Any, AfterValidator(_shallow)]
"""Any JSON value nesting at most `MAX_JSON_DEPTH` levels."""

JsonObject = Annotated[dict[str, Any], AfterValidator(_shallow)]
"""A free-form JSON object nesting at most `MAX_JSON_DEPTH` levels."""
