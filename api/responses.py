"""The default JSON response: like Starlette's, but NaN and ±Infinity pass through (as Python's json writes them).

A diverged run's losses are NaN; refusing to serialise them would turn a user's result into a 500. Python's
`json`, httpx and the Tinker SDK read these tokens back.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse


class NonFiniteJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=True, separators=(",", ":")).encode("utf-8")
