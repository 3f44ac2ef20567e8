"""One mixed multi-LoRA forward/backward equals running every request alone, for SmolLM2 and tiny Kimi K2.

Three adapters of different ranks, seeds and target sets (attention / dense MLP / shared + routed experts /
unembedding) have random non-zero B, so gradients reach A as well as B. One `run_forward_backward` call carries
four requests in scrambled slot order — cross_entropy over two datums of different lengths, ppo with a
configured clip, a forward-only 2-D cross_entropy and dro — and every adapter's accumulated gradient and every
returned logprob is compared with running each request alone on a clean gradient.

Tolerances (float32 on CPU; the only differences are reassociation inside batched matmuls):
- logprobs and losses: atol 1e-4 (logprobs are O(1..12)); measured ≤ 1.5e-5 (SmolLM2), 2e-6 (tiny Kimi);
- gradients: per tensor, max|g_mixed − g_alone| ≤ 1e-4 · max|g_alone| + 1e-9 (relative to the gradient scale);
  measured ≤ 9e-6 (SmolLM2), 2.1e-5 (tiny Kimi, routed experts);
- the base model with no adapter: bit-identical outputs before and after (atol 0).

The same four requests cut into micro-batches by a tiny `token_budget` (12 padded tokens: one row, or two short
rows of different adapters, per micro-batch) give the one-pass logprobs, losses and gradients within the same
tolerances; `micro_batches` itself is checked on random rows (budget, adapter contiguity, every row once).
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.worker_fixtures import (
    ce_datum,
    grads,
    make_adapter,
    ref_logits,
    register,
    rl_datum,
    shared_model,
    token_ids,
)
from worker.losses import LOSSES
from worker.trainer import TrainDatum, WorkItem, micro_batches, run_forward_backward

LP_ATOL = 1e-4
GRAD_RTOL = 1e-4
MICRO_BUDGET = 12

B_STD = {"smollm2": 2e-3, "tiny_kimi_k2": 3e-3}


class Setup:
    def __init__(self, key: str) -> None:
        self.key = key
        self.lm = lm = shared_model(key)
        self.probe = token_ids(9, seed=99)
        self.base_before = ref_logits(lm, self.probe, None)
        self.probe_logits: dict[int, torch.Tensor] = {}
        std = B_STD[key]
        # a1: everything (attn + MLP incl. experts + unembed); a2: attn + MLP; a3: MLP + unembed, no attention
        self.adapters = [
            make_adapter(lm, 4, 1, b_std=std),
            make_adapter(lm, 8, 2, unembed=False, b_std=std),
            make_adapter(lm, 6, 3, attn=False, b_std=std),
        ]
        self.slots = [register(lm, a) for a in self.adapters]
        for slot in self.slots[:2]:
            self.probe_logits[slot] = ref_logits(lm, self.probe, slot)
        s1, s2, s3 = self.slots
        soft_tokens = token_ids(6, seed=5)
        k = 3
        soft = TrainDatum(
            soft_tokens,
            {
                "target_tokens": torch.tensor([token_ids(k, seed=50 + i) for i in range(len(soft_tokens))]),
                "weights": torch.softmax(
                    torch.randn(len(soft_tokens), k, generator=torch.Generator().manual_seed(6)), -1
                ),
            },
        )
        n1, n2 = 8, 5
        self.items = [
            WorkItem(
                s2,
                [rl_datum(token_ids(10, seed=3), seed=3)],
                "ppo",
                {"clip_low_threshold": 0.7, "clip_high_threshold": 1.4},
            ),
            WorkItem(
                s1,
                [
                    ce_datum(token_ids(n1, seed=1), [1.0] * (n1 - 1)),
                    ce_datum(token_ids(n2, seed=2), [0.5, 1.0, 0.0, 2.0]),
                ],
                "cross_entropy",
            ),
            WorkItem(s3, [soft], "cross_entropy", forward_only=True),
            WorkItem(s3, [rl_datum(token_ids(5, seed=4), seed=4)], "dro", {"beta": 0.5}),
        ]

    def zero(self) -> None:
        for a in self.adapters:
            a.zero_grad()


@pytest.fixture(scope="module", params=["smollm2", "tiny_kimi_k2"])
def setup(request):
    s = Setup(request.param)
    s.zero()
    s.mixed = run_forward_backward(s.lm, s.items)
    s.mixed_grads = [grads(a) for a in s.adapters]
    s.zero()
    s.micro = run_forward_backward(s.lm, s.items, token_budget=MICRO_BUDGET)
    s.micro_grads = [grads(a) for a in s.adapters]
    s.zero()
    s.alone = []
    s.alone_grads = []
    for item in s.items:
        s.zero()
        s.alone.append(run_forward_backward(s.lm, [item])[0])
        s.alone_grads.append({i: grads(a) for i, a in enumerate(s.adapters)})
    s.zero()
    yield s
    for slot in s.slots:
        s.lm.router.adapters.pop(slot, None)


def _assert_grads_close(mixed: dict, alone: dict, what: str) -> None:
    assert mixed.keys() == alone.keys()
    for name in mixed:
        g_m, g_a = mixed[name], alone[name]
        assert (g_m is None) == (g_a is None), f"{what} {name}: gradient present in only one run"
        if g_a is None:
            continue
        scale = float(g_a.abs().max())
        err = float((g_m - g_a).abs().max())
        assert err <= GRAD_RTOL * scale + 1e-9, f"{what} {name}: max err {err:.3e} vs scale {scale:.3e}"


def test_logprobs_and_losses_match_each_item_alone(setup):
    for item, mixed, alone in zip(setup.items, setup.mixed, setup.alone):
        assert len(mixed.logprobs) == len(item.data)
        for datum, lp_m, lp_a in zip(item.data, mixed.logprobs, alone.logprobs):
            assert lp_m.shape == datum.inputs["target_tokens"].shape
            torch.testing.assert_close(lp_m, lp_a, atol=LP_ATOL, rtol=0)
        assert mixed.losses == pytest.approx(alone.losses, abs=LP_ATOL * 20)


def test_losses_are_the_loss_formula_of_the_returned_logprobs(setup):
    for item, res in zip(setup.items, setup.mixed):
        for datum, lp, loss in zip(item.data, res.logprobs, res.losses):
            expected = float(LOSSES[item.loss_fn](lp, datum.inputs, item.loss_fn_config))
            assert loss == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_logprobs_match_an_unpadded_reference_forward(setup):
    """Returned logprobs equal log_softmax of a single-row, unpadded forward through the same adapter."""
    lm = setup.lm
    # the shortest (most padded) datum of the cross_entropy item, the 2-D forward-only one and the dro one
    for i, j in ((1, 1), (2, 0), (3, 0)):
        item, datum, lp = setup.items[i], setup.items[i].data[j], setup.mixed[i].logprobs[j]
        logp = torch.log_softmax(ref_logits(lm, datum.tokens, item.slot), -1)
        t = datum.inputs["target_tokens"]
        ref = logp.gather(-1, t) if t.dim() == 2 else logp.gather(-1, t[:, None])[:, 0]
        torch.testing.assert_close(lp, ref, atol=LP_ATOL, rtol=0)


def test_every_adapter_gradient_matches_alone(setup):
    a1, a2, a3 = 0, 1, 2
    # item 0 → a2 (ppo), item 1 → a1 (cross_entropy), item 2 → a3 forward-only, item 3 → a3 (dro)
    expected = {a2: setup.alone_grads[0][a2], a1: setup.alone_grads[1][a1], a3: setup.alone_grads[3][a3]}
    for idx, ref in expected.items():
        _assert_grads_close(setup.mixed_grads[idx], ref, f"adapter {idx}")
        present = [g for g in ref.values() if g is not None]
        assert len(present) == len(ref), f"adapter {idx}: a trained factor got no gradient"
        assert all(float(g.abs().max()) > 0 for n, g in ref.items() if n.endswith("lora_B") and "experts" not in n)


def test_gradients_reach_a_and_every_target_group(setup):
    """With B ≠ 0, A gets gradients; routed experts (tiny Kimi) get gradients for the experts that were hit."""
    g = setup.mixed_grads[0]
    a_norm = sum(float(t.norm()) for n, t in g.items() if n.endswith("lora_A"))
    assert a_norm > 0
    leaves = {n.rsplit(".", 1)[0].rsplit(".", 1)[-1] for n, t in g.items() if float(t.abs().max()) > 0}
    expected = (
        {"q_proj", "o_proj", "gate_proj", "down_proj", "lm_head"}
        if setup.key == "smollm2"
        else {"q_a_proj", "kv_b_proj", "gate_proj", "lm_head", "gate_up_proj", "down_proj"}
    )
    assert expected <= leaves, f"no gradient for {expected - leaves}"
    if setup.key == "tiny_kimi_k2":
        shared = [n for n in g if "shared_experts" in n]
        routed = [n for n in g if ".experts." in n]
        assert shared and routed
        assert all(float(g[n].abs().max()) > 0 for n in shared)
        # routed experts: one LoRA per expert; some experts are hit, so some expert slices are non-zero
        hit = sum(int((g[n].flatten(1).abs().amax(1) > 0).sum()) for n in routed)
        assert hit > 0


def test_untrained_groups_get_no_parameters(setup):
    a2, a3 = setup.adapters[1], setup.adapters[2]
    assert not any("lm_head" in n for n in a2.params)
    attn_leaves = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
    assert not any(n.rsplit(".", 1)[-1] in attn_leaves for n in a3.params)


def test_forward_only_item_accumulates_no_gradient(setup):
    forward_only_alone = setup.alone_grads[2]
    for idx, g in forward_only_alone.items():
        assert all(t is None for t in g.values()), f"forward-only pass left a gradient on adapter {idx}"
    # and in the mixed pass a3's gradient is exactly the dro item's (compared above), not dro + forward-only


def test_forward_only_batch_runs_without_autograd(setup):
    item = setup.items[2]
    res = run_forward_backward(setup.lm, [item])[0]
    assert not res.logprobs[0].requires_grad
    assert all(p.grad is None for a in setup.adapters for p in a.parameters())


def test_base_model_without_adapter_is_unchanged(setup):
    lm = setup.lm
    after = ref_logits(lm, setup.probe, None)
    torch.testing.assert_close(after, setup.base_before, atol=0, rtol=0)
    with torch.no_grad():
        outside_route = lm.model(input_ids=torch.tensor([setup.probe]), use_cache=False).logits[0]
    torch.testing.assert_close(outside_route, setup.base_before, atol=0, rtol=0)
    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())
    # an adapter does change outputs (so the checks above could fail)
    assert float((setup.probe_logits[setup.slots[0]] - setup.base_before).abs().max()) > 1e-2


def test_fresh_adapter_leaves_base_model_unchanged(setup):
    lm = setup.lm
    fresh = make_adapter(lm, 4, 7)
    slot = register(lm, fresh)
    try:
        torch.testing.assert_close(ref_logits(lm, setup.probe, slot), setup.base_before, atol=1e-6, rtol=0)
    finally:
        lm.router.adapters.pop(slot)


def test_mixed_pass_with_base_rows_in_the_batch(setup):
    """A base-model row (slot None) next to adapter rows in one routed forward gets plain base logits."""
    lm = setup.lm
    a = setup.probe
    with torch.no_grad(), lm.router.route([setup.slots[0], None, setup.slots[1]]):
        logits = lm.model(input_ids=torch.tensor([a, a, a]), use_cache=False).logits.float()
    torch.testing.assert_close(logits[1], setup.base_before, atol=LP_ATOL, rtol=0)
    torch.testing.assert_close(logits[0], setup.probe_logits[setup.slots[0]], atol=LP_ATOL, rtol=0)
    torch.testing.assert_close(logits[2], setup.probe_logits[setup.slots[1]], atol=LP_ATOL, rtol=0)


def test_micro_batched_pass_equals_one_pass(setup):
    lengths = [len(d.tokens) for item in setup.items for d in item.data]
    slots = [item.slot for item in setup.items for _ in item.data]
    batches = micro_batches(lengths, slots, MICRO_BUDGET)
    assert len(batches) >= 3 and any(len({slots[r] for r in b}) > 1 for b in batches)  # really split, and mixed
    for one, micro in zip(setup.mixed, setup.micro):
        for lp_one, lp_micro in zip(one.logprobs, micro.logprobs, strict=True):
            torch.testing.assert_close(lp_micro, lp_one, atol=LP_ATOL, rtol=0)
        assert micro.losses == pytest.approx(one.losses, abs=LP_ATOL * 20)
    for idx, (g_one, g_micro) in enumerate(zip(setup.mixed_grads, setup.micro_grads)):
        _assert_grads_close(g_micro, g_one, f"adapter {idx} (micro-batched)")


@pytest.mark.parametrize("seed", range(5))
def test_micro_batches_fit_the_budget_and_keep_adapters_contiguous(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=gen))
    lengths = torch.randint(1, 50, (n,), generator=gen).tolist()
    slots = torch.randint(0, 4, (n,), generator=gen).tolist()
    budget = int(torch.randint(8, 200, (1,), generator=gen))
    batches = micro_batches(lengths, slots, budget)
    assert sorted(r for b in batches for r in b) == list(range(n))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[r] for r in batch) <= budget
        order = [slots[r] for r in batch]
        assert order == sorted(order)  # each adapter's rows contiguous
    assert micro_batches(lengths, slots, 10**9) == [sorted(range(n), key=lambda r: (slots[r], r))]
