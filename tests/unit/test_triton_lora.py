"""gpu_kernels' Triton multi-LoRA kernels against their torch reference twins: outputs and every gradient.

Without CUDA the kernels run in Triton's interpreter on CPU (TRITON_INTERPRET=1, which tests/conftest.py sets
before anything imports triton); with CUDA, compiled, on the GPU. Compared (kernel vs `lora_reference`, same inputs and output grad):
the delta added to y, grad x and grad A, grad B of every adapter (a segment with no rows: zeros against the
reference's none), for
- row segments: 1 adapter over all rows of sequences; 16 adapters of ranks 1-16 over flat tokens, listed out of
  order, with empty segments, uneven lengths (one past a 32-row tile), and base-model rows between them; mixed
  ranks over rows of sequences with a base-model row;
- token groups with ids absent from the factors (-1, the base model, and an adapter without this weight);
- token-expert pairs keyed by (adapter, expert) (`dispatch.add_expert_deltas`), and a routed-experts layer
  (`MultiLoraExperts`) with its kernel path against its expert-by-expert reference loop;
each in float32 and bfloat16 (factors and x bf16 on both sides): every tensor's largest absolute difference is
at most 1e-5 (float32) or 3e-2 (bfloat16) of the reference tensor's largest magnitude.
The `gpu` test runs a layer-sized case on CUDA and prints kernel and reference times (no timing assert).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

CUDA = torch.cuda.is_available()
pytest.importorskip("triton", reason="triton is not installed (the `dev` extra installs it)")

from gpu_kernels import lora_reference, segmented_lora  # noqa: E402
from gpu_kernels.dispatch import add_expert_deltas, use_kernels  # noqa: E402
from gpu_kernels.lora_reference import LoraFactors  # noqa: E402
from worker.lora.adapter import LoraSpec, TargetWeight, create_adapter  # noqa: E402
from worker.lora.layers import AdapterRouter, MultiLoraExperts  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
IN, OUT = 24, 20
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def make_factors(ranks: list[int], dtype: torch.dtype, seed: int, d_in: int = IN, d_out: int = OUT):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, rank in enumerate(ranks):
        a = (torch.randn(rank, d_in, generator=gen) / d_in**0.5).to(DEVICE, dtype).requires_grad_()
        b = (torch.randn(d_out, rank, generator=gen) / rank**0.5).to(DEVICE, dtype).requires_grad_()
        out.append(LoraFactors(a, b, 0.5 + 0.25 * (i % 3)))
    return out


def outputs_and_grads(fn, x: torch.Tensor, factors: list[LoraFactors], seed: int) -> list[torch.Tensor]:
    """fn's output and the grads of x and every A and B under a fixed random output grad (unused → zeros)."""
    out = fn()
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    leaves = [x, *(p for f in factors for p in (f.a, f.b))]
    grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    return [out.detach()] + [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]


def assert_agree(got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Each tensor's largest absolute difference, relative to the reference's largest magnitude, within tolerance
    (bfloat16: both sides round to 8 significant bits at different points, so only a relative bound holds)."""
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, i
        error = (g.float() - w.float()).abs().max().item() / max(w.float().abs().max().item(), 1e-6)
        assert error <= TOLERANCE[dtype], f"tensor {i}: relative max difference {error:.3g}"


SEGMENT_LAYOUTS = {
    # rows, tokens per row (0: flat tokens), segments (start, end, rank)
    "one-adapter": (5, 3, [(0, 5, 4)]),
    "16-adapters": (
        80,
        0,
        [
            (s, e, (1, 2, 4, 8, 16)[i % 5])
            for i, (s, e) in enumerate(
                [(40, 75), (0, 3), (3, 3), (4, 9), (9, 10), (10, 12), (12, 12), (13, 17), (17, 24), (24, 25)]
                + [(25, 27), (27, 30), (30, 30), (31, 35), (35, 38), (38, 40)]
            )
        ],
    ),
    "mixed-ranks-sequences": (6, 4, [(4, 6, 4), (0, 2, 8), (2, 3, 2)]),
}


@DTYPES
@pytest.mark.parametrize("layout", SEGMENT_LAYOUTS)
def test_segment_deltas_and_grads_match_the_reference(layout: str, dtype: torch.dtype) -> None:
    rows, tokens, spans = SEGMENT_LAYOUTS[layout]
    factors = make_factors([rank for _, _, rank in spans], dtype, seed=len(spans))
    segments = [(s, e, f) for (s, e, _), f in zip(spans, factors)]
    shape = (rows, tokens, IN) if tokens else (rows, IN)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype).requires_grad_()
    y = torch.randn((*shape[:-1], OUT), generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    got = outputs_and_grads(lambda: segmented_lora.add_segment_deltas(y, x, segments), x, factors, seed=3)
    want = outputs_and_grads(lambda: lora_reference.add_segment_deltas(y, x, segments), x, factors, seed=3)
    assert_agree(got, want, dtype)


@DTYPES
def test_grouped_deltas_and_grads_match_the_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    group_ids = torch.randint(-1, 6, (30,), generator=gen).to(DEVICE)
    factors = make_factors([4, 1, 8, 2, 4], dtype, seed=5)
    by_group = dict(zip([0, 1, 2, 4, 5], factors))  # group 3 has no factors for this weight
    x = torch.randn(30, IN, generator=gen).to(DEVICE, dtype).requires_grad_()
    y = torch.randn(30, OUT, generator=gen).to(DEVICE, dtype)
    got = outputs_and_grads(lambda: segmented_lora.add_grouped_deltas(y, x, group_ids, by_group), x, factors, 6)
    want = outputs_and_grads(lambda: lora_reference.add_grouped_deltas(y, x, group_ids, by_group), x, factors, 6)
    assert_agree(got, want, dtype)


def expert_factors(ranks: list[int], experts: int, dtype: torch.dtype, seed: int) -> list[LoraFactors]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for rank in ranks:
        a = (torch.randn(experts, rank, IN, generator=gen) / IN**0.5).to(DEVICE, dtype).requires_grad_()
        b = (torch.randn(experts, OUT, rank, generator=gen) / rank**0.5).to(DEVICE, dtype).requires_grad_()
        out.append(LoraFactors(a, b, 32 / rank))
    return out


@DTYPES
def test_expert_pairs_grouped_by_adapter_and_expert_match_the_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    adapter_ids = torch.randint(-1, 3, (40,), generator=gen).to(DEVICE)
    expert_ids = torch.randint(0, 4, (40,), generator=gen).to(DEVICE)
    factors = expert_factors([4, 8, 2], 4, dtype, seed=8)
    by_adapter = dict(enumerate(factors))
    x = torch.randn(40, IN, generator=gen).to(DEVICE, dtype).requires_grad_()
    y = torch.randn(40, OUT, generator=gen).to(DEVICE, dtype)

    def run(mode):
        return outputs_and_grads(
            lambda: add_expert_deltas(y, x, adapter_ids, expert_ids, by_adapter, 4, mode), x, factors, 9
        )

    assert_agree(run("triton"), run("reference"), dtype)


class Experts(nn.Module):
    """A routed-experts module of the layout MultiLoraExperts wraps (DeepseekV3 / Qwen3-MoE experts)."""

    def __init__(self, experts: int, hidden: int, inter: int, gen: torch.Generator) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inter, generator=gen) / inter**0.5)
        self.act_fn = nn.SiLU()


def test_experts_layer_kernel_path_matches_its_reference_loop() -> None:
    gen = torch.Generator().manual_seed(10)
    experts, hidden, inter = 4, 16, 8
    base = Experts(experts, hidden, inter, gen).to(DEVICE).requires_grad_(False)
    router = AdapterRouter()
    targets = [TargetWeight(f"e.{p}", "mlp", *dims, num_experts=experts) for p, dims in
               (("gate_up_proj", (hidden, 2 * inter)), ("down_proj", (inter, hidden)))]  # fmt: skip
    for slot, rank in enumerate((4, 2)):
        adapter = create_adapter(targets, LoraSpec(rank, slot, False, True, False))
        for a, b in adapter.params.values():
            b.data.copy_(torch.randn(b.shape, generator=gen))  # a fresh B is zero: give the deltas a value
            a.data, b.data = a.data.to(DEVICE), b.data.to(DEVICE)
        router.adapters[slot] = adapter
    layer = MultiLoraExperts(base, "e", router)
    x = torch.randn(15, hidden, generator=gen).to(DEVICE).requires_grad_()
    top_k = torch.stack([torch.randperm(experts, generator=gen)[:2] for _ in range(15)]).to(DEVICE)
    weights = torch.rand(15, 2, generator=gen).to(DEVICE)
    factors = [router.adapters[s].factors(t.name) for s in (0, 1) for t in targets]

    def run(mode):
        router.kernels = mode
        with router.route([0, 1, None]):  # 3 rows of 5 tokens; the last on the base model
            return outputs_and_grads(lambda: layer(x, top_k, weights), x, factors, 11)

    assert_agree(run("triton"), run("reference"), torch.float32)


def test_cpu_tensors_take_the_reference_unless_told_otherwise() -> None:
    x = torch.zeros(2, 3)
    assert not use_kernels(x) and not use_kernels(x, "reference") and use_kernels(x, "triton")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_layer_sized_kernels_on_cuda_match_the_reference_and_report_times() -> None:
    from benchmarks.lora_kernels import measure

    result = measure(tokens=4096, d_in=2048, d_out=2048, adapters=16, rank=16, dtype=torch.bfloat16)
    print(result)
    assert result["max_abs_diff"] < 5e-2 * result["max_abs_reference"]
