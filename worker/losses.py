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
| gspo                | -min(s·A, clip(s, lo, hi)·A).sum(), s per token below | clip_low/high_threshold 0.9997 / 1.0004 |
| stable_reinforce    | -(stopgrad(clip(ρ, 0, hi))·lp·A)[S].sum() + kl_coeff·(ρ - 1 - log ρ)[S].sum() | clip_high_threshold 2.0, kl_coeff 0.0 |

gspo (GSPO-token, Zheng et al. 2025, as Tinker documents it): the sequence log-ratio is the mean of `lp - q` over
the rows `sequence_ratio_mask` marks (every row when the input is absent; a mask that marks none gives ratio 1),
taken without gradient; each token's ratio `s = exp(seq_log_ratio + lp - stopgrad(lp))` has the sequence's value
and its own token's gradient. The default thresholds are the paper's (1 - 3e-4, 1 + 4e-4).

stable_reinforce (Loom's reading of Tinker's alpha StableReinforce, whose exact formula is unpublished): REINFORCE
on the sampled rows S only, with `q` the sampler's logprob *recorded at sampling time* (never the client's copy),
`ρ = exp(lp - q)` truncated at `clip_high_threshold` and detached as the weight, plus an optional k3 estimate of
KL(sampler ‖ learner) on S scaled by `kl_coeff`. The API resolves each datum's provenance to S and the recorded
logprobs (`api/stability.py`) and hands them over as the inputs `SAMPLED_MASK` and `RECORDED_LOGPROBS`.

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


def gspo(lp, inputs, config):
    mask = inputs.get("sequence_ratio_mask")
    in_ratio = torch.ones_like(lp, dtype=torch.bool) if mask is None else mask != 0
    token_log_ratio = (lp.detach() - inputs["logprobs"])[in_ratio]
    seq_log_ratio = token_log_ratio.mean() if token_log_ratio.numel() else lp.new_zeros(())
    ratio = torch.exp(seq_log_ratio + lp - lp.detach())
    adv = inputs["advantages"]
    clipped = _clip(ratio, inputs, config, 1.0 - 3e-4, 1.0 + 4e-4)
    return -torch.minimum(ratio * adv, clipped * adv).sum()


RECORDED_LOGPROBS = "recorded_logprobs"
"""stable_reinforce's input: per row, the sampler's recorded logprob of the target (0 outside the sampled rows)."""
SAMPLED_MASK = "sampled_mask"
"""stable_reinforce's input: 1 on rows whose target is a recorded sampled token, else 0."""


def stable_reinforce(lp, inputs, config):
    sampled = inputs[SAMPLED_MASK]
    log_ratio = (lp - inputs[RECORDED_LOGPROBS]) * sampled
    ratio = torch.exp(log_ratio)
    weight = _clip(ratio, inputs, config, 0.0, 2.0).detach()
    policy = -(weight * lp * inputs["advantages"] * sampled).sum()
    kl = ((ratio - 1.0 - log_ratio) * sampled).sum()
    return policy + float(config.get("kl_coeff", 0.0)) * kl


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
    "gspo": gspo,
    "stable_reinforce": stable_reinforce,
}
"""The built-in losses by name; `custom` runs a stored graph instead (`worker/custom_loss.py`)."""
