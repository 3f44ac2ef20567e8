"""A training run's LoRA adapter: its factors for every targeted weight, created with PEFT's initialisation.

Layout (identical in value to peft 0.21's LoRA, so export is a renaming):
- a linear weight W (out, in) gets A (r, in) and B (out, r); delta = (alpha / r) · B @ A;
- a fused routed-expert weight W (E, out, in) gets A (E, r, in) and B (E, out, r) — one LoRA per expert.
A is Kaiming-uniform (a=√5, i.e. U(±1/√in)), B is zero, so a fresh adapter leaves the base model unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from gpu_kernels.lora_reference import LoraFactors

LORA_ALPHA = 32
"""Fixed LoRA alpha; the effective scale is alpha / rank, as in PEFT."""


@dataclass(frozen=True)
class TargetWeight:
    """A base weight LoRA can wrap: `name` is its module path (plus `.gate_up_proj`/`.down_proj` for experts)."""

    name: str
    group: str
    """"attn", "mlp", "unembed" or "vision"."""
    in_features: int
    out_features: int
    num_experts: int = 1


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    seed: int | None
    train_attn: bool
    train_mlp: bool
    train_unembed: bool
    train_vision: bool = False
    """A vision-language model's vision tower and merger (Loom's extension of Tinker's LoRA flags)."""

    @property
    def scale(self) -> float:
        return LORA_ALPHA / self.rank

    def wants(self, group: str) -> bool:
        groups = {"attn": self.train_attn, "mlp": self.train_mlp, "unembed": self.train_unembed}
        return groups[group] if group != "vision" else self.train_vision


@dataclass
class LoraAdapter:
    """The trainable factors of one run. `params` maps a target weight name to its (A, B) pair."""

    spec: LoraSpec
    params: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = field(default_factory=dict)

    def factors(self, name: str) -> LoraFactors | None:
        pair = self.params.get(name)
        if pair is None:
            return None
        return LoraFactors(pair[0], pair[1], self.spec.scale)

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        out: list[tuple[str, torch.nn.Parameter]] = []
        for name in sorted(self.params):
            a, b = self.params[name]
            out += [(f"{name}.lora_A", a), (f"{name}.lora_B", b)]
        return out

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None


def create_adapter(targets: list[TargetWeight], spec: LoraSpec, device: torch.device | None = None) -> LoraAdapter:
    """Initialise float32 factors on `device` (default CPU) for every target whose group the spec trains
    (deterministic for a given seed on any device: drawn on the CPU)."""
    gen = torch.Generator().manual_seed(spec.seed if spec.seed is not None else torch.seed())
    adapter = LoraAdapter(spec)
    for t in sorted(targets, key=lambda t: t.name):
        if not spec.wants(t.group):
            continue
        bound = 1.0 / math.sqrt(t.in_features)
        a_shape = (spec.rank, t.in_features) if t.num_experts == 1 else (t.num_experts, spec.rank, t.in_features)
        b_shape = (t.out_features, spec.rank) if t.num_experts == 1 else (t.num_experts, t.out_features, spec.rank)
        a = ((torch.rand(a_shape, generator=gen) * 2 - 1) * bound).to(device)
        adapter.params[t.name] = (torch.nn.Parameter(a), torch.nn.Parameter(torch.zeros(b_shape, device=device)))
    return adapter
