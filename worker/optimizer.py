"""Per-run AdamW (torch's, with decoupled weight decay) driven by Tinker's `AdamParams` on every step."""

from __future__ import annotations

import math

import torch

from loom.types import AdamParams
from worker.lora.adapter import LoraAdapter


class RunOptimizer:
    """AdamW over one adapter's parameters; hyper-parameters may change on every step, as Tinker allows."""

    def __init__(self, adapter: LoraAdapter) -> None:
        self.adapter = adapter
        self.optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
        self.steps = 0

    def step(self, hp: AdamParams) -> dict[str, float]:
        params = self.adapter.parameters()
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = (
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        )
        if hp.grad_clip_norm > 0 and grads and math.isfinite(grad_norm):
            torch.nn.utils.clip_grad_norm_(params, hp.grad_clip_norm)
        for group in self.optimizer.param_groups:
            group.update(lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay)
        self.optimizer.step()
        self.adapter.zero_grad()
        self.steps += 1
        return {"grad_norm:mean": grad_norm, "learning_rate:mean": hp.learning_rate}
