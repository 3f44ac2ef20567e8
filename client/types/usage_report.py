"""Usage per API key and per training run, hour by hour (`GET /api/v1/usage/report`, JSON or CSV): what each key
and each run cost in tokens and storage, the figure a tenant divides its bill by."""

from __future__ import annotations

from datetime import datetime

from ._base import WireModel


class UsageReportRow(WireModel):
    hour: datetime
    """Start of the UTC hour the requests finished in (or the checkpoints were stored in); with `per=window`, the
    window's start (the row totals the whole window)."""
    api_key_id: str | None = None
    """The key that submitted the requests; absent for storage, and for requests from before keys were recorded."""
    api_key_prefix: str | None = None
    api_key_name: str | None = None
    run_id: str | None = None
    """The training run: its own ops, samples of its checkpoints (by the stored weights they read, OpenAI requests
    included), its stored checkpoints. Absent: samples of the base model or of no checkpoint of the tenant."""
    base_model: str
    requests: int = 0
    """Finished requests (failed ones count nothing)."""
    tokens_trained: int = 0
    """Tokens of finished forward_backward and forward requests."""
    tokens_prompt: int = 0
    """Prompt tokens of finished samples (prefix-cache hits included)."""
    tokens_prompt_cached: int = 0
    """Of those, the ones the worker's prefix cache served."""
    tokens_generated: int = 0
    checkpoints_saved: int = 0
    storage_gigabyte_hours: float = 0.0


class UsageReportResponse(WireModel):
    start: datetime
    end: datetime
    rows: list[UsageReportRow]
    """By hour, then key, then run."""


USAGE_REPORT_COLUMNS = tuple(UsageReportRow.model_fields)
"""The CSV export's columns, in order (the JSON rows' fields)."""
