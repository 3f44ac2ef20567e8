"""Torch reference implementation of mixed-adapter LoRA ("shrink" x·Aᵀ then "expand" ·Bᵀ per adapter).

Two layouts are supported:
- row segments: the batch rows of one adapter are contiguous (the trainer and sampler sort rows by adapter),
  so each adapter's delta could be computed on a slice; when every row has an adapter and all share one rank,
  the factors are instead gathered per row and applied with two batched matmuls (the "BGMV" shape of multi-LoRA
  kernels), replacing a pair of small matmuls per adapter — on CPU this made a 16-adapter training pass as fast
  as a one-adapter pass (benchmarks/mixed_adapter_efficiency.py). It costs a per-row copy of the factors
  (rows x (in + out) x rank), kept for backward under autograd and cached across decode steps without it;
- token groups: tokens arrive in arbitrary order with a group id each (MoE experts see a gathered subset of
  tokens), so each group is gathered, transformed and scattered back with `index_add_`.

The deltas are computed in the factors' dtype and added in the base's. Autograd flows through both; gradients reach each adapter's A and B only from its own rows or tokens. This is the
path every device runs on CPU and the twin that GPU kernels are tested against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's factors for one weight: delta(x) = scale · (x @ Aᵀ) @ Bᵀ with A (r, in) and B (out, r)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    def of_expert(self, expert: int) -> LoraFactors:
        """Expert `expert`'s factors, when these are a routed-experts weight's (A (E, r, in), B (E, out, r))."""
        return LoraFactors(self.a[expert], self.b[expert], self.scale)


def lora_delta(x: torch.Tensor, factors: LoraFactors) -> torch.Tensor:
    """The delta in the factors' dtype (float32 adapters over a bfloat16 base compute in float32)."""
    x = x.to(factors.a.dtype)
    return (x @ factors.a.transpose(-1, -2)) @ factors.b.transpose(-1, -2) * factors.scale


def lora_down(x: torch.Tensor, factors: LoraFactors) -> torch.Tensor:
    """The scaled shrink half of the delta, scale · x @ Aᵀ, in the factors' dtype: what a fused consumer of the
    expand half (`gpu_kernels/chunked_logprobs.py`) takes."""
    return (x.to(factors.a.dtype) @ factors.a.transpose(-1, -2)) * factors.scale


def add_segment_deltas(
    y: torch.Tensor,
    x: torch.Tensor,
    segments: Sequence[tuple[int, int, LoraFactors]],
    cache: StackCache | None = None,
    name: str = "",
) -> torch.Tensor:
    """Add each segment's LoRA delta to rows [start, end) of `y` (computed from the same rows of `x`).

    `cache`/`name` let the no-autograd batched path reuse its factor stacks across calls for the same weight."""
    if not segments:
        return y
    if len(segments) == 1 and segments[0][0] == 0 and segments[0][1] == x.shape[0]:
        return y + lora_delta(x, segments[0][2]).to(y.dtype)
    if x.dim() > 2 and _batchable(segments, x.shape[0]):  # rows of sequences; under autograd the stacks join the
        # graph, so they are not cached. Flat (tokens, in) inputs take the per-segment path: per-row stacks would
        # copy the factors once per token.
        return y + _batched_delta(x, segments, None if torch.is_grad_enabled() else cache, name).to(y.dtype)
    # One concatenated delta added once: in-place adds per segment would copy the whole gradient per segment
    # in the backward pass (cost ∝ adapters × tensor size).
    parts: list[torch.Tensor] = []
    at = 0
    for start, end, factors in sorted(segments, key=lambda seg: seg[0]):
        if start > at:
            parts.append(y.new_zeros((start - at, *y.shape[1:])))
        parts.append(lora_delta(x[start:end], factors).to(y.dtype))
        at = end
    if at < y.shape[0]:
        parts.append(y.new_zeros((y.shape[0] - at, *y.shape[1:])))
    return y + torch.cat(parts)


def _batchable(segments: Sequence[tuple[int, int, LoraFactors]], rows: int) -> bool:
    ordered = sorted(segments, key=lambda seg: seg[0])
    covered = all(prev[1] == nxt[0] for prev, nxt in zip(ordered, ordered[1:]))
    ranks = {seg[2].a.shape[0] for seg in segments}
    return covered and ordered[0][0] == 0 and ordered[-1][1] == rows and len(ranks) == 1


class StackCache:
    """The last per-segment factor stacks of each weight, reused while the same adapters decode step after step.

    Entries are checked against the factors' identities and in-place versions, so updated weights are restacked.
    Holds one copy of the factors of the adapters in the current batch, per weight.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def stacks(self, name: str, ordered: Sequence[tuple[int, int, LoraFactors]], dtype: torch.dtype):
        key = tuple((end - start, id(f.a), f.a._version, id(f.b), f.b._version, f.scale) for start, end, f in ordered)
        hit = self._entries.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        lengths = torch.tensor([end - start for start, end, _ in ordered])
        a, b = torch.stack([f.a for _, _, f in ordered]), torch.stack([f.b for _, _, f in ordered])
        scale = torch.tensor([f.scale for _, _, f in ordered], dtype=dtype)
        if int(lengths.max()) > 1:  # per row: repeat each adapter's factors over its rows
            a, b, scale = (t.repeat_interleave(lengths, dim=0) for t in (a, b, scale))
        value = (a.transpose(1, 2), b.transpose(1, 2), scale[:, None, None])
        self._entries[name] = (key, value)
        return value


def _batched_delta(
    x: torch.Tensor, segments: Sequence[tuple[int, int, LoraFactors]], cache: StackCache | None, name: str
) -> torch.Tensor:
    """Per-row factors, two `bmm`s: rows (B, T, in) → (B, T, out)."""
    ordered = sorted(segments, key=lambda seg: seg[0])
    a_t, b_t, scale = (cache or StackCache()).stacks(name, ordered, ordered[0][2].a.dtype)
    rows = x.reshape(x.shape[0], -1, x.shape[-1]).to(a_t.dtype)
    delta = torch.bmm(torch.bmm(rows, a_t), b_t) * scale
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


def add_grouped_deltas(
    y: torch.Tensor, x: torch.Tensor, group_ids: torch.Tensor, factors_by_group: Mapping[int, LoraFactors]
) -> torch.Tensor:
    """Add LoRA deltas to the rows of `y` whose `group_ids` entry names an adapter in `factors_by_group`."""
    if not factors_by_group:
        return y
    present = torch.unique(group_ids).tolist()
    for group in present:
        factors = factors_by_group.get(int(group))
        if factors is None:
            continue
        rows = (group_ids == group).nonzero(as_tuple=True)[0]
        if rows.numel() == y.shape[0]:
            y = y + lora_delta(x, factors).to(y.dtype)
        else:
            y = y.index_add(0, rows, lora_delta(x.index_select(0, rows), factors).to(y.dtype))
    return y
