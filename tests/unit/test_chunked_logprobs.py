"""Chunked target logprobs, activation checkpointing and the worker runtime (device, dtype) give the results of the
plain paths.

- `gpu_kernels.chunked_logprobs.target_logprobs` equals log_softmax(hidden @ Wᵀ (+ LoRA)) gathered, for 1-D and
  top-K targets, chunk sizes that do and do not divide the tokens, and every gradient (hidden, W, the LoRA's low
  half and B); float32 atol 1e-5, bfloat16 within bfloat16 rounding.
- A SmolLM2 and a tiny Kimi K2 (MLA attention, routed experts with LoRA) training pass with adapters that train
  the output projection (`train_unembed`) and ones that do not gives the same logprobs, losses and adapter
  gradients padded (3 rows of 16) and packed (1 row of 31 tokens, which the test sees the embedding take; rows of
  equal length stay padded), with
  chunking on (one token per chunk: the harshest cut) and off (the whole logits block), and the same again with
  activation checkpointing forced on (logprobs atol
  1e-4; gradients within 5e-4 of each tensor's largest entry: the output projection's backward sums in another
  order, and that rounding travels back through 30 layers; measured ≤ 1.1e-4); afterwards the model's layers are
  back in eval mode without checkpointing.
- `runtime_for`: `auto` is the CPU in the entry's dtype on this GPU-less machine; `cuda` is refused here; a
  bfloat16 base on the CPU trains float32 adapters and scores like the float32 base to bfloat16 precision.
- `cap_heap_blocks` (the worker's malloc mmap threshold) is taken by glibc; 0 leaves glibc alone.
"""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from contract.catalogue import SMOLLM2
from contract.settings import Settings
from gpu_kernels.chunked_logprobs import target_logprobs
from tests.unit.worker_fixtures import (
    MODEL_CACHE,
    ce_datum,
    grads,
    make_adapter,
    register,
    shared_model,
    token_ids,
)
from worker.heap import cap_heap_blocks
from worker.models.loader import load_base_model
from worker.models.runtime import ModelRuntime, resolve_device, runtime_for
from worker.trainer import WorkItem, run_forward_backward


def _materialised(hidden, weight, targets, low=None, up=None):
    logits = hidden @ weight.T
    if low is not None:
        logits = logits + low @ up.T
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(-1, targets) if targets.dim() == 2 else logp.gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize("chunk_tokens", [1, 3, 7, 64])
@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("lora", [False, True])
def test_matches_the_materialised_softmax_and_its_gradients(chunk_tokens, top_k, lora) -> None:
    gen = torch.Generator().manual_seed(7)
    n, h, v, r = 13, 24, 97, 4
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, requires_grad=True)
    low = torch.randn(n, r, generator=gen, requires_grad=True) if lora else None
    up = torch.randn(v, r, generator=gen, requires_grad=True) if lora else None
    shape = (n,) if top_k is None else (n, top_k)
    targets = torch.randint(0, v, shape, generator=gen)
    upstream = torch.randn(shape, generator=gen)
    leaves = [t for t in (hidden, weight, low, up) if t is not None]

    want = _materialised(hidden, weight, targets, low, up)
    want_grads = torch.autograd.grad(want, leaves, upstream)
    got = target_logprobs(hidden, weight, targets, chunk_tokens * 4 * v, None if low is None else (low, up))
    got_grads = torch.autograd.grad(got, leaves, upstream)

    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_bfloat16_weight_rounds_like_the_materialised_path() -> None:
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 32, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(50, 32, generator=gen).bfloat16()
    targets = torch.randint(0, 50, (9,), generator=gen)
    want = _materialised(hidden, weight, targets)
    got = target_logprobs(hidden, weight, targets, 2 * 4 * 50)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # same bf16 matmul, same float32 reduction
    (g_got,) = torch.autograd.grad(got.sum(), hidden)
    (g_want,) = torch.autograd.grad(want.sum(), hidden)
    assert g_got.dtype == torch.bfloat16
    torch.testing.assert_close(g_got.float(), g_want.float(), atol=2e-2, rtol=2e-2)


def test_refuses_shapes_that_make_no_logits() -> None:
    with pytest.raises(ValueError, match="do not make logits"):
        target_logprobs(torch.zeros(3, 4), torch.zeros(5, 6), torch.zeros(3, dtype=torch.long), 1 << 20)
    with pytest.raises(ValueError, match="do not match"):
        target_logprobs(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long), 1 << 20)


def _pass(lm, runtime: ModelRuntime, adapters, slots, batches):
    """One training pass under `runtime`; the adapters' gradients and the logprobs and losses per item."""
    saved = lm.runtime
    lm.runtime = runtime
    try:
        for adapter in adapters:
            adapter.zero_grad()
        items = [WorkItem(slot, data, "cross_entropy") for slot, data in zip(slots, batches)]
        results = run_forward_backward(lm, items)
    finally:
        lm.runtime = saved
    return [grads(a) for a in adapters], results


def _assert_same_pass(got_grads, got, want_grads, want, grad_rtol: float) -> None:
    for g_item, w_item in zip(got, want):
        for g, w in zip(g_item.logprobs, w_item.logprobs):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
        assert g_item.losses == pytest.approx(w_item.losses, abs=1e-4)
    for got_adapter, want_adapter in zip(got_grads, want_grads):
        for name, w in want_adapter.items():
            scale = float(w.abs().max())
            assert float((got_adapter[name] - w).abs().max()) <= grad_rtol * scale + 1e-9, name


def _model_rows(lm, runtime, adapters, slots, batches) -> list[tuple[int, ...]]:
    """The token-id shapes the model was called with during one pass under `runtime`."""
    shapes = []
    hook = lm.model.get_input_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(a[0].shape)))
    try:
        _pass(lm, runtime, adapters, slots, batches)
    finally:
        hook.remove()
    return shapes


@pytest.mark.parametrize("model", ["smollm2", "tiny_kimi_k2"])
def test_training_pass_is_the_same_padded_packed_chunked_materialised_and_checkpointed(model) -> None:
    lm = shared_model(model)
    adapters = [make_adapter(lm, 4, 31, b_std=2e-3), make_adapter(lm, 8, 32, unembed=False, b_std=2e-3)]
    slots = [register(lm, a) for a in adapters]
    batches = [
        [ce_datum(token_ids(17, seed=1)), ce_datum(token_ids(6, seed=2))],
        [ce_datum(token_ids(11, seed=3))],
    ]
    padded = ModelRuntime(logprob_chunk_bytes=0, checkpoint_tokens=0, pack_sequences=False)
    packed = ModelRuntime(logprob_chunk_bytes=0, checkpoint_tokens=0)
    one_token_chunks = ModelRuntime(logprob_chunk_bytes=4 * lm.vocab_size, checkpoint_tokens=0)
    checkpointed = ModelRuntime(logprob_chunk_bytes=4 * lm.vocab_size, checkpoint_tokens=1)
    assert _model_rows(lm, padded, adapters, slots, batches) == [(3, 16)]  # 16, 5 and 10 input tokens
    assert _model_rows(lm, packed, adapters, slots, batches) == [(1, 31)]
    equal = [[ce_datum(token_ids(9, seed=5))], [ce_datum(token_ids(9, seed=6))]]
    assert _model_rows(lm, packed, adapters, slots, equal) == [(2, 8)]  # nothing to save: padded, one attention call
    want_grads, want = _pass(lm, padded, adapters, slots, batches)
    assert any(name.startswith("lm_head") for name in want_grads[0])  # the unembedding's LoRA is exercised
    for runtime in (packed, one_token_chunks, checkpointed):
        got_grads, got = _pass(lm, runtime, adapters, slots, batches)
        _assert_same_pass(got_grads, got, want_grads, want, 5e-4)
    layers = [m for m in lm.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and not any(m.training or m.gradient_checkpointing for m in layers)


def test_runtime_resolves_to_the_cpu_here() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="`cpu` or `cuda`"):
        resolve_device("meta")
    runtime = runtime_for(Settings())
    assert runtime.device == torch.device("cpu") and runtime.base_dtype(SMOLLM2) == torch.float32
    assert runtime_for(Settings(base_dtype="bfloat16")).base_dtype(SMOLLM2) == torch.bfloat16


def test_a_bfloat16_base_trains_float32_adapters() -> None:
    lm32 = shared_model("smollm2")
    lm16 = load_base_model(SMOLLM2, MODEL_CACHE, runtime_for(Settings(base_dtype="bfloat16")))
    assert {p.dtype for p in lm16.model.parameters()} == {torch.bfloat16}
    adapter16 = make_adapter(lm16, 4, 5, b_std=2e-3)
    adapter32 = make_adapter(lm32, 4, 5, b_std=2e-3)
    assert {p.dtype for p in adapter16.parameters()} == {torch.float32}
    data = [ce_datum(token_ids(20, seed=9))]
    got = run_forward_backward(lm16, [WorkItem(register(lm16, adapter16), data, "cross_entropy")])[0]
    want = run_forward_backward(lm32, [WorkItem(register(lm32, adapter32), data, "cross_entropy")])[0]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter16.parameters())
    # bfloat16 keeps 8 bits of mantissa: logprobs of O(10) agree to a few tenths, not to float32 precision
    torch.testing.assert_close(got.logprobs[0], want.logprobs[0], atol=0.5, rtol=0.05)
    assert abs(got.losses[0] - want.losses[0]) <= 0.02 * abs(want.losses[0])


def test_heap_cap_is_taken_by_glibc_and_zero_changes_nothing() -> None:
    import platform

    assert cap_heap_blocks(0) is False
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert cap_heap_blocks(Settings().malloc_mmap_threshold) is True
