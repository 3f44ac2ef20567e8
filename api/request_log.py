"""The operator's request logs: one access line per request and one error line per failed request, as JSON lines.

Each record of the `loom.access` and `loom.errors` loggers carries its fields (`record.fields`), written by
`JsonLines` as one JSON object per line (`jq`, Loki and Elasticsearch read them as they are):

    loom.access  INFO     {"ts", "level", "logger", "request_id", "tenant", "method", "route", "path", "status",
                           "ms", "request_bytes", "response_bytes", "client", "user_agent"}
    loom.errors  WARNING  (a 4xx) / ERROR (a 5xx or an exception): {"ts", "level", "logger", "request_id", "tenant",
                           "method", "route", "path", "status", "code", "reason"}, plus "traceback" for an exception

`tenant` is the owner of the API key the request authenticated with (recorded by `api/deps.py::tenant`, so nothing
authenticates twice), `-` for a request that did not; `route` is the matched route's template (`-` when none
matched), `path` the raw path without its query string. `code` and `reason` are the `error.code` and
`error.message` of the JSON error body sent to the client. No header but the user agent is logged, so API keys,
Hugging Face tokens and cookies never reach a log.

`configure_request_logs(path)`, called by `loom serve`, writes both loggers to stderr whatever the server's
`--log-level`, and also appends them to `path` (the `access_log` setting) when given. Without it (tests, embedding
apps) the records propagate to the root logger as short text lines.

Limits: a `reason` is read from at most `ERROR_BODY_LIMIT` bytes of the body; the file handler reopens a file
rotated away (logrotate) but does not rotate itself.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

access_log = logging.getLogger("loom.access")
errors_log = logging.getLogger("loom.errors")
for _logger in (access_log, errors_log):
    _logger.setLevel(logging.INFO)  # whatever the root logger's level: an operator always gets these lines

ERROR_BODY_LIMIT = 16 << 10
"""Bytes of an error response kept to read its code and reason from."""


class JsonLines(logging.Formatter):
    """A record as one JSON object: time, level, logger and its `fields` (its message when it has none)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            **getattr(record, "fields", {"message": record.getMessage()}),
        }
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def error_of(body: bytes) -> tuple[str, str]:
    """(code, reason) of an error body: our JSON error shape's, else `-` and the start of the body as text."""
    try:
        error = json.loads(body)["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return "-", body[:500].decode("utf-8", "replace")


def configure_request_logs(path: Path | None) -> None:
    """Send the access and error lines, as JSON lines, to stderr and (when `path` is given) appended to `path`."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.WatchedFileHandler(path, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(JsonLines())
    for logger in (access_log, errors_log):
        logger.handlers = list(handlers)
        logger.propagate = False
