"""A mixed forward/backward in which one request's failure fails that request alone.

`isolated_forward_backward` snapshots the accumulated LoRA gradients of every adapter in the pass (they are
small), then runs the whole pass. If it raises, the gradients are put back, each request is rerun alone (its
gradient contribution undone again afterwards) to find the offenders, and the survivors run together once more
from the snapshot, so their results and gradients are exactly those of a clean pass without the offenders. A
request that fails alone because its loss failed on its own inputs (`LossError`) is the request's fault; any
other failure alone (or a failure of the survivors together, e.g. memory) is the server's.

Limits: finding offenders costs one pass per request plus one for the survivors (failures are rare). Every
adapter's `.grad` ends as it was before the pass plus the contributions of the requests that succeeded, so no
run's state is lost, the failed requests' runs included. The model must be deterministic enough that a request
that passed alone also passes among the survivors; if not, the survivors fail as server errors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from worker.models.loader import LoadedModel
from worker.trainer import ItemResult, LossError, WorkItem, run_forward_backward

log = logging.getLogger(__name__)


@dataclass
class ItemFailure:
    """Why one request of a pass failed; `own`: its own inputs were at fault (a `user` error)."""

    error: Exception
    own: bool


class GradSnapshot:
    """Copies of the `.grad` of every LoRA factor of some adapters, to put back after a failed pass."""

    def __init__(self, lm: LoadedModel, slots: Iterable[int]) -> None:
        params = [p for slot in sorted(set(slots)) for p in lm.router.adapters[slot].parameters()]
        self.saved = [(p, None if p.grad is None else p.grad.detach().clone()) for p in params]

    def restore(self) -> None:
        for p, grad in self.saved:  # a copy again: backward accumulates into `.grad` in place
            p.grad = None if grad is None else grad.clone()


def isolated_forward_backward(
    lm: LoadedModel, items: Sequence[WorkItem], token_budget: int
) -> list[ItemResult | ItemFailure]:
    """`run_forward_backward` over `items`, with each request's failure confined to that request."""
    snapshot = GradSnapshot(lm, (item.slot for item in items))
    try:
        return list(run_forward_backward(lm, items, token_budget))
    except Exception:
        log.exception("mixed forward/backward over %d requests failed: rerunning each alone", len(items))
    snapshot.restore()
    outcomes: list[ItemResult | ItemFailure | None] = []
    for item in items:
        outcomes.append(_failure_alone(lm, item, token_budget))
        snapshot.restore()
    survivors = [k for k, outcome in enumerate(outcomes) if outcome is None]
    if survivors:
        try:
            results: Sequence[ItemResult | ItemFailure] = run_forward_backward(
                lm, [items[k] for k in survivors], token_budget
            )
        except Exception as exc:
            log.exception("the %d requests that passed alone failed together", len(survivors))
            snapshot.restore()
            results = [ItemFailure(exc, own=False)] * len(survivors)
        for k, result in zip(survivors, results):
            outcomes[k] = result
    return [outcome for outcome in outcomes if outcome is not None]


def _failure_alone(lm: LoadedModel, item: WorkItem, token_budget: int) -> ItemFailure | None:
    """Run one request by itself; None if it passes (its gradient is then undone by the caller)."""
    try:
        run_forward_backward(lm, [item], token_budget)
    except LossError as exc:
        return ItemFailure(exc, own=True)
    except Exception as exc:
        log.exception("a request of the failed pass also fails alone")
        return ItemFailure(exc, own=False)
    return None
