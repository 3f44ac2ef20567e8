"""Mixed-adapter LoRA deltas through the Triton SGMV kernels, with the entry points of `lora_reference`.

`SegmentedLora` is the autograd Function: for rows given as per-segment (start, end) ranges and per-segment
factors (A (S, R, in), B (S, out, R), scale (S,)), forward is shrink h = x·Aₛᵀ then expand delta = scaleₛ·h·Bₛᵀ,
and backward gives grad x, grad A and grad B, all with the two kernels of `sgmv_triton`. Adapters of different
ranks are zero-padded to the largest rank of the call (padded rows and columns contribute exact zeros; their
gradients are dropped by the padding's own backward).

`add_segment_deltas` (row segments) and `add_grouped_deltas` (token groups: the tokens of one MoE expert, or
token-expert pairs keyed by (adapter, expert), see `dispatch.add_expert_deltas`) take the arguments of their
reference twins and compute the same function: rows are sorted by group, one launch covers every group, and the
factors are stacked per segment.

Limits: CUDA tensors (or TRITON_INTERPRET=1 on CPU, for tests); x and the factors are computed in the factors'
dtype, as in the reference; the per-call factor stack is not cached across decode steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from gpu_kernels.lora_reference import LoraFactors
from gpu_kernels.sgmv_triton import segment_outer, segmented_matmul


class SegmentedLora(torch.autograd.Function):
    """delta (T, out) = scaleₛ · (x @ Aₛᵀ) @ Bₛᵀ on the rows [startₛ, endₛ) of each segment s, zeros elsewhere."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scales: torch.Tensor,
        starts: torch.Tensor,
        ends: torch.Tensor,
        max_rows: int,
    ) -> torch.Tensor:
        ones = torch.ones_like(scales)
        h = segmented_matmul(x, a.transpose(1, 2), ones, starts, ends, max_rows)
        ctx.save_for_backward(x, a, b, h, scales, ones, starts, ends)
        ctx.max_rows = max_rows
        return segmented_matmul(h, b.transpose(1, 2), scales, starts, ends, max_rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a, b, h, scales, ones, starts, ends = ctx.saved_tensors
        grad = grad.to(b.dtype)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_h = segmented_matmul(grad, b, scales, starts, ends, ctx.max_rows)
            if ctx.needs_input_grad[0]:
                grad_x = segmented_matmul(grad_h, a, ones, starts, ends, ctx.max_rows)
            if ctx.needs_input_grad[1]:
                grad_a = segment_outer(grad_h, x, ones, starts, ends)
        if ctx.needs_input_grad[2]:
            grad_b = segment_outer(grad, h, scales, starts, ends)
        return grad_x, grad_a, grad_b, None, None, None, None


def _segmented_delta(x: torch.Tensor, spans: Sequence[tuple[int, int]], factors: Sequence[LoraFactors]) -> torch.Tensor:
    """The delta of flat rows `x` (T, in) for row spans [start, end) with their factors, in the factors' dtype."""
    rank = max(f.a.shape[0] for f in factors)
    a = torch.stack([F.pad(f.a, (0, 0, 0, rank - f.a.shape[0])) for f in factors])
    b = torch.stack([F.pad(f.b, (0, rank - f.b.shape[1])) for f in factors])
    device = x.device
    scales = torch.tensor([f.scale for f in factors], dtype=torch.float32, device=device)
    starts = torch.tensor([s for s, _ in spans], dtype=torch.int32, device=device)
    ends = torch.tensor([e for _, e in spans], dtype=torch.int32, device=device)
    max_rows = max(e - s for s, e in spans)
    return SegmentedLora.apply(x.to(a.dtype), a, b, scales, starts, ends, max_rows)


def add_segment_deltas(
    y: torch.Tensor, x: torch.Tensor, segments: Sequence[tuple[int, int, LoraFactors]]
) -> torch.Tensor:
    """`lora_reference.add_segment_deltas` as one shrink and one expand launch: segments are ranges of x's first
    dimension (rows of sequences, or flat tokens)."""
    if not segments:
        return y
    per_row = x[0].numel() // x.shape[-1] if x.shape[0] else 1
    spans = [(start * per_row, end * per_row) for start, end, _ in segments]
    delta = _segmented_delta(x.reshape(-1, x.shape[-1]), spans, [f for _, _, f in segments])
    return y + delta.reshape(*x.shape[:-1], delta.shape[-1]).to(y.dtype)


def add_grouped_deltas(
    y: torch.Tensor, x: torch.Tensor, group_ids: torch.Tensor, factors_by_group: Mapping[int, LoraFactors]
) -> torch.Tensor:
    """`lora_reference.add_grouped_deltas` as one segmented launch: rows sorted by group id (stable), one segment
    per group that has factors, the delta gathered back to the original row order."""
    groups = [g for g in torch.unique(group_ids).tolist() if g in factors_by_group] if factors_by_group else []
    if not groups:
        return y
    order = torch.argsort(group_ids, stable=True)
    ordered_ids = group_ids[order]
    keys = torch.tensor(groups, dtype=ordered_ids.dtype, device=ordered_ids.device)
    bounds = torch.stack([torch.searchsorted(ordered_ids, keys), torch.searchsorted(ordered_ids, keys, right=True)])
    spans = [(int(s), int(e)) for s, e in bounds.t().tolist()]
    delta = _segmented_delta(x[order], spans, [factors_by_group[g] for g in groups])
    return y + delta[torch.argsort(order)].to(y.dtype)
