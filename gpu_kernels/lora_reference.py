"""Torch reference implementation of mixed-adapter LoRA ("shrink" x·Aᵀ then "expand" ·Bᵀ per adapter).

Two layouts are supported:
- row segments: the batch rows (or packed tokens) of one adapter are contiguous (the trainer and sampler sort
  rows by adapter). On the CPU every segment's delta comes from two grouped matmuls (`torch._grouped_mm`, one
  group per segment, ranks zero-padded to the largest): no Python loop over adapters and no copy of the factors
  per row, under autograd or not (measured 2.6x faster than a loop per adapter at 64 adapters × 32 tokens).
  Decode steps (no autograd, rows of one token) gather the factors per row and apply them with two batched
  matmuls (the "BGMV" shape of multi-LoRA kernels), the stacks cached across steps. Elsewhere (CUDA without
  the Triton kernels, widths `_grouped_mm` cannot align) each segment's delta is computed on its slice;
- token groups: tokens arrive in arbitrary order with a group id each (MoE experts see a gathered subset of
  tokens), so each group is gathered, transformed and scattered back with `index_add_`.

The deltas are computed in the factors' dtype and added in the base's. Autograd flows through both; gradients
reach each adapter's A and B only from its own rows or tokens. This is the path every device runs on CPU and the
twin that the GPU kernels are tested against.
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
    grad = torch.is_grad_enabled()
    if x.dim() > 2 and not grad and _batchable(segments, x.shape[0]):  # decode steps: cached per-row stacks
        return y + _batched_delta(x, segments, cache, name).to(y.dtype)
    if x.device.type == "cpu" and _groupable(x, segments):
        return y + _grouped_delta(x, segments).to(y.dtype)
    if x.dim() > 2 and _batchable(segments, x.shape[0]):  # rows of sequences; under autograd the stacks join the
        # graph, so they are not cached. Flat (tokens, in) inputs take the per-segment path: per-row stacks would
        # copy the factors once per token.
        return y + _batched_delta(x, segments, None, name).to(y.dtype)
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


def _grouped_delta(x: torch.Tensor, segments: Sequence[tuple[int, int, LoraFactors]]) -> torch.Tensor:
    """Every segment's delta in two grouped matmuls (`torch._grouped_mm`) over the tokens of all rows: one group per
    segment, ranks zero-padded to the largest, rows outside every segment a zero group. No per-row copies of the
    factors, no Python loop over adapters in the autograd graph."""
    ordered = sorted(segments, key=lambda seg: seg[0])
    first = ordered[0][2]
    align = _ALIGN_BYTES // first.a.element_size()
    rank = -(-max(f.a.shape[0] for _, _, f in ordered) // align) * align
    tokens_per_row = x[0].numel() // x.shape[-1]
    zeros_a = first.a.new_zeros((rank, x.shape[-1]))
    zeros_b = first.b.new_zeros((first.b.shape[0], rank))
    downs, ups, ends = [], [], []
    at = 0
    for start, end, f in ordered:
        if start > at:
            downs.append(zeros_a)
            ups.append(zeros_b)
            ends.append(start)
        pad = rank - f.a.shape[0]
        downs.append(torch.nn.functional.pad(f.a * f.scale, (0, 0, 0, pad)))
        ups.append(torch.nn.functional.pad(f.b, (0, pad)))
        ends.append(end)
        at = end
    if at < x.shape[0]:
        downs.append(zeros_a)
        ups.append(zeros_b)
        ends.append(x.shape[0])
    offsets = torch.tensor(ends, dtype=torch.int32, device=x.device) * tokens_per_row
    flat = x.reshape(-1, x.shape[-1]).to(first.a.dtype)
    if flat.data_ptr() % _ALIGN_BYTES:
        flat = flat.clone()
    low = torch._grouped_mm(flat, torch.stack(downs).transpose(1, 2), offsets)
    delta = _ContiguousGrad.apply(torch._grouped_mm(low, torch.stack(ups).transpose(1, 2), offsets))
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


_ALIGN_BYTES = 16
"""`torch._grouped_mm` wants every stride and base address a multiple of 16 bytes."""


def _groupable(x: torch.Tensor, segments: Sequence[tuple[int, int, LoraFactors]]) -> bool:
    """Whether `_grouped_delta` takes these: one float dtype of factors, and in/out widths it can align."""
    factors = [f for _, _, f in segments]
    dtypes = {f.a.dtype for f in factors} | {f.b.dtype for f in factors}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        return False
    size = factors[0].a.element_size()
    return (x.shape[-1] * size) % _ALIGN_BYTES == 0 and (factors[0].b.shape[0] * size) % _ALIGN_BYTES == 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: `_grouped_mm`'s backward rejects the expanded or
    strided gradients that reductions and reshapes downstream produce."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


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
