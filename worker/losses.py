"""Tinker's built-in losses, computed per datum from the learner's target-token logprobs.

All losses are sums over tokens with no normalisation (users scale through `weights` / `advantages`). With `lp`
the learner's logprobs of `target_tokens`, `q` the sampler's logprobs (`loss_fn_inputs["logprobs"]`), `A` the
advantages and `r = exp(lp - q)`:

| loss                | value                                              | config (defaults)                  |
|---------------------|----------------------------------------------------|------------------------------------|
| cross_entropy       | -(lp · weights).sum()   (targets may be (N, K))    | —                                  |
| importance_sampling | -(r · A).sum()                                     | —                                  |
| ppo                 | -min(r·A, clip(r, lo, hi)·A).sum()                  | clip_low/high_threshold 0.8 / 1.2  |
| cispo               | -(stopgrad(clip(r, lo, hi)) · lp · A).sum()        | clip_low/high_threshold 0.0 / 4.0  |
| dro                 | -(lp·A - 0.5·beta·(lp - q)²).sum()                 | beta (1.0)                         |

`clip_low_threshold` / `clip_high_threshold` may also arrive per token in `loss_fn_inputs` (a tensor of shape (N,)
per datum), overriding the scalar in config token by token. Inputs are validated before they get here
(`loom.types.validation`); a loss that still fails raises, and the trainer reports it as that request's own error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]], torch.Tensor]


def _clip(
    ratio: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float], lo: float, hi: float
) -> torch.Tensor:
    """`ratio` clamped to [low, high], each bound a per-token input if given, else config's scalar, else default."""
    bounds = []
    for key, default in (("clip_low_threshold", lo), ("clip_high_threshold", hi)):
        bound = inputs.get(key)
        if bound is None:
            bound = torch.tensor(float(config.get(key, default)))
        bounds.append(bound.to(ratio.dtype))
    return torch.clamp(ratio, min=bounds[0], max=bounds[1])


def _ratio(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.exp(lp - inputs["logprobs"])


def cross_entropy(lp, inputs, config):
    weights = inputs.get("weights")
    if weights is None:
        weights = torch.ones_like(lp)
    return -(lp * weights).sum()


def importance_sampling(lp, inputs, config):
    return -(_ratio(lp, inputs) * inputs["advantages"]).sum()


def ppo(lp, inputs, config):
    adv = inputs["advantages"]
    ratio = _ratio(lp, inputs)
    clipped = _clip(ratio, inputs, config, 0.8, 1.2)
    return -torch.minimum(ratio * adv, clipped * adv).sum()


def cispo(lp, inputs, config):
    weight = _clip(_ratio(lp, inputs), inputs, config, 0.0, 4.0).detach()
    return -(weight * lp * inputs["advantages"]).sum()


def dro(lp, inputs, config):
    beta = float(config.get("beta", 1.0))
    q = inputs["logprobs"]
    return -(lp * inputs["advantages"] - 0.5 * beta * (lp - q) ** 2).sum()


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
}
