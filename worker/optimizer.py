"""Per-run AdamW (torch's, with decoupled weight decay) driven by Tinker's `AdamParams` on every step.

A step that would leave any weight NaN or infinite (a huge learning rate, non-finite gradients) is not applied:
the weights, Adam moments and accumulated gradients are put back as they were and `NonFiniteUpdate` is raised,
so one bad step cannot poison a run, and a failed step changes nothing (as recovery's replay assumes, see
`worker/run_recovery.py`): the caller may retry it with a smaller learning rate.

Limits: to undo such a step, each step briefly holds a copy of the adapter's weights, gradients and moments
(4× the adapter's size on top of its own weights, gradients and moments).
"""

from __future__ import annotations

import math

import torch

from loom.types import AdamParams
from worker.lora.adapter import LoraAdapter


class NonFiniteUpdate(ValueError):
    """The step would have made the adapter's weights non-finite; nothing was applied (a `user` error)."""


class RunOptimizer:
    """AdamW over one adapter's parameters; hyper-parameters may change on every step, as Tinker allows."""

    def __init__(self, adapter: LoraAdapter) -> None:
        self.adapter = adapter
        self.optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
        self.steps = 0

    def step(self, hp: AdamParams) -> dict[str, float]:
        params = self.adapter.parameters()
        before = [(p.detach().clone(), None if p.grad is None else p.grad.clone()) for p in params]
        moments = {p: {k: v.clone() for k, v in state.items()} for p, state in self.optimizer.state.items()}
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = (
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        )
        if hp.grad_clip_norm > 0 and grads and math.isfinite(grad_norm):
            torch.nn.utils.clip_grad_norm_(params, hp.grad_clip_norm)
        for group in self.optimizer.param_groups:
            group.update(lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay)
        try:
            self.optimizer.step()
            diverged = not all(bool(torch.isfinite(p).all()) for p in params)
        except RuntimeError as exc:  # a step size past float32 ("cannot be converted ... without overflow")
            if "overflow" not in str(exc):
                raise
            diverged = True
        if diverged:
            with torch.no_grad():
                for p, (weight, grad) in zip(params, before):
                    p.copy_(weight)
                    p.grad = grad
            self.optimizer.state.clear()
            self.optimizer.state.update(moments)
            raise NonFiniteUpdate(
                f"optim_step refused: with learning_rate {hp.learning_rate:g} (gradient norm {grad_norm:g}) it "
                "would make the adapter's weights NaN or infinite; the weights, optimizer state and accumulated "
                "gradients are unchanged"
            )
        self.adapter.zero_grad()
        self.steps += 1
        return {"grad_norm:mean": grad_norm, "learning_rate:mean": hp.learning_rate}
