"""One mixed-adapter forward/backward over every tenant's pending `forward_backward` work, in memory-bounded
micro-batches.

Each work item (one request: a run's adapter slot, its datums, loss and config) contributes one row per datum.
Rows are sorted by length and cut into micro-batches of at most `token_budget` tokens; inside a micro-batch rows
are grouped by adapter so each LoRA sees a contiguous run. For a text model the budget counts real tokens, and a
micro-batch whose padding would exceed `PACK_ABOVE_PADDING` of its padded tokens is packed: its sequences sit back
to back in one row with position ids restarting at each and attention computed sequence by sequence
(`worker/models/packed_attention.py`), so no padding token is computed and attention costs what the sequences'
own would. Otherwise rows are right-padded to the micro-batch's longest (causal attention means padding after a
sequence never changes its logits); with `pack_sequences` off, for vision rows and a ZeRO-3 base the budget then
counts rows × longest row.
Each micro-batch runs forward and back-propagates the summed loss of its non-forward-only rows, so gradients
accumulate in the adapters' `.grad`; because each adapter's factors only touch its own tokens, every run's
gradient equals the gradient of that run computed alone, in one pass (up to float reassociation).

A vision model's rows carry their images: the micro-batch's images go through the vision tower together (each
image attends only to itself) and fill their rows' image-token runs, so a vision row's result does not depend on
its neighbours either.

Target logprobs come from the final hidden states of the real tokens, a chunk of tokens at a time
(`gpu_kernels/chunked_logprobs.py`), so no (tokens × vocab) logits block is ever held; a micro-batch of at least
`checkpoint_tokens` tokens runs with activation checkpointing (`worker/activation_checkpointing.py`). All three
are the model's runtime settings (`worker/models/runtime.py`). Inputs go to the model's device; results stay there.

Limits: a packed micro-batch still builds transformers' dense block-diagonal mask (tokens² booleans, 4 MiB at the
default budget of 2,048), which the packed attention does not read; a text micro-batch padded under the packing
threshold may hold up to 1/0.9 of the budget in padded tokens; a ZeRO-3 base materialises each micro-batch's logits
(its output projection is gathered only inside its own call); a single row longer than the budget still runs
(alone). A failure leaves the gradients of the micro-batches already run accumulated: the caller restores them
(`worker/fault_isolation.py`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from contract.settings import DEFAULT_TRAIN_TOKEN_BUDGET
from gpu_kernels.chunked_logprobs import target_logprobs
from gpu_kernels.lora_reference import lora_delta, lora_down
from worker.activation_checkpointing import activation_checkpointing
from worker.custom_loss import CustomLoss, Metrics, reduce_metrics
from worker.lora.layers import MultiLoraLinear
from worker.losses import LOSSES
from worker.models.loader import LoadedModel
from worker.models.packed_attention import boundaries
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


def micro_batches(
    lengths: Sequence[int], slots: Sequence[int], token_budget: int, packed: bool = False
) -> list[list[int]]:
    """Split rows (their lengths and adapter slots) into micro-batches of at most `token_budget` tokens: padded,
    rows × longest row; `packed`, the sum of their lengths. Rows are taken longest first so padding stays small;
    inside a micro-batch they are ordered by slot (stable), so each adapter's rows are contiguous as the LoRA
    router requires. A row longer than the budget gets a micro-batch of its own."""
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for r in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        cost = used + lengths[r] if packed else (len(current) + 1) * lengths[current[0] if current else r]
        if current and cost > token_budget:
            batches.append(current)
            current, used = [], 0
        current.append(r)
        used += lengths[r]
    if current:
        batches.append(current)
    return [sorted(batch, key=lambda r: (slots[r], r)) for batch in batches]


def run_forward_backward(
    lm: LoadedModel, items: Sequence[WorkItem], token_budget: int = DEFAULT_TRAIN_TOKEN_BUDGET
) -> list[ItemResult]:
    """Run all items, in micro-batches of at most `token_budget` tokens (packed where `_packs(lm)`, else padded);
    accumulate gradients into each adapter's `.grad` for non-forward-only items. A loss that fails on a request's
    inputs raises `LossError`."""
    rows: list[tuple[int, int]] = [(i, j) for i, item in enumerate(items) for j in range(len(item.data))]
    lengths = [len(items[i].data[j].tokens) for i, j in rows]
    slots = [items[i].slot for i, _ in rows]
    logprobs: dict[tuple[int, int], torch.Tensor] = {}
    losses: dict[tuple[int, int], float] = {}
    metrics: dict[tuple[int, int], Metrics] = {}
    packs = _packs(lm)
    for batch in micro_batches(lengths, slots, token_budget, packs):
        packed = packs and _padding_share([lengths[r] for r in batch]) > PACK_ABOVE_PADDING
        _run_micro_batch(lm, items, [rows[r] for r in batch], packed, logprobs, losses, metrics)
    return [
        ItemResult(
            [logprobs[i, j] for j in range(len(item.data))],
            [losses[i, j] for j in range(len(item.data))],
            reduce_metrics([metrics[i, j] for j in range(len(item.data))]),
        )
        for i, item in enumerate(items)
    ]


PACK_ABOVE_PADDING = 0.1
"""A micro-batch is packed when padding would make more than this share of its padded tokens: below it, padded
rows cost about the same in the linear layers and attend in one batched call instead of one call per sequence."""


def _padding_share(lengths: list[int]) -> float:
    return 1 - sum(lengths) / (len(lengths) * max(lengths))


def _packs(lm: LoadedModel) -> bool:
    """Whether micro-batches pack their sequences: a text model (image rows need their own row for the vision
    tower's placement) whose output projection is whole (not ZeRO-3 partitioned), unless the runtime says no."""
    return lm.runtime.pack_sequences and lm.images is None and not _head_partitioned(lm)


def _run_micro_batch(
    lm: LoadedModel,
    items: Sequence[WorkItem],
    rows: list[tuple[int, int]],
    packed: bool,
    logprobs: dict[tuple[int, int], torch.Tensor],
    losses: dict[tuple[int, int], float],
    metrics: dict[tuple[int, int], Metrics],
) -> None:
    """Forward (and backward, if any row trains) over `rows` (item, datum), packed into one row (each sequence
    attends only to itself: restarting position ids, which transformers turns into a block-diagonal causal mask,
    and the sequences' boundaries, which `worker/models/packed_attention.py` attends within) or padded to the
    longest; writes each row's target logprobs, loss and custom metrics into `logprobs` / `losses` /
    `metrics`."""
    data = [items[i].data[j] for i, j in rows]
    lengths = [len(datum.tokens) for datum in data]
    slots = [items[i].slot for i, _ in rows]
    needs_grad = any(not items[i].forward_only for i, _ in rows)
    model_args: dict[str, torch.Tensor] = {}
    if packed:
        input_ids = torch.tensor([[t for datum in data for t in datum.tokens]], dtype=torch.long)
        model_args["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None].to(lm.device)
        model_args |= boundaries(lengths, lm.device)
        starts = list(itertools.accumulate(lengths, initial=0))[:-1]
        route = lm.router.route(slots, packed_lengths=lengths)
    else:
        input_ids = torch.zeros((len(rows), max(lengths)), dtype=torch.long)
        for r, datum in enumerate(data):
            input_ids[r, : lengths[r]] = torch.tensor(datum.tokens, dtype=torch.long)
        starts = [r * input_ids.shape[1] for r in range(len(rows))]
        route = lm.router.route(slots, [patch_count(datum.images) for datum in data])
    input_ids = input_ids.to(lm.device)
    if lm.images is not None:  # a vision model: the rows' images, in row order, and which positions hold them
        model_args |= vision_kwargs(input_ids, [img for datum in data for img in datum.images], lm.images.spec)
    checkpointed = needs_grad and 0 < lm.runtime.checkpoint_tokens <= input_ids.numel()
    with torch.set_grad_enabled(needs_grad), route, activation_checkpointing(lm.model, checkpointed):
        inputs = [{k: v.to(lm.device) for k, v in datum.inputs.items()} for datum in data]
        targets = [row["target_tokens"] for row in inputs]
        if _head_partitioned(lm):  # ZeRO-3: the projection is whole only inside the model's own call
            logits = lm.model(input_ids=input_ids, use_cache=False, **model_args).logits
            states, score = logits.reshape(-1, logits.shape[-1]), _score_logits
        else:
            hidden = lm.model.model(input_ids=input_ids, use_cache=False, **model_args).last_hidden_state
            states, score = hidden.reshape(-1, hidden.shape[-1]), _hidden_scorer(lm)
        row_lps = _row_logprobs(states, starts, lengths, slots, targets, score)
        total = None
        for r, (i, j) in enumerate(rows):
            item, lp = items[i], row_lps[r]
            try:
                if item.custom_loss is not None:
                    loss, metrics[i, j] = item.custom_loss(lp, inputs[r])
                else:
                    loss, metrics[i, j] = LOSSES[item.loss_fn](lp, inputs[r], item.loss_fn_config), {}
            except Exception as exc:
                what = item.loss_fn if item.custom_loss is None else f"custom loss {item.custom_loss.name!r}"
                raise LossError(f"{what} failed on datum {j}: {type(exc).__name__}: {exc}") from exc
            logprobs[i, j] = lp.detach()
            losses[i, j] = float(loss.detach())
            if not item.forward_only:
                total = loss if total is None else total + loss
        if total is not None:
            total.backward()


def _frozen_head(lm: LoadedModel) -> torch.nn.Module:
    """The model's frozen output projection (under its `MultiLoraLinear`, when the head has LoRA)."""
    head = lm.model.get_output_embeddings()
    return getattr(head, "base", head)


def _head_partitioned(lm: LoadedModel) -> bool:
    """A ZeRO-3 partitioned output projection (DeepSpeed marks its parameters with `ds_id`)."""
    return hasattr(_frozen_head(lm).weight, "ds_id")


Scorer = Callable[[torch.Tensor, torch.Tensor, int | None], torch.Tensor]
"""(final states (N, ·) of N real tokens, targets (N,) or (N, K), adapter slot) → target logprobs."""


def _score_logits(logits: torch.Tensor, targets: torch.Tensor, slot: int | None) -> torch.Tensor:
    return _target_logprobs(logits.float(), targets)


def _hidden_scorer(lm: LoadedModel) -> Scorer:
    """Scores hidden states through the output projection, vocab chunk by chunk (`lm.runtime.logprob_chunk_bytes`;
    0 materialises the logits), with the slot's LoRA on the projection where the head has one."""
    head, base = lm.model.get_output_embeddings(), _frozen_head(lm)
    chunk_bytes = lm.runtime.logprob_chunk_bytes

    def score(h: torch.Tensor, t: torch.Tensor, slot: int | None) -> torch.Tensor:
        factors = None
        if slot is not None and isinstance(head, MultiLoraLinear):
            factors = lm.router.adapters[slot].factors(head.name)
        if chunk_bytes:
            low_rank = None if factors is None else (lora_down(h, factors), factors.b)
            return target_logprobs(h, base.weight, t, chunk_bytes, low_rank)
        logits = base(h)
        if factors is not None:
            logits = logits + lora_delta(h, factors).to(logits.dtype)
        return _target_logprobs(logits.float(), t)

    return score


def _row_logprobs(
    states: torch.Tensor,
    starts: list[int],
    lengths: list[int],
    slots: list[int | None],
    targets: list[torch.Tensor],
    score: Scorer,
) -> list[torch.Tensor]:
    """Each row's target logprobs from the final states (tokens, ·), hidden states or logits, row r's real tokens
    at [starts[r], starts[r] + lengths[r]): rows with one target per token adapter by adapter over their real
    tokens only (padding is never scored), rows with K targets per token one by one."""
    out: dict[int, torch.Tensor] = {}
    flat = [r for r, t in enumerate(targets) if t.dim() == 1]
    for slot, group in itertools.groupby(flat, key=lambda r: slots[r]):
        rows = list(group)
        index = torch.cat([torch.arange(starts[r], starts[r] + lengths[r]) for r in rows]).to(states.device)
        scored = score(states[index], torch.cat([targets[r] for r in rows]), slot)
        out.update(zip(rows, scored.split([lengths[r] for r in rows])))
    for r, t in enumerate(targets):
        if t.dim() == 2:
            out[r] = score(states[starts[r] : starts[r] + lengths[r]], t, slots[r])
    return [out[r] for r in range(len(targets))]
