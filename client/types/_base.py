"""Common pydantic base for every Loom wire type.

Role: one place for the model configuration shared by requests and responses.

Policy:
- ``extra="ignore"``: fields a newer SDK (or server) adds are dropped silently
  instead of failing validation, so old and new peers interoperate.
- ``protected_namespaces=()``: tinker's wire names start with ``model_``
  (``model_id``, ``model_input``, ``model_data``); pydantic must not warn.
- Known fields are still validated strictly enough to catch type errors.
- ``ser_json_inf_nan="constants"``: ``-inf`` logprobs and NaN survive
  ``model_dump_json`` as ``-Infinity``/``NaN`` (what Python's ``json`` writes
  and reads) instead of silently turning into ``null``.

Serialise with :func:`to_wire` (JSON mode, ``None`` dropped), which is what the
tinker SDK does for every JSON body.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class WireModel(BaseModel):
    """Base class of all wire types (lenient about unknown keys)."""

    model_config = ConfigDict(
        extra="ignore",
        protected_namespaces=(),
        populate_by_name=True,
        ser_json_inf_nan="constants",
    )

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready dict with ``None`` fields left out (tinker's body convention)."""
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)
