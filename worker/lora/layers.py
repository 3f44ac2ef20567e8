"""Module wrappers that apply per-row LoRA adapters inside a frozen transformers model.

`install_multi_lora(model, targets)` swaps every targeted `nn.Linear` for a `MultiLoraLinear` and every fused
routed-experts module for a `MultiLoraExperts`, all sharing one `AdapterRouter`. A forward pass run inside
`router.route(slots_per_row)` gives row i the adapter registered under `slots_per_row[i]` (rows of one adapter
must be contiguous; slot None means the bare base model). Outside a route the model is the plain base model.

A vision model's tower linears (`LoraTargets.vision`) take flat patches, not rows: a route then also carries each
row's patch count, and each adapter's LoRA applies to its rows' patches (scaled after a patch merger).

Where `gpu_kernels.dispatch` picks the Triton kernels (CUDA, by default), LoRA deltas of all adapters go through
one segmented launch per weight, and routed experts take every (token, expert) pair at once, grouped by (adapter,
expert); elsewhere the torch reference runs.

A training pass may pack its sequences into one row instead (`route(..., packed_lengths=...)`): adapters then
own runs of tokens of that row, and routed experts see each token's own slot.

Limits: one route at a time per model (the worker drives each model from one thread); experts modules must
expose `gate_up_proj` (E, 2I, H), `down_proj` (E, H, I) and `act_fn`, as transformers' DeepseekV3 and
Qwen3-MoE experts do.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from contract.catalogue import LoraTargets
from gpu_kernels.dispatch import KernelMode, add_expert_deltas, add_segment_deltas, use_kernels
from gpu_kernels.lora_reference import LoraFactors, StackCache, add_grouped_deltas
from worker.lora.adapter import LoraAdapter, TargetWeight


@dataclass(frozen=True)
class Route:
    """Which adapter each batch row uses, as contiguous segments (slot, row_start, row_end); for a vision model's
    images, the same over their patches (slot, patch_start, patch_end) out of `patches`."""

    segments: tuple[tuple[int, int, int], ...]
    row_slots: torch.Tensor
    """(B,) slot id per row, -1 for the base model."""
    patch_segments: tuple[tuple[int, int, int], ...] = ()
    patches: int = 0
    packed: bool = False
    """The batch is one row of packed sequences: `segments` and `row_slots` then index its tokens."""

    @classmethod
    def from_packed(cls, slots_per_sequence: Sequence[int | None], lengths: Sequence[int]) -> Route:
        """One row holding the sequences back to back (`lengths[i]` tokens through `slots_per_sequence[i]`)."""
        starts = [0, *itertools.accumulate(lengths)]
        segments = tuple((slot, starts[a], starts[b]) for slot, a, b in _segments(slots_per_sequence))
        slots = torch.tensor([-1 if s is None else s for s in slots_per_sequence], dtype=torch.long)
        return cls(segments, slots.repeat_interleave(torch.tensor(list(lengths))), packed=True)

    @classmethod
    def from_rows(cls, slots_per_row: Sequence[int | None], patches_per_row: Sequence[int] = ()) -> Route:
        segments = _segments(slots_per_row)
        row_slots = torch.tensor([-1 if s is None else s for s in slots_per_row], dtype=torch.long)
        if not any(patches_per_row):
            return cls(segments, row_slots)
        starts = [0, *itertools.accumulate(patches_per_row)]
        patch_segments = tuple((slot, starts[a], starts[b]) for slot, a, b in segments if starts[a] < starts[b])
        return cls(segments, row_slots, patch_segments, starts[-1])


def _segments(slots_per_row: Sequence[int | None]) -> tuple[tuple[int, int, int], ...]:
    """Contiguous (slot, start, end) runs of rows per adapter; slot None rows belong to none."""
    segments: list[tuple[int, int, int]] = []
    seen: set[int] = set()
    for i, slot in enumerate(slots_per_row):
        if slot is None:
            continue
        if segments and segments[-1][0] == slot and segments[-1][2] == i:
            segments[-1] = (slot, segments[-1][1], i + 1)
            continue
        if slot in seen:
            raise ValueError("rows of one adapter must be contiguous")
        seen.add(slot)
        segments.append((slot, i, i + 1))
    return tuple(segments)


class AdapterRouter:
    """Registry of resident adapters by slot, and the route of the forward pass in progress."""

    def __init__(self) -> None:
        self.adapters: dict[int, LoraAdapter] = {}
        self.current: Route | None = None
        self.stacks = StackCache()
        """Factor stacks of the batched decode path, reused across decode steps."""
        self.kernels: KernelMode = "auto"
        """Where LoRA deltas are computed (`gpu_kernels.dispatch`): the worker's `lora_kernels` setting."""

    @contextmanager
    def route(
        self,
        slots_per_row: Sequence[int | None],
        patches_per_row: Sequence[int] = (),
        packed_lengths: Sequence[int] | None = None,
    ) -> Iterator[Route]:
        """Route a forward pass: row i through adapter `slots_per_row[i]`, and so its images' `patches_per_row[i]`
        vision-tower patches (a vision model's rows hold their images' patches in row order). With
        `packed_lengths` the "rows" are sequences of these lengths packed into the batch's one row (text only)."""
        if self.current is not None:
            raise RuntimeError("a forward pass is already routed on this model")
        if packed_lengths is None:
            self.current = Route.from_rows(slots_per_row, patches_per_row)
        else:
            self.current = Route.from_packed(slots_per_row, packed_lengths)
        try:
            yield self.current
        finally:
            self.current = None


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, name: str, router: AdapterRouter, vision: bool = False) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.router = router
        self.vision = vision
        """A vision-tower linear: its input is (patches, in), or (patches / merge^2, in) after a patch merger."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        route = self.router.current
        if route is None:
            return y
        spans = route.segments
        if self.vision:  # patch spans, scaled to this layer's rows (every image's patches fold evenly)
            if not route.patches:
                return y
            spans = tuple(
                (s, a * x.shape[0] // route.patches, b * x.shape[0] // route.patches)
                for s, a, b in route.patch_segments
            )
        segments = []
        for slot, start, end in spans:
            factors = self.router.adapters[slot].factors(self.name)
            if factors is not None:
                segments.append((start, end, factors))
        if route.packed:  # segments index the tokens of the one packed row
            x_tokens, y_tokens = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            out = add_segment_deltas(y_tokens, x_tokens, segments, self.router.stacks, self.name, self.router.kernels)
            return out.reshape(y.shape)
        return add_segment_deltas(y, x, segments, self.router.stacks, self.name, self.router.kernels)


class MultiLoraExperts(nn.Module):
    """Routed experts with a LoRA per (adapter, expert) on `gate_up_proj` and `down_proj`."""

    def __init__(self, base: nn.Module, name: str, router: AdapterRouter) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.router = router
        self.num_experts = base.gate_up_proj.shape[0]

    def _expert_factors(self, param: str, expert: int) -> dict[int, LoraFactors]:
        return {slot: f.of_expert(expert) for slot, f in self._adapter_factors(param).items()}

    def _adapter_factors(self, param: str) -> dict[int, LoraFactors]:
        """Each routed adapter's (E, r, ·) factors of `param`, by slot."""
        out = {}
        for slot, _, _ in self.router.current.segments:
            f = self.router.adapters[slot].factors(f"{self.name}.{param}")
            if f is not None:
                out[slot] = f
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        base = self.base
        route = self.router.current
        token_slots = None
        if route is not None:
            tokens_per_row = hidden_states.shape[0] // route.row_slots.shape[0]
            token_slots = route.row_slots.to(hidden_states.device).repeat_interleave(tokens_per_row)
            if use_kernels(hidden_states, self.router.kernels):
                return self._forward_pairs(hidden_states, top_k_index, top_k_weights, token_slots)
        final = torch.zeros_like(hidden_states)  # the reference path: expert by expert, adapter by adapter
        with torch.no_grad():
            counts = torch.bincount(top_k_index.flatten(), minlength=self.num_experts)[: self.num_experts]
            hit = counts.nonzero(as_tuple=True)[0]
        for expert in hit.tolist():
            token_idx, top_k_pos = torch.where(top_k_index == expert)
            x = hidden_states[token_idx]
            gate_up = nn.functional.linear(x, base.gate_up_proj[expert])
            slots = token_slots[token_idx] if token_slots is not None else None
            if slots is not None:
                gate_up = add_grouped_deltas(gate_up, x, slots, self._expert_factors("gate_up_proj", expert))
            gate, up = gate_up.chunk(2, dim=-1)
            h = base.act_fn(gate) * up
            out = nn.functional.linear(h, base.down_proj[expert])
            if slots is not None:
                out = add_grouped_deltas(out, h, slots, self._expert_factors("down_proj", expert))
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def _forward_pairs(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        token_slots: torch.Tensor,
    ) -> torch.Tensor:
        """The kernels' path: all routed (token, expert) pairs at once, sorted by expert for the base weights, the
        LoRA of every (adapter, expert) group in one segmented launch per projection."""
        base = self.base
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)[: self.num_experts].tolist()
        order = order[: sum(counts)]  # pairs routed to no local expert sort last and are dropped
        final = torch.zeros_like(hidden_states)
        if order.numel() == 0:
            return final
        experts, token_idx = flat[order], order // top_k_index.shape[-1]
        x, slots = hidden_states[token_idx], token_slots[token_idx]
        gate_up = _per_expert_linear(x, base.gate_up_proj, counts)
        kernels, experts_total = self.router.kernels, self.num_experts
        gate_up = add_expert_deltas(
            gate_up, x, slots, experts, self._adapter_factors("gate_up_proj"), experts_total, kernels
        )
        gate, up = gate_up.chunk(2, dim=-1)
        h = base.act_fn(gate) * up
        out = _per_expert_linear(h, base.down_proj, counts)
        out = add_expert_deltas(out, h, slots, experts, self._adapter_factors("down_proj"), experts_total, kernels)
        out = out * top_k_weights.reshape(-1)[order, None]
        return final.index_add_(0, token_idx, out.to(final.dtype))


def _per_expert_linear(x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Rows of `x` sorted by expert (`counts[e]` rows for expert e) through their expert's weight (E, out, in)."""
    chunks = x.split(list(counts))
    return torch.cat([nn.functional.linear(chunk, weight[e]) for e, chunk in enumerate(chunks) if counts[e]])


def _group_of(leaf: str, targets: LoraTargets) -> str | None:
    if leaf in targets.vision:
        return "vision"
    if leaf in targets.unembed:
        return "unembed"
    if leaf in targets.attn:
        return "attn"
    if leaf in targets.mlp:
        return "mlp"
    return None


def _is_experts(module: nn.Module, targets: LoraTargets) -> bool:
    return (
        bool(targets.experts)
        and type(module).__name__.endswith("Experts")
        and all(
            isinstance(getattr(module, p, None), nn.Parameter) and getattr(module, p).dim() == 3
            for p in targets.experts
        )
    )


def install_multi_lora(model: nn.Module, targets: LoraTargets) -> tuple[AdapterRouter, list[TargetWeight]]:
    """Wrap the model's targetable modules in place; return the shared router and the list of target weights."""
    router = AdapterRouter()
    found: list[TargetWeight] = []
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear):
            group = _group_of(leaf, targets)
            if group is None:
                continue
            found.append(TargetWeight(name, group, module.in_features, module.out_features))
            replacements.append((name, MultiLoraLinear(module, name, router, vision=group == "vision")))
        elif _is_experts(module, targets):
            for param in targets.experts:
                e, out_f, in_f = getattr(module, param).shape
                found.append(TargetWeight(f"{name}.{param}", "mlp", in_f, out_f, num_experts=e))
            replacements.append((name, MultiLoraExperts(module, name, router)))
    for name, wrapper in replacements:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, wrapper)
    return router, found
