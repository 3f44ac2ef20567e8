"""gpu_kernels.lora_reference: the batched (per-row gathered) decode path and the CPU's grouped-matmul path equal
per-segment deltas.

- Three adapters of one rank with different scales over 7 rows of (T=3) tokens: without autograd the batched path
  is taken and matches per-segment deltas (atol 1e-5); with a row left on the base model or with mixed ranks the
  result is the same function.
- The grouped path (`torch._grouped_mm`): flat tokens and rows of sequences, adapters listed out of order, ranks
  1-8 (padded to one), base-model rows before, between and after the segments, under autograd with an expanded
  output gradient (what `.sum()` hands back) and a random one: the output and the grads of x and every A and B
  equal a per-segment loop's (atol 1e-5); a misaligned view of x is realigned; widths `_grouped_mm` cannot align
  (6 floats) take the per-segment path.
"""

from __future__ import annotations

import pytest
import torch

from gpu_kernels import lora_reference
from gpu_kernels.lora_reference import LoraFactors, StackCache, _batchable, add_segment_deltas, lora_delta


def factors(rank: int, seed: int, scale: float) -> LoraFactors:
    gen = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(rank, 16, generator=gen), torch.randn(12, rank, generator=gen), scale)


def expected(y: torch.Tensor, x: torch.Tensor, segments) -> torch.Tensor:
    out = y.clone()
    for start, end, f in segments:
        out[start:end] += lora_delta(x[start:end], f)
    return out


def test_batched_decode_path_equals_per_segment_deltas() -> None:
    x, y = torch.randn(7, 3, 16), torch.randn(7, 3, 12)
    segments = [(3, 5, factors(4, 2, 0.5)), (0, 3, factors(4, 1, 2.0)), (5, 7, factors(4, 3, 1.0))]
    assert _batchable(segments, 7)
    with torch.no_grad():
        got = add_segment_deltas(y, x, segments)
    torch.testing.assert_close(got, expected(y, x, segments), atol=1e-5, rtol=1e-5)


def test_partial_cover_or_mixed_ranks_fall_back_to_segments() -> None:
    x, y = torch.randn(5, 1, 16), torch.randn(5, 1, 12)
    uncovered = [(0, 2, factors(4, 1, 1.0)), (3, 5, factors(4, 2, 1.0))]
    mixed = [(0, 2, factors(4, 1, 1.0)), (2, 5, factors(8, 2, 1.0))]
    assert not _batchable(uncovered, 5) and not _batchable(mixed, 5)
    with torch.no_grad():
        for segments in (uncovered, mixed):
            torch.testing.assert_close(add_segment_deltas(y, x, segments), expected(y, x, segments))


def test_cached_stacks_follow_in_place_updates_and_new_compositions() -> None:
    x, y = torch.randn(4, 1, 16), torch.randn(4, 1, 12)
    first, second = factors(4, 1, 1.0), factors(4, 2, 1.0)
    cache = StackCache()
    with torch.no_grad():
        segments = [(0, 2, first), (2, 4, second)]
        add_segment_deltas(y, x, segments, cache, "w")
        first.a.mul_(3.0)  # an optimizer step on a resident adapter
        torch.testing.assert_close(add_segment_deltas(y, x, segments, cache, "w"), expected(y, x, segments))
        swapped = [(0, 1, second), (1, 4, first)]
        torch.testing.assert_close(add_segment_deltas(y, x, swapped, cache, "w"), expected(y, x, swapped))


def trainable(rank: int, seed: int, scale: float, d_in: int = 16, d_out: int = 12) -> LoraFactors:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, d_in, generator=gen).requires_grad_()
    return LoraFactors(a, torch.randn(d_out, rank, generator=gen).requires_grad_(), scale)


def loop_reference(y: torch.Tensor, x: torch.Tensor, segments) -> torch.Tensor:
    parts, at = [], 0
    for start, end, f in sorted(segments, key=lambda seg: seg[0]):
        parts += [y.new_zeros((start - at, *y.shape[1:])), lora_delta(x[start:end], f)]
        at = end
    return y + torch.cat([*parts, y.new_zeros((y.shape[0] - at, *y.shape[1:]))])


def outputs_and_grads(fn, x, segments, upstream):
    out = fn()
    leaves = [x, *(p for _, _, f in segments for p in (f.a, f.b))]
    loss = out.sum() if upstream is None else (out * upstream).sum()
    return [out.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("shape", [(20,), (10, 3)], ids=["flat-tokens", "rows-of-sequences"])
@pytest.mark.parametrize("expanded_grad", [True, False], ids=["sum", "random-grad"])
def test_grouped_path_equals_per_segment_deltas_and_grads(shape, expanded_grad, monkeypatch) -> None:
    rows = shape[0]
    x = torch.randn(*shape, 16).requires_grad_()
    y = torch.randn(*shape, 12)
    segments = [(6, rows - 1, trainable(8, 3, 0.5)), (1, 4, trainable(1, 1, 2.0)), (4, 6, trainable(3, 2, 1.0))]
    calls = []
    grouped = lora_reference._grouped_delta
    monkeypatch.setattr(lora_reference, "_grouped_delta", lambda *args: calls.append(1) or grouped(*args))
    upstream = None if expanded_grad else torch.randn(*shape, 12)
    got = outputs_and_grads(lambda: add_segment_deltas(y, x, segments), x, segments, upstream)
    want = outputs_and_grads(lambda: loop_reference(y, x, segments), x, segments, upstream)
    assert calls
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_grouped_path_realigns_a_misaligned_view_and_skips_unalignable_widths(monkeypatch) -> None:
    calls = []
    grouped = lora_reference._grouped_delta
    monkeypatch.setattr(lora_reference, "_grouped_delta", lambda *args: calls.append(1) or grouped(*args))
    storage = torch.randn(9 * 16 + 1)
    x = storage[1:].view(9, 16)  # 4 bytes past an aligned address
    segments = [(0, 4, factors(4, 1, 1.0)), (4, 9, factors(2, 2, 0.5))]
    with torch.no_grad():
        torch.testing.assert_close(
            add_segment_deltas(torch.zeros(9, 12), x, segments), expected(torch.zeros(9, 12), x, segments)
        )
    assert len(calls) == 1
    narrow = [
        (0, 2, LoraFactors(torch.randn(2, 6), torch.randn(12, 2), 1.0)),
        (2, 3, LoraFactors(torch.randn(2, 6), torch.randn(12, 2), 1.0)),
    ]
    x6 = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            add_segment_deltas(torch.zeros(3, 12), x6, narrow), expected(torch.zeros(3, 12), x6, narrow)
        )
    assert len(calls) == 1
