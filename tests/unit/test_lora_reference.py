"""gpu_kernels.lora_reference: the batched (per-row gathered) decode path equals the per-segment path.

Three adapters of one rank with different scales over 7 rows of (T=3) tokens: without autograd the batched
path is taken and matches per-segment deltas (atol 1e-6); with autograd, with a row left on the base model, or
with mixed ranks, the per-segment path is used (the result is the same function either way).
"""

from __future__ import annotations

import torch

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
