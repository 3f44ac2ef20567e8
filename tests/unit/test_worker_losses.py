"""worker.losses against independent float64 reference formulas, values and gradients w.r.t. the logprobs.

gspo and stable_reinforce are checked the same way, including their edge cases: a sequence ratio outside the clip
band (whole sequence clipped per advantage sign), a masked ratio, a fully masked sequence, truncated weights, the
KL term, and datums with no sampled rows.

The references are written per token with explicit Python loops (piecewise PPO, stop-gradient CISPO, ...), so
they share no code with the vectorised torch implementations. Gradients are the closed-form derivatives of the
references, compared with torch.autograd.

Tolerance: the losses run in float32 on O(1) inputs, the references in float64 → rtol 1e-5, atol 1e-5 on values
(sums of ≤ 24 terms) and rtol 1e-5, atol 1e-6 on per-token gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from worker.losses import LOSSES
from worker.trainer import _target_logprobs

VAL_TOL = dict(rel=1e-5, abs=1e-5)  # pytest.approx spelling
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)

N = 24


def _inputs(seed: int, n: int = N):
    rng = np.random.default_rng(seed)
    lp = -rng.uniform(0.05, 4.0, n)
    # ratios r = exp(lp - q) spread over [0.3, 2.5] so every clipping branch is exercised
    log_r = rng.uniform(math.log(0.3), math.log(2.5), n)
    q = lp - log_r
    adv = rng.normal(size=n)
    adv[0], adv[1] = 1.5, -1.5  # both signs present whatever the seed
    return lp, q, adv


def _run(loss: str, lp64: np.ndarray, inputs: dict[str, np.ndarray], config: dict | None = None):
    lp = torch.tensor(lp64, dtype=torch.float32, requires_grad=True)
    t_inputs = {k: torch.tensor(v, dtype=torch.float32) for k, v in inputs.items()}
    value = LOSSES[loss](lp, t_inputs, config or {})
    value.backward()
    return float(value.detach()), lp.grad.double().numpy()


# ---------------------------------------------------------------------------------------------- cross entropy


def test_cross_entropy_1d_weights():
    lp, _, _ = _inputs(0)
    w = np.random.default_rng(1).uniform(0, 2, N)
    w[3] = 0.0
    value, grad = _run("cross_entropy", lp, {"weights": w, "target_tokens": np.zeros(N)})
    ref = -sum(lp[i] * w[i] for i in range(N))
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, -w, **GRAD_TOL)
    assert grad[3] == 0.0


def test_cross_entropy_1d_without_weights_is_plain_nll():
    lp, _, _ = _inputs(2)
    value, grad = _run("cross_entropy", lp, {"target_tokens": np.zeros(N)})
    assert value == pytest.approx(-lp.sum(), **VAL_TOL)
    np.testing.assert_allclose(grad, -np.ones(N), **GRAD_TOL)


def test_cross_entropy_2d_soft_targets():
    rng = np.random.default_rng(3)
    n, k = 6, 4
    lp = -rng.uniform(0.1, 5.0, (n, k))
    w = rng.dirichlet(np.ones(k), size=n) * rng.uniform(0.5, 1.5, (n, 1))  # soft target distribution per row
    value, grad = _run("cross_entropy", lp, {"weights": w, "target_tokens": np.zeros((n, k))})
    ref = 0.0
    for i in range(n):
        for j in range(k):
            ref -= w[i, j] * lp[i, j]
    assert value == pytest.approx(ref, **VAL_TOL)
    assert grad.shape == (n, k)
    np.testing.assert_allclose(grad, -w, **GRAD_TOL)


def test_target_logprobs_1d_and_2d_match_log_softmax():
    """The trainer's target-logprob gather for (N,) and (N, K) targets against a float64 log-softmax."""
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=3.0, size=(5, 11))
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    t1 = rng.integers(0, 11, 5)
    t2 = rng.integers(0, 11, (5, 3))
    lp1 = _target_logprobs(torch.tensor(logits, dtype=torch.float32), torch.tensor(t1))
    lp2 = _target_logprobs(torch.tensor(logits, dtype=torch.float32), torch.tensor(t2))
    np.testing.assert_allclose(lp1.numpy(), [ref[i, t1[i]] for i in range(5)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        lp2.numpy(), [[ref[i, t2[i, j]] for j in range(3)] for i in range(5)], rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------------------------------ policy gradients


def test_importance_sampling():
    lp, q, adv = _inputs(5)
    value, grad = _run("importance_sampling", lp, {"logprobs": q, "advantages": adv})
    r = [math.exp(lp[i] - q[i]) for i in range(N)]
    assert value == pytest.approx(-sum(r[i] * adv[i] for i in range(N)), **VAL_TOL)
    # d/dlp of -r·A is -r·A
    np.testing.assert_allclose(grad, [-r[i] * adv[i] for i in range(N)], **GRAD_TOL)


def _ppo_ref(lp, q, adv, lo, hi):
    """Textbook piecewise PPO-clip: with A > 0 the ratio is capped at hi, with A < 0 floored at lo."""
    value, grad = 0.0, []
    for i in range(len(lp)):
        r = math.exp(lp[i] - q[i])
        lo_i = lo[i] if isinstance(lo, np.ndarray) else lo
        hi_i = hi[i] if isinstance(hi, np.ndarray) else hi
        if adv[i] >= 0 and r > hi_i:
            value -= hi_i * adv[i]
            grad.append(0.0)
        elif adv[i] < 0 and r < lo_i:
            value -= lo_i * adv[i]
            grad.append(0.0)
        else:
            value -= r * adv[i]
            grad.append(-r * adv[i])
    return value, np.array(grad)


def _assert_branches_exercised(lp, q, adv, lo, hi):
    r = np.exp(lp - q)
    assert ((adv > 0) & (r > hi)).any() and ((adv < 0) & (r < lo)).any()
    assert ((adv > 0) & (r < lo)).any() or ((adv < 0) & (r > hi)).any()  # outside the band but unclipped


@pytest.mark.parametrize("seed", [6, 7])
def test_ppo_default_clip(seed):
    lp, q, adv = _inputs(seed)
    _assert_branches_exercised(lp, q, adv, 0.8, 1.2)
    value, grad = _run("ppo", lp, {"logprobs": q, "advantages": adv})
    ref, ref_grad = _ppo_ref(lp, q, adv, 0.8, 1.2)
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)


def test_ppo_configured_clip():
    lp, q, adv = _inputs(8)
    config = {"clip_low_threshold": 0.5, "clip_high_threshold": 1.6}
    value, grad = _run("ppo", lp, {"logprobs": q, "advantages": adv}, config)
    ref, ref_grad = _ppo_ref(lp, q, adv, 0.5, 1.6)
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)
    default, _ = _ppo_ref(lp, q, adv, 0.8, 1.2)
    assert abs(ref - default) > 1e-2  # the configured band really changes the value on these inputs


def test_ppo_per_token_thresholds_override_config():
    lp, q, adv = _inputs(9)
    rng = np.random.default_rng(10)
    lo = rng.uniform(0.6, 0.95, N)
    hi = rng.uniform(1.05, 1.5, N)
    inputs = {"logprobs": q, "advantages": adv, "clip_low_threshold": lo, "clip_high_threshold": hi}
    value, grad = _run("ppo", lp, inputs, {"clip_low_threshold": 0.1, "clip_high_threshold": 9.0})
    ref, ref_grad = _ppo_ref(lp, q, adv, lo, hi)
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)


def test_ppo_one_per_token_threshold_with_the_other_from_config():
    """Only clip_high per token (the low bound from config, then the default): a mix of tensor and scalar bounds."""
    lp, q, adv = _inputs(14)
    hi = np.random.default_rng(15).uniform(1.05, 1.5, N)
    inputs = {"logprobs": q, "advantages": adv, "clip_high_threshold": hi}
    value, grad = _run("ppo", lp, inputs, {"clip_low_threshold": 0.7, "clip_high_threshold": 9.0})
    ref, ref_grad = _ppo_ref(lp, q, adv, 0.7, hi)
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)
    value, _ = _run("ppo", lp, inputs)
    assert value == pytest.approx(_ppo_ref(lp, q, adv, 0.8, hi)[0], **VAL_TOL)


def _cispo_ref(lp, q, adv, lo, hi):
    value, grad = 0.0, []
    for i in range(len(lp)):
        lo_i = lo[i] if isinstance(lo, np.ndarray) else lo
        hi_i = hi[i] if isinstance(hi, np.ndarray) else hi
        w = min(max(math.exp(lp[i] - q[i]), lo_i), hi_i)  # a constant w.r.t. lp (stop-gradient)
        value -= w * lp[i] * adv[i]
        grad.append(-w * adv[i])
    return value, np.array(grad)


def test_cispo_default_clip_and_stop_gradient():
    lp, q, adv = _inputs(11)
    q = q - 1.0  # push some ratios above the default high threshold 4.0
    r = np.exp(lp - q)
    assert (r > 4.0).any() and (r < 4.0).any()
    value, grad = _run("cispo", lp, {"logprobs": q, "advantages": adv})
    ref, ref_grad = _cispo_ref(lp, q, adv, 0.0, 4.0)
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)
    # Without the stop-gradient, d/dlp would also carry lp·A·r on unclipped tokens: make sure it does not.
    no_stopgrad = ref_grad - np.where(r < 4.0, lp * adv * r, 0.0)
    assert np.abs(grad - no_stopgrad).max() > 1e-2


def test_cispo_configured_clip():
    lp, q, adv = _inputs(12)
    config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    value, grad = _run("cispo", lp, {"logprobs": q, "advantages": adv}, config)
    ref, ref_grad = _cispo_ref(lp, q, adv, 0.9, 1.1)
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)


def test_cispo_per_token_threshold_overrides_config():
    lp, q, adv = _inputs(16)
    lo = np.random.default_rng(17).uniform(0.8, 1.0, N)
    inputs = {"logprobs": q, "advantages": adv, "clip_low_threshold": lo}
    value, grad = _run("cispo", lp, inputs, {"clip_low_threshold": 0.0, "clip_high_threshold": 1.2})
    ref, ref_grad = _cispo_ref(lp, q, adv, lo, 1.2)
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)
    assert abs(ref - _cispo_ref(lp, q, adv, 0.0, 1.2)[0]) > 1e-2  # the per-token bound really mattered


@pytest.mark.parametrize("beta", [None, 0.3, 2.0])
def test_dro(beta):
    lp, q, adv = _inputs(13)
    config = {} if beta is None else {"beta": beta}
    b = 1.0 if beta is None else beta
    value, grad = _run("dro", lp, {"logprobs": q, "advantages": adv}, config)
    ref = -sum(lp[i] * adv[i] - 0.5 * b * (lp[i] - q[i]) ** 2 for i in range(N))
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, [-(adv[i] - b * (lp[i] - q[i])) for i in range(N)], **GRAD_TOL)


# ------------------------------------------------------------------------------------------------------ gspo


def _grad(loss: str, lp64: np.ndarray, inputs: dict[str, np.ndarray], config: dict | None = None):
    """The loss's value and torch.autograd.grad w.r.t. the logprobs."""
    lp = torch.tensor(lp64, dtype=torch.float32, requires_grad=True)
    t_inputs = {k: torch.tensor(v, dtype=torch.float32) for k, v in inputs.items()}
    value = LOSSES[loss](lp, t_inputs, config or {})
    (grad,) = torch.autograd.grad(value, lp)
    return float(value.detach()), grad.double().numpy()


def _gspo_ref(lp, q, adv, mask, lo, hi):
    """GSPO-token per token: every token's ratio is the sequence's s = exp(mean over the masked tokens of lp - q),
    a constant in value; its derivative w.r.t. the token's own logprob is s (ratio = s · p / stopgrad(p))."""
    marked = [i for i in range(len(lp)) if mask is None or mask[i] != 0]
    s = math.exp(sum(lp[i] - q[i] for i in marked) / len(marked)) if marked else 1.0
    value, grad = 0.0, []
    for i in range(len(lp)):
        lo_i = lo[i] if isinstance(lo, np.ndarray) else lo
        hi_i = hi[i] if isinstance(hi, np.ndarray) else hi
        if (adv[i] >= 0 and s > hi_i) or (adv[i] < 0 and s < lo_i):
            value -= (hi_i if adv[i] >= 0 else lo_i) * adv[i]  # clipped: a constant
            grad.append(0.0)
        else:
            value -= s * adv[i]
            grad.append(-s * adv[i])
    return value, np.array(grad), s


GSPO_LO, GSPO_HI = 1 - 3e-4, 1 + 4e-4


def test_gspo_clipping_active_whole_sequence():
    """A sequence ratio above the band: every A > 0 token is clipped (no gradient), every A < 0 token is not."""
    lp, _, adv = _inputs(20)
    q = lp - 0.01  # mean log-ratio 0.01 -> s = e^0.01 > 1 + 4e-4
    value, grad = _grad("gspo", lp, {"logprobs": q, "advantages": adv})
    ref, ref_grad, s = _gspo_ref(lp, q, adv, None, GSPO_LO, GSPO_HI)
    assert s > GSPO_HI
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)
    assert (grad[adv > 0] == 0).all() and (grad[adv < 0] != 0).all()


def test_gspo_mask_restricts_the_ratio_and_the_mean_carries_no_gradient():
    """Prompt rows padded with q = 0 (as the cookbook does) are left out by the mask; per-token log-ratios that are
    far apart but average inside the band give unclipped tokens whose gradient is s·A alone (no cross terms)."""
    rng = np.random.default_rng(21)
    lp, _, adv = _inputs(21)
    mask = np.array([0.0] * 6 + [1.0] * (N - 6))
    log_r = rng.uniform(-0.5, 0.5, N)
    log_r[6:] -= log_r[6:].mean() - 1e-4  # masked mean 1e-4: inside (1 - 3e-4, 1 + 4e-4)
    q = lp - log_r
    q[:6] = 0.0
    adv[:6] = 0.0
    value, grad = _grad("gspo", lp, {"logprobs": q, "advantages": adv, "sequence_ratio_mask": mask})
    ref, ref_grad, s = _gspo_ref(lp, q, adv, mask, GSPO_LO, GSPO_HI)
    assert GSPO_LO < s < GSPO_HI
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)
    unmasked, _, _ = _gspo_ref(lp, q, adv, None, GSPO_LO, GSPO_HI)
    assert abs(unmasked - ref) > 1e-2  # the mask really changed the sequence ratio


def test_gspo_configured_and_per_token_thresholds():
    lp, _, adv = _inputs(22)
    q = lp + 0.3  # s = e^-0.3 ≈ 0.74
    config = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    value, grad = _grad("gspo", lp, {"logprobs": q, "advantages": adv}, config)
    ref, ref_grad, _ = _gspo_ref(lp, q, adv, None, 0.8, 1.2)
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)
    lo = np.random.default_rng(23).uniform(0.5, 0.9, N)  # per token: some below s = 0.74, some above
    value, grad = _grad("gspo", lp, {"logprobs": q, "advantages": adv, "clip_low_threshold": lo}, config)
    ref, ref_grad, _ = _gspo_ref(lp, q, adv, None, lo, 1.2)
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)


def test_gspo_fully_masked_sequence_has_ratio_one():
    lp, q, adv = _inputs(24)
    value, grad = _grad("gspo", lp, {"logprobs": q, "advantages": adv, "sequence_ratio_mask": np.zeros(N)})
    ref, ref_grad, s = _gspo_ref(lp, q, adv, np.zeros(N), GSPO_LO, GSPO_HI)
    assert s == 1.0 and math.isfinite(value)
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)


# ------------------------------------------------------------------------------------------ stable_reinforce


def _stable_ref(lp, q, adv, sampled, hi, kl):
    """Per sampled token: weight w = min(r, hi) held constant, -w·lp·A, plus kl·(r - 1 - log r) whose derivative
    is kl·(r - 1); unsampled tokens contribute nothing."""
    value, grad = 0.0, []
    for i in range(len(lp)):
        if not sampled[i]:
            grad.append(0.0)
            continue
        r = math.exp(lp[i] - q[i])
        w = min(r, hi)
        value += -w * lp[i] * adv[i] + kl * (r - 1 - (lp[i] - q[i]))
        grad.append(-w * adv[i] + kl * (r - 1))
    return value, np.array(grad)


def _stable_inputs(seed: int):
    lp, q, adv = _inputs(seed)
    q = q - 0.5  # ratios up to ~4: some beyond the default truncation 2.0
    sampled = np.array([0.0] * 5 + [1.0] * (N - 5))
    adv[:5] = 0.0
    recorded = np.where(sampled > 0, q, 0.0)
    inputs = {"advantages": adv, "sampled_mask": sampled, "recorded_logprobs": recorded}
    return lp, q, adv, sampled, inputs


@pytest.mark.parametrize("kl_coeff", [None, 0.05])
def test_stable_reinforce_truncated_weight_and_kl(kl_coeff):
    lp, q, adv, sampled, inputs = _stable_inputs(25)
    r = np.exp(lp - q)
    assert (r[5:] > 2.0).any() and (r[5:] < 2.0).any()  # truncation active on some sampled tokens only
    config = {} if kl_coeff is None else {"kl_coeff": kl_coeff}
    value, grad = _grad("stable_reinforce", lp, inputs, config)
    ref, ref_grad = _stable_ref(lp, q, adv, sampled, 2.0, kl_coeff or 0.0)
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)
    assert (grad[:5] == 0).all()


def test_stable_reinforce_ignores_the_clients_logprobs_and_honours_the_truncation_config():
    lp, q, adv, sampled, inputs = _stable_inputs(26)
    config = {"clip_high_threshold": 1.1, "kl_coeff": 0.2}
    value, grad = _grad("stable_reinforce", lp, inputs | {"logprobs": np.zeros(N)}, config)
    ref, ref_grad = _stable_ref(lp, q, adv, sampled, 1.1, 0.2)
    assert value == pytest.approx(ref, **VAL_TOL)
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)


def test_stable_reinforce_without_sampled_rows_is_zero():
    lp, q, adv, _, inputs = _stable_inputs(27)
    inputs["sampled_mask"] = np.zeros(N)
    value, grad = _grad("stable_reinforce", lp, inputs, {"kl_coeff": 1.0})
    assert value == 0.0
    assert (grad == 0).all()


def test_every_loss_is_covered():
    assert set(LOSSES) == {
        "cross_entropy",
        "importance_sampling",
        "ppo",
        "cispo",
        "dro",
        "gspo",
        "stable_reinforce",
    }
