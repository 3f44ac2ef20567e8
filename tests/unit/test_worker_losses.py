"""worker.losses against independent float64 reference formulas, values and gradients w.r.t. the logprobs.

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


def test_every_loss_is_covered():
    assert set(LOSSES) == {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro"}
