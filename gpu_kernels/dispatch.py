"""The one place that chooses, per call, between the Triton multi-LoRA kernels and their torch reference twins.

Each entry point takes a `mode` (the worker's `lora_kernels` setting, held by its `AdapterRouter`):
- "auto" (default): the kernels when the input is on CUDA and triton imports, the reference otherwise;
- "reference": always the reference (e.g. a GPU worker without kernels, to compare);
- "triton": always the kernels (CPU tests run them under TRITON_INTERPRET=1).

The entry points take the arguments of `lora_reference`'s, plus `add_expert_deltas` for routed experts, which
keys each token-expert pair by (adapter, expert) and hands the pairs to `add_grouped_deltas`. On CPU in "auto"
triton is never imported and the reference runs exactly as it did before this module existed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from gpu_kernels import lora_reference
from gpu_kernels.lora_reference import LoraFactors, StackCache

KernelMode = Literal["auto", "reference", "triton"]


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_kernels(x: torch.Tensor, mode: KernelMode = "auto") -> bool:
    """Whether LoRA deltas over `x` go through the Triton kernels (see the module docstring)."""
    if mode != "auto":
        return mode == "triton"
    return x.is_cuda and _triton_importable()


def add_segment_deltas(
    y: torch.Tensor,
    x: torch.Tensor,
    segments: Sequence[tuple[int, int, LoraFactors]],
    cache: StackCache | None = None,
    name: str = "",
    mode: KernelMode = "auto",
) -> torch.Tensor:
    """`lora_reference.add_segment_deltas`, on the kernels where `use_kernels(x, mode)`."""
    if use_kernels(x, mode):
        from gpu_kernels import segmented_lora  # imports triton: only where the kernels run

        return segmented_lora.add_segment_deltas(y, x, segments)
    return lora_reference.add_segment_deltas(y, x, segments, cache, name)


def add_grouped_deltas(
    y: torch.Tensor,
    x: torch.Tensor,
    group_ids: torch.Tensor,
    factors_by_group: Mapping[int, LoraFactors],
    mode: KernelMode = "auto",
) -> torch.Tensor:
    """`lora_reference.add_grouped_deltas`, on the kernels where `use_kernels(x, mode)`."""
    if use_kernels(x, mode):
        from gpu_kernels import segmented_lora

        return segmented_lora.add_grouped_deltas(y, x, group_ids, factors_by_group)
    return lora_reference.add_grouped_deltas(y, x, group_ids, factors_by_group)


def add_expert_deltas(
    y: torch.Tensor,
    x: torch.Tensor,
    adapter_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    factors_by_adapter: Mapping[int, LoraFactors],
    num_experts: int,
    mode: KernelMode = "auto",
) -> torch.Tensor:
    """Per-expert LoRA deltas for token-expert pairs (row i of x is token-expert pair i): pair i uses expert
    `expert_ids[i]` of adapter `adapter_ids[i]` (factors A (E, r, in), B (E, out, r)); adapters absent from the
    mapping (e.g. -1, the base model) add nothing. On the kernels this is one segmented launch over all pairs,
    sorted by (adapter, expert), each segment pointing at that adapter's factors of that expert."""
    keys = adapter_ids * num_experts + expert_ids
    by_key: dict[int, LoraFactors] = {}
    for key in torch.unique(keys).tolist():
        adapter, expert = divmod(key, num_experts)
        factors = factors_by_adapter.get(adapter)
        if factors is not None:
            by_key[key] = factors.of_expert(expert)
    return add_grouped_deltas(y, x, keys, by_key, mode)
