"""One mixed-adapter forward/backward over every tenant's pending `forward_backward` work, in memory-bounded
micro-batches.

Each work item (one request: a run's adapter slot, its datums, loss and config) contributes one row per datum.
Rows are sorted by length and cut into micro-batches of at most `token_budget` padded tokens (rows × longest row
in it); inside a micro-batch rows are grouped by adapter so each LoRA sees a contiguous slice, right-padded to
the micro-batch's longest sequence (causal attention means padding after a sequence never changes its logits).
Each micro-batch runs forward and back-propagates the summed loss of its non-forward-only rows, so gradients
accumulate in the adapters' `.grad`; because each adapter's factors only touch its own rows, every run's
gradient equals the gradient of that run computed alone, in one pass (up to float reassociation).

A vision model's rows carry their images: the micro-batch's images go through the vision tower together (each
image attends only to itself) and fill their rows' image-token runs, so a vision row's result does not depend on
its neighbours either.

Limits: sequences are padded, not packed; a micro-batch's full (rows × length × vocab) logits are materialised,
so peak memory grows with `token_budget`; a single row longer than the budget still runs (alone). A failure
leaves the gradients of the micro-batches already run accumulated: the caller restores them
(`worker/fault_isolation.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from contract.settings import DEFAULT_TRAIN_TOKEN_BUDGET
from worker.custom_loss import CustomLoss, Metrics, reduce_metrics
from worker.losses import LOSSES
from worker.models.loader import LoadedModel
from worker.models.vision_inputs import VisionImage, patch_count, vision_kwargs


class LossError(ValueError):
    """The loss function failed on one request's own inputs."""


@dataclass
class TrainDatum:
    tokens: list[int]
    inputs: dict[str, torch.Tensor]
    images: list[VisionImage] = field(default_factory=list)
    """A vision model's images, in order; `tokens` holds each as its run of image tokens."""


@dataclass
class WorkItem:
    slot: int
    data: list[TrainDatum]
    loss_fn: str
    loss_fn_config: Mapping[str, float | str] = field(default_factory=dict)
    forward_only: bool = False
    custom_loss: CustomLoss | None = None
    """The stored graph a `custom` request runs in place of a built-in loss."""


@dataclass
class ItemResult:
    logprobs: list[torch.Tensor]
    """Per datum: target-token logprobs, shape (N,) or (N, K)."""
    losses: list[float]
    """Per datum loss value."""
    metrics: Metrics = field(default_factory=dict)
    """A custom loss's own metrics, reduced over the datums (`reduce_metrics`)."""

    @property
    def loss_sum(self) -> float:
        return float(sum(self.losses))


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for logits (N, V) and targets (N,) or (N, K)."""
    lse = torch.logsumexp(logits, dim=-1)
    if targets.dim() == 1:
        return logits.gather(-1, targets[:, None])[:, 0] - lse
    return logits.gather(-1, targets) - lse[:, None]


def micro_batches(lengths: Sequence[int], slots: Sequence[int], token_budget: int) -> list[list[int]]:
    """Split rows (their lengths and adapter slots) into micro-batches of at most `token_budget` padded tokens
    (rows × longest row). Rows are taken longest first so padding stays small; inside a micro-batch they are
    ordered by slot (stable), so each adapter's rows are contiguous as the LoRA router requires. A row longer
    than the budget gets a micro-batch of its own."""
    batches: list[list[int]] = []
    current: list[int] = []
    for r in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        if current and (len(current) + 1) * lengths[current[0]] > token_budget:
            batches.append(current)
            current = []
        current.append(r)
    if current:
        batches.append(current)
    return [sorted(batch, key=lambda r: (slots[r], r)) for batch in batches]


def run_forward_backward(
    lm: LoadedModel, items: Sequence[WorkItem], token_budget: int = DEFAULT_TRAIN_TOKEN_BUDGET
) -> list[ItemResult]:
    """Run all items, in micro-batches of at most `token_budget` padded tokens; accumulate gradients into each
    adapter's `.grad` for non-forward-only items. A loss that fails on a request's inputs raises `LossError`."""
    rows: list[tuple[int, int]] = [(i, j) for i, item in enumerate(items) for j in range(len(item.data))]
    lengths = [len(items[i].data[j].tokens) for i, j in rows]
    slots = [items[i].slot for i, _ in rows]
    logprobs: dict[tuple[int, int], torch.Tensor] = {}
    losses: dict[tuple[int, int], float] = {}
    metrics: dict[tuple[int, int], Metrics] = {}
    for batch in micro_batches(lengths, slots, token_budget):
        _run_micro_batch(lm, items, [rows[r] for r in batch], logprobs, losses, metrics)
    return [
        ItemResult(
            [logprobs[i, j] for j in range(len(item.data))],
            [losses[i, j] for j in range(len(item.data))],
            reduce_metrics([metrics[i, j] for j in range(len(item.data))]),
        )
        for i, item in enumerate(items)
    ]


def _run_micro_batch(
    lm: LoadedModel,
    items: Sequence[WorkItem],
    rows: list[tuple[int, int]],
    logprobs: dict[tuple[int, int], torch.Tensor],
    losses: dict[tuple[int, int], float],
    metrics: dict[tuple[int, int], Metrics],
) -> None:
    """Forward (and backward, if any row trains) over `rows` (item, datum), padded to the longest; writes each
    row's target logprobs, loss and custom metrics into `logprobs` / `losses` / `metrics`."""
    max_len = max(len(items[i].data[j].tokens) for i, j in rows)
    pad_id = 0
    input_ids = torch.full((len(rows), max_len), pad_id, dtype=torch.long)
    for r, (i, j) in enumerate(rows):
        toks = items[i].data[j].tokens
        input_ids[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    needs_grad = any(not items[i].forward_only for i, _ in rows)
    extra = {}
    if lm.images is not None:  # a vision model: the rows' images, in row order, and which positions hold them
        extra = vision_kwargs(input_ids, [img for i, j in rows for img in items[i].data[j].images], lm.images.spec)
    patches = [patch_count(items[i].data[j].images) for i, j in rows]
    with torch.set_grad_enabled(needs_grad), lm.router.route([items[i].slot for i, _ in rows], patches):
        logits = lm.model(input_ids=input_ids, use_cache=False, **extra).logits.float()
        # 1-D targets of every row in one gather: slicing the (rows, length, vocab) logits per datum would make
        # the backward pass materialise a full-size zero gradient per datum.
        flat_targets = torch.zeros_like(input_ids)
        for r, (i, j) in enumerate(rows):
            targets = items[i].data[j].inputs["target_tokens"]
            if targets.dim() == 1:
                flat_targets[r, : targets.shape[0]] = targets
        token_lp = logits.gather(-1, flat_targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
        total = None
        for r, (i, j) in enumerate(rows):
            item, datum = items[i], items[i].data[j]
            n = len(datum.tokens)
            targets = datum.inputs["target_tokens"]
            lp = token_lp[r, :n] if targets.dim() == 1 else _target_logprobs(logits[r, :n], targets)
            try:
                if item.custom_loss is not None:
                    loss, metrics[i, j] = item.custom_loss(lp, datum.inputs)
                else:
                    loss, metrics[i, j] = LOSSES[item.loss_fn](lp, datum.inputs, item.loss_fn_config), {}
            except Exception as exc:
                what = item.loss_fn if item.custom_loss is None else f"custom loss {item.custom_loss.name!r}"
                raise LossError(f"{what} failed on datum {j}: {type(exc).__name__}: {exc}") from exc
            logprobs[i, j] = lp.detach()
            losses[i, j] = float(loss.detach())
            if not item.forward_only:
                total = loss if total is None else total + loss
        if total is not None:
            total.backward()
