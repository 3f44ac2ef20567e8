"""Time of one mixed-adapter LoRA delta, forward + backward: the Triton kernels against the torch reference.

On one CUDA GPU, in the same run: `tokens` flat tokens split evenly over `adapters` adapters of one rank, delta
added to a (tokens, d_out) output, then backward to x and every A and B. Each path is timed with CUDA events
(median of --iters after --warmup calls); reported per adapter count: both times, reference/kernel (speedup),
and the largest absolute difference of the outputs against the reference's largest value.

Limits: CUDA only (the interpreter's times mean nothing); one layer's delta, not a model pass; equal segments.

    .venv/bin/python benchmarks/lora_kernels.py [--tokens 4096] [--d 4096] [--rank 16] [--adapters 1 4 16 64]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from gpu_kernels import lora_reference, segmented_lora
from gpu_kernels.lora_reference import LoraFactors


def cuda_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of `fn()` on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(
    tokens: int, d_in: int, d_out: int, adapters: int, rank: int, dtype: torch.dtype, iters: int = 20
) -> dict[str, float]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    factors = [
        LoraFactors(
            (torch.randn(rank, d_in, device="cuda", generator=gen, dtype=dtype) / d_in**0.5).requires_grad_(),
            (torch.randn(d_out, rank, device="cuda", generator=gen, dtype=dtype) / rank**0.5).requires_grad_(),
            2.0,
        )
        for _ in range(adapters)
    ]
    bounds = [tokens * i // adapters for i in range(adapters + 1)]
    segments = [(bounds[i], bounds[i + 1], f) for i, f in enumerate(factors)]
    x = torch.randn(tokens, d_in, device="cuda", generator=gen, dtype=dtype).requires_grad_()
    y = torch.randn(tokens, d_out, device="cuda", generator=gen, dtype=dtype)
    grad = torch.randn_like(y)
    leaves = [x, *(p for f in factors for p in (f.a, f.b))]

    def step(add) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            out = add(y, x, segments)
            torch.autograd.grad(out, leaves, grad)
            return out

        return run

    kernel, reference = step(segmented_lora.add_segment_deltas), step(lora_reference.add_segment_deltas)
    want = reference().detach().float()
    kernel_ms, reference_ms = cuda_ms(kernel, iters=iters), cuda_ms(reference, iters=iters)
    return {
        "adapters": adapters,
        "kernel_ms": kernel_ms,
        "reference_ms": reference_ms,
        "speedup": reference_ms / kernel_ms,
        "max_abs_diff": (kernel().detach().float() - want).abs().max().item(),
        "max_abs_reference": want.abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    print("adapters  kernel_ms  reference_ms  speedup  max_abs_diff / max_abs_reference")
    for n in args.adapters:
        r = measure(args.tokens, args.d, args.d, n, args.rank, torch.bfloat16, args.iters)
        print(
            f"{n:8d}  {r['kernel_ms']:9.3f}  {r['reference_ms']:12.3f}  {r['speedup']:7.2f}  "
            f"{r['max_abs_diff']:.3g} / {r['max_abs_reference']:.3g}"
        )


if __name__ == "__main__":
    main()
