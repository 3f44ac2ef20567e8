"""The ledger the SDK- and CLI-surface contract tests keep: which public method or command answered, which was refused
on purpose, and which failed (with the HTTP status and route, so a reader sees at once which endpoint is missing).

`Ledger.call` runs one step and records its outcome instead of stopping at the first failure, so one run of a
contract test lists every method that does not work. A step is refused only when its name is in the test's
allow-list of deliberate refusals *and* the error matches that refusal (a clear 4xx other than 404, or the exact
client-side refusal the SDK raises); anything else, 404s and 5xx included, is a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import tinker

T = TypeVar("T")


class Blocked(Exception):
    """A step could not run because an earlier one it needs failed (recorded as a failure of this step too)."""


def need(value: T | None, producer: str) -> T:
    """`value`, which the step named `producer` made; raises Blocked when that step failed."""
    if value is None:
        raise Blocked(f"not run: it needs {producer}, which failed")
    return value


@dataclass(frozen=True)
class Refusal:
    """A feature Loom refuses on purpose: why, and the error a refusal must look like."""

    reason: str
    matches: Callable[[BaseException], bool]


def refused_with_4xx(error: BaseException) -> bool:
    """A clear client error that is not "no such route" (404)."""
    return isinstance(error, tinker.APIStatusError) and 400 <= error.status_code < 500 and error.status_code != 404


def describe(error: BaseException) -> str:
    """One line naming the status and route of an HTTP error, or the error's type and message."""
    if isinstance(error, tinker.APIStatusError):
        request = error.response.request
        body = error.body if isinstance(error.body, dict) else {}
        message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else None
        return f"HTTP {error.status_code} {request.method} {request.url.path}: {message or error.message}"[:400]
    if isinstance(error, tinker.RequestFailedError):
        return f"request {error.request_id} failed ({error.category}): {error.message}"[:400]
    return f"{type(error).__name__}: {error}"[:400]


@dataclass
class Outcome:
    status: Literal["ok", "refused", "failed"]
    detail: str = ""
    variant: str = ""
    """Which of several calls of one method this was (e.g. the loss function), for the report."""


@dataclass
class Ledger:
    refusals: dict[str, Refusal]
    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)

    def call(self, name: str, step: Callable[[], T], variant: str = "") -> T | None:
        """Run `step` (the call and its checks) for method or command `name`; None when it did not succeed."""
        try:
            value = step()
        except Exception as error:  # every failure is recorded and reported at the end
            refusal = self.refusals.get(name)
            status: Literal["refused", "failed"] = "refused" if refusal and refusal.matches(error) else "failed"
            self.outcomes.setdefault(name, []).append(Outcome(status, describe(error), variant))
            return None
        self.outcomes.setdefault(name, []).append(Outcome("ok", variant=variant))
        return value

    def lines(self, status: Literal["ok", "refused", "failed"]) -> list[str]:
        return [
            f"{name}{f' [{outcome.variant}]' if outcome.variant else ''}: {outcome.detail}"
            for name, outcomes in sorted(self.outcomes.items())
            for outcome in outcomes
            if outcome.status == status
        ]

    def report(self) -> str:
        """Every failure, one per line, then the deliberate refusals seen."""
        return "\n".join(["failed:", *self.lines("failed"), "refused on purpose:", *self.lines("refused")])
