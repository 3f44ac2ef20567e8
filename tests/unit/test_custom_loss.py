"""Server-side custom losses: the graph check (`contract/custom_loss_graph.py`) and the worker's interpreter
(`worker/custom_loss.py`).

Graphs are traced from losses written here with the official SDK's own tracer (`trace_loss` + `encode_graph`, what
`ServiceClient.create_custom_loss` uploads). The reference for each is the same Python function run directly on
torch tensors: the interpreter must give its value, its metrics and its gradient w.r.t. the logprobs
(torch.autograd.grad) on seeded random inputs. A graph whose values would outgrow the datum (outer products,
repeated concatenation) is refused step by step before the large value exists. The check must refuse anything outside its lists (foreign functions,
in-place or host methods, captured tensors, modules, devices, forward references, oversized graphs, bad metric
names) with a 400-ready `InvalidCustomLoss`; a graph that passes but fails at run time raises, and in a mixed
forward/backward it fails its own request alone (`LossError`), the other tenant's result unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

from contract.custom_loss_graph import InvalidCustomLoss, check_custom_loss
from contract.jobs import CustomLossSpec
from loom.types import CustomLossGraph, CustomLossInput
from loom.types.limits import MAX_CUSTOM_LOSS_NODES
from tests.unit.worker_fixtures import ce_datum, make_adapter, register, shared_model, token_ids
from worker.custom_loss import CustomLoss, reduce_metrics
from worker.fault_isolation import ItemFailure, isolated_forward_backward
from worker.trainer import ItemResult, WorkItem


def ppo_like(logprobs, logprob_ref, advantages):
    ratio = torch.exp(logprobs - logprob_ref)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum()
    return loss, {"custom/ppo_like:sum": loss, "custom/ratio:mean": ratio.mean()}


def shaped(logprobs, advantages):
    n = logprobs.shape[0]
    head = logprobs[1:].sum() / n
    gated = torch.where(advantages > 0, logprobs, torch.zeros_like(logprobs))
    soft = F.logsigmoid(logprobs).mean() + F.softplus(-logprobs).sum()
    tail = logprobs[..., None].squeeze(-1).clamp(min=-float("inf")).max()
    loss = -(gated * advantages).sum() + 0.1 * soft + head - 0.01 * tail + torch.max(logprobs, dim=0)[0]
    return loss, {"custom/gated:sum": gated.detach().sum()}


def soft_targets(logprobs, target_distribution):
    loss = -(target_distribution * logprobs).sum() + F.mse_loss(logprobs, logprobs.detach() * 0.5, reduction="sum")
    return loss, {}


CASES: dict[str, tuple[Any, dict[str, int]]] = {
    "ppo_like": (ppo_like, {"logprobs": 1, "logprob_ref": 1, "advantages": 1}),
    "shaped": (shaped, {"logprobs": 1, "advantages": 1}),
    "soft_targets": (soft_targets, {"logprobs": 2, "target_distribution": 2}),
}


def spec_of(fn, ranks: dict[str, int]) -> CustomLossSpec:
    """What the SDK uploads for `fn`, as the stored spec a job carries."""
    handle = trace_loss(fn, ranks, "session")
    graph = CustomLossGraph.model_validate(encode_graph(handle).model_dump(mode="json"))
    inputs = [CustomLossInput(name=x.name, rank=x.rank) for x in handle.inputs]
    return CustomLossSpec(name=handle.name, inputs=inputs, graph=graph)


def random_inputs(ranks: dict[str, int], seed: int, n: int = 9, k: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = {0: (), 1: (n,), 2: (n, k)}
    out = {name: torch.randn(shape[rank], generator=gen) for name, rank in ranks.items()}
    out["logprobs"] = -torch.rand(shape[ranks["logprobs"]], generator=gen) * 3
    return out


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_interpreter_matches_the_function_run_directly(case, seed):
    fn, ranks = CASES[case]
    loss_fn = CustomLoss(spec_of(fn, ranks))
    inputs = random_inputs(ranks, seed)
    lp_ref = inputs["logprobs"].clone().requires_grad_(True)
    ref_loss, ref_metrics = fn(lp_ref, *(inputs[name] for name in list(ranks)[1:]))
    (ref_grad,) = torch.autograd.grad(ref_loss, lp_ref)

    lp = inputs["logprobs"].clone().requires_grad_(True)
    loss, metrics = loss_fn(lp, inputs)
    (grad,) = torch.autograd.grad(loss, lp)
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
    assert metrics.keys() == ref_metrics.keys()
    for key, value in metrics.items():
        assert value == pytest.approx(float(ref_metrics[key].detach()), rel=1e-6, abs=1e-6)
    assert grad.abs().sum() > 0


def test_metrics_reduce_by_their_suffix():
    per_datum = [{"custom/a:sum": 1.0, "custom/b:mean": 2.0}, {"custom/a:sum": 3.0, "custom/b:mean": 6.0}]
    assert reduce_metrics(per_datum) == {"custom/a:sum": 4.0, "custom/b:mean": 4.0}


# ------------------------------------------------------------------------------------------------- the check


def good_spec() -> CustomLossSpec:
    return spec_of(ppo_like, CASES["ppo_like"][1])


def mutated(edit) -> CustomLossSpec:
    data = copy.deepcopy(good_spec().model_dump(mode="json"))
    edit(data)
    return CustomLossSpec.model_validate(data)


def _node(data: dict, name: str) -> dict:
    return next(node for node in data["graph"]["nodes"] if node["name"] == name)


def _set(node: str, **fields):
    return lambda data: _node(data, node).update(fields)


REFUSED = {
    "foreign function": _set("exp", target="builtins.eval"),
    "os function": _set("exp", target="os.system"),
    "torch loader": _set("exp", target="torch.load"),
    "in-place method": _set("sum_1", target="add_"),
    "host method": _set("sum_1", target="item"),
    "backward": _set("sum_1", target="backward"),
    "captured tensor": _set("exp", op="get_attr"),
    "module call": _set("exp", op="call_module"),
    "private attribute": _set("exp", target="getattr", args=[{"ref": "sub"}, "__class__"]),
    "forward reference": _set("exp", args=[{"ref": "clamp"}]),
    "unknown reference": _set("exp", args=[{"ref": "nowhere"}]),
    "device argument": _set("exp", kwargs={"out": {"device": "cuda"}}),
    "unknown constant": _set("clamp", args=[{"ref": "exp"}, {"pickle": "gASV"}, 1.2]),
    "method on a constant": _set("sum_1", args=[1.0]),
    "bad metric name": lambda d: d["graph"]["nodes"][-1]["args"][0]["tuple"][1]["dict"].update(
        {"Loss": {"ref": "exp"}}
    ),
    "constant loss": lambda d: d["graph"]["nodes"][-1]["args"][0]["tuple"].__setitem__(0, 1.0),
    "no output": lambda d: d["graph"]["nodes"].pop(),
    "placeholders out of order": lambda d: d["inputs"].reverse(),
    "first input not logprobs": lambda d: d["inputs"][0].update(name="lp") or _node(d, "logprobs").update(target="lp"),
    "duplicate node name": _set("mul", name="exp"),
    "deep arguments": _set("clamp", args=[{"ref": "exp"}, [[[[[[[[[[0.8]]]]]]]]]], 1.2]),
}


def _insert_many(data: dict) -> None:
    nodes = data["graph"]["nodes"]
    extra = [{"op": "call_method", "name": f"n{i}", "target": "neg", "args": [{"ref": "exp"}]} for i in range(600)]
    data["graph"]["nodes"] = nodes[:-1] + extra + nodes[-1:]


REFUSED["too many nodes"] = _insert_many


def test_the_traced_graph_passes_the_check():
    spec = good_spec()
    check_custom_loss(spec.inputs, spec.graph)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_the_check_refuses(name):
    spec = mutated(REFUSED[name])
    with pytest.raises(InvalidCustomLoss) as info:
        check_custom_loss(spec.inputs, spec.graph)
    assert info.value.param.startswith(("graph", "inputs"))
    with pytest.raises(InvalidCustomLoss):  # the worker refuses it too, before anything runs
        CustomLoss(spec)


def test_node_limit_is_the_documented_one():
    assert len(mutated(_insert_many).graph.nodes) > MAX_CUSTOM_LOSS_NODES


# ------------------------------------------------------------------------------------------ failing at run time


def non_scalar(logprobs, advantages):
    return logprobs * advantages, {}


def overflowing(logprobs, advantages):
    loss = torch.exp(-logprobs * 1e4).sum()
    return loss, {}


@pytest.mark.parametrize(
    "fn, inputs, message",
    [
        (ppo_like, {"logprob_ref": torch.zeros(4), "advantages": torch.ones(9)}, "size"),
        (non_scalar, {"advantages": torch.ones(9)}, "scalar"),
        (overflowing, {"advantages": torch.ones(9)}, "finite"),
    ],
)
def test_a_graph_that_fails_at_run_time_raises(fn, inputs, message):
    ranks = {"logprobs": 1} | {name: 1 for name in inputs}
    loss_fn = CustomLoss(spec_of(fn, ranks))
    with pytest.raises(Exception, match=message):
        loss_fn(-torch.rand(9) - 0.5, inputs)


def test_a_failing_custom_loss_fails_only_its_own_request():
    """Two tenants in one pass: A's custom loss breaks on its inputs, B's cross-entropy request is unaffected
    (result and adapter gradients equal to B's pass alone)."""
    lm = shared_model("smollm2")
    slot_a = register(lm, make_adapter(lm, 4, seed=1, b_std=0.01))
    slot_b = register(lm, make_adapter(lm, 4, seed=2, b_std=0.01))
    tokens = token_ids(8, seed=5)
    broken = ce_datum(tokens)
    broken.inputs |= {"logprob_ref": torch.zeros(3), "advantages": torch.ones(7)}  # wrong length: cannot broadcast
    item_a = WorkItem(slot_a, [broken], "custom", custom_loss=CustomLoss(good_spec()))
    item_b = WorkItem(slot_b, [ce_datum(tokens)], "cross_entropy")

    alone = isolated_forward_backward(lm, [WorkItem(slot_b, [ce_datum(tokens)], "cross_entropy")], 4096)
    grads_alone = [p.grad.clone() for p in lm.router.adapters[slot_b].parameters()]
    for p in lm.router.adapters[slot_b].parameters():
        p.grad = None
    mixed = isolated_forward_backward(lm, [item_a, item_b], 4096)

    assert isinstance(mixed[0], ItemFailure) and mixed[0].own
    assert "custom loss 'ppo_like' failed on datum 0" in str(mixed[0].error)
    assert isinstance(mixed[1], ItemResult) and isinstance(alone[0], ItemResult)
    assert mixed[1].loss_sum == pytest.approx(alone[0].loss_sum, rel=1e-5)
    for p, g in zip(lm.router.adapters[slot_b].parameters(), grads_alone):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None or not p.grad.abs().sum() for p in lm.router.adapters[slot_a].parameters())


def test_custom_loss_in_the_trainer_matches_a_reference_from_the_logprobs():
    """The custom loss run by the trainer: its loss:sum and metrics equal `ppo_like` applied to the trainer's own
    target logprobs (a forward with cross_entropy), datum by datum, and the custom metrics come back reduced."""
    lm = shared_model("smollm2")
    slot = register(lm, make_adapter(lm, 4, seed=3, b_std=0.01))
    gen = np.random.default_rng(7)
    data = []
    for seed in (11, 12):
        tokens = token_ids(7, seed=seed)
        datum = ce_datum(tokens)
        datum.inputs |= {
            "logprob_ref": torch.tensor(gen.uniform(-9, -7, 6), dtype=torch.float32),
            "advantages": torch.tensor(gen.normal(size=6), dtype=torch.float32),
        }
        data.append(datum)
    forward = isolated_forward_backward(lm, [WorkItem(slot, data, "cross_entropy", forward_only=True)], 4096)[0]
    custom = isolated_forward_backward(
        lm, [WorkItem(slot, data, "custom", forward_only=True, custom_loss=CustomLoss(good_spec()))], 4096
    )[0]
    assert isinstance(forward, ItemResult) and isinstance(custom, ItemResult)
    refs = [ppo_like(lp, d.inputs["logprob_ref"], d.inputs["advantages"]) for lp, d in zip(forward.logprobs, data)]
    assert custom.loss_sum == pytest.approx(sum(float(loss) for loss, _ in refs), rel=1e-5)
    assert custom.metrics["custom/ppo_like:sum"] == pytest.approx(custom.loss_sum, rel=1e-6)
    mean_ratio = sum(float(m["custom/ratio:mean"]) for _, m in refs) / len(refs)
    assert custom.metrics["custom/ratio:mean"] == pytest.approx(mean_ratio, rel=1e-5)


def outer(logprobs, advantages):
    grid = logprobs[:, None] * advantages[None, :]  # [T, T]
    cube = grid[:, :, None] * logprobs[None, None, :]  # [T, T, T]
    return cube.sum(), {}


def doubling(logprobs, advantages):
    x = logprobs
    for _ in range(12):
        x = torch.cat([x, x])
    return (x * advantages.sum()).sum(), {}


def masked(logprobs, advantages):
    chosen = logprobs[advantages > 0]  # a data-dependent shape: checked on the real result
    return -chosen.sum(), {}


@pytest.mark.parametrize("fn", [outer, doubling])
def test_a_graph_that_would_blow_up_memory_is_refused_before_the_step_runs(fn, monkeypatch):
    loss_fn = CustomLoss(spec_of(fn, {"logprobs": 1, "advantages": 1}))
    real_calls: list[int] = []  # the sizes of the values computed on real (non-meta) tensors
    spied = [dataclasses.replace(step, call=_spy(step.call, real_calls)) for step in loss_fn.steps]
    monkeypatch.setattr(loss_fn, "steps", spied)
    n = 128
    with pytest.raises(ValueError, match="more than 64x"):
        loss_fn(-torch.rand(n), {"advantages": torch.randn(n)})
    assert all(size <= 64 * n for size in real_calls)


def _spy(call, sizes: list[int]):
    def wrapped(*args, **kwargs):
        out = call(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.device.type != "meta":
            sizes.append(out.numel())
        return out

    return wrapped


def test_data_dependent_shapes_still_run():
    loss_fn = CustomLoss(spec_of(masked, {"logprobs": 1, "advantages": 1}))
    lp, adv = -torch.rand(9), torch.tensor([1.0, -1.0] * 4 + [2.0])
    loss, _ = loss_fn(lp, {"advantages": adv})
    assert float(loss) == pytest.approx(float(-lp[adv > 0].sum()))
