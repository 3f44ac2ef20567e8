"""JSON for database columns that keeps NaN and ±infinity.

A diverged run produces NaN losses and logprobs; they are real results and must survive the database. Strict
JSON (and PostgreSQL's `json` type) has no NaN, so non-finite floats are stored as `{"$float": "nan"}` (or
`"inf"`, `"-inf"`) and turned back into floats when read.

Limits: the marker key `$float` is reserved inside stored JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any

_MARK = "$float"


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {_MARK: repr(value)}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and _MARK in obj:
        return float(obj[_MARK])
    return obj


def dumps(value: Any) -> str:
    return json.dumps(_encode(value), allow_nan=False)


def loads(text: str) -> Any:
    return json.loads(text, object_hook=_decode)
