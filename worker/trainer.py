"""One mixed-adapter forward/backward over every tenant's pending `forward_backward` work.

Each work item (one request: a run's adapter slot, its datums, loss and config) contributes rows; rows are
grouped by adapter so each LoRA sees a contiguous slice, right-padded to the longest sequence (causal attention
means padding after a sequence never changes its logits). The summed loss of all non-forward-only items is
back-propagated once; because each adapter's factors only touch its own rows, every run's gradient equals the
gradient of that run computed alone (up to float reassociation in batched matmuls).

Limits: sequences are padded, not packed; the full (rows × length × vocab) logits are materialised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from worker.losses import LOSSES
from worker.models.loader import LoadedModel


@dataclass
class TrainDatum:
    tokens: list[int]
    inputs: dict[str, torch.Tensor]


@dataclass
class WorkItem:
    slot: int
    data: list[TrainDatum]
    loss_fn: str
    loss_fn_config: Mapping[str, float] = field(default_factory=dict)
    forward_only: bool = False


@dataclass
class ItemResult:
    logprobs: list[torch.Tensor]
    """Per datum: target-token logprobs, shape (N,) or (N, K)."""
    losses: list[float]
    """Per datum loss value."""

    @property
    def loss_sum(self) -> float:
        return float(sum(self.losses))


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for logits (N, V) and targets (N,) or (N, K)."""
    lse = torch.logsumexp(logits, dim=-1)
    if targets.dim() == 1:
        return logits.gather(-1, targets[:, None])[:, 0] - lse
    return logits.gather(-1, targets) - lse[:, None]


def run_forward_backward(lm: LoadedModel, items: Sequence[WorkItem]) -> list[ItemResult]:
    """Run all items in one pass; accumulate gradients into each adapter's `.grad` for non-forward-only items."""
    order = sorted(range(len(items)), key=lambda i: items[i].slot)
    rows: list[tuple[int, int]] = [(i, j) for i in order for j in range(len(items[i].data))]
    if not rows:
        return [ItemResult([], []) for _ in items]
    max_len = max(len(items[i].data[j].tokens) for i, j in rows)
    pad_id = 0
    input_ids = torch.full((len(rows), max_len), pad_id, dtype=torch.long)
    for r, (i, j) in enumerate(rows):
        toks = items[i].data[j].tokens
        input_ids[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    needs_grad = any(not it.forward_only for it in items)
    results = [ItemResult([], []) for _ in items]
    with torch.set_grad_enabled(needs_grad), lm.router.route([items[i].slot for i, _ in rows]):
        logits = lm.model(input_ids=input_ids, use_cache=False).logits.float()
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
            loss = LOSSES[item.loss_fn](lp, datum.inputs, item.loss_fn_config)
            results[i].logprobs.append(lp.detach())
            results[i].losses.append(float(loss.detach()))
            if not item.forward_only:
                total = loss if total is None else total + loss
        if total is not None:
            total.backward()
    return results
