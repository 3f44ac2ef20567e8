"""Triton kernels for segmented multi-LoRA (SGMV style): rows sorted by adapter, one program per (segment, tile).

Two kernels cover the shrink x·Aᵀ, the expand ·Bᵀ·scale and their backward passes:
- `segmented_matmul`: Y[rows of s] = scale_s · X[rows of s] @ W_s, with W_s any strided (K, N) view of segment s's
  factor (so Aᵀ, Bᵀ, B and A are all the same kernel); grid (segment, row tile, column tile), tiles past a
  segment's end exit at once;
- `segment_outer`: G_s = scale_s · P[rows of s]ᵀ @ Q[rows of s] (the factor gradients); grid (segment, row tile
  of G_s, column tile of G_s), each program walks its segment's rows.

Segments are (start, end) row ranges, in any order, possibly empty, never overlapping; rows outside every segment
get zeros. Accumulation is float32; outputs take the dtype of the tensor they are written into. float32 inputs
use IEEE products (no TF32), so results track torch's float32 matmul. Under Triton's interpreter
(TRITON_INTERPRET=1, the CPU tests) tiles are upcast to float32 before each product: the interpreter (triton 3.9)
multiplies bfloat16 tiles as their raw uint16 storage; bfloat16 products are exact in float32, so the result is
the one the GPU computes.

Limits: factor gradients are reduced by one program per tile over the whole segment (no split-K), and the
block sizes are fixed, not autotuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_ROWS = 32
_BLOCK_COLS = 32
_BLOCK_INNER = 32


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _segmented_matmul_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    scale_ptr,
    start_ptr,
    end_ptr,
    K,
    N,
    stride_xm,
    stride_xk,
    stride_ws,
    stride_wk,
    stride_wn,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seg = tl.program_id(0)
    start = tl.load(start_ptr + seg)
    end = tl.load(end_ptr + seg)
    first_row = start + tl.program_id(1) * BLOCK_M
    if first_row < end:
        rows = (first_row + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        inner = tl.arange(0, BLOCK_K)
        w_seg = w_ptr + seg.to(tl.int64) * stride_ws
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + inner
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                mask=(rows[:, None] < end) & (ks[None, :] < K),
                other=0.0,
            )
            w = tl.load(
                w_seg + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                mask=(ks[:, None] < K) & (cols[None, :] < N),
                other=0.0,
            )
            acc += _dot(x, w, PRECISION, UPCAST)
        acc = acc * tl.load(scale_ptr + seg)
        tl.store(
            y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
            acc.to(y_ptr.dtype.element_ty),
            mask=(rows[:, None] < end) & (cols[None, :] < N),
        )


@triton.jit
def _segment_outer_kernel(
    p_ptr,
    q_ptr,
    g_ptr,
    scale_ptr,
    start_ptr,
    end_ptr,
    M,
    N,
    stride_pt,
    stride_pm,
    stride_qt,
    stride_qn,
    stride_gs,
    stride_gm,
    stride_gn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seg = tl.program_id(0)
    start = tl.load(start_ptr + seg)
    end = tl.load(end_ptr + seg)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    steps = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        ts = (t0 + steps).to(tl.int64)
        p_t = tl.load(
            p_ptr + ms[:, None] * stride_pm + ts[None, :] * stride_pt,
            mask=(ms[:, None] < M) & (ts[None, :] < end),
            other=0.0,
        )
        q = tl.load(
            q_ptr + ts[:, None] * stride_qt + ns[None, :] * stride_qn,
            mask=(ts[:, None] < end) & (ns[None, :] < N),
            other=0.0,
        )
        acc += _dot(p_t, q, PRECISION, UPCAST)
    acc = acc * tl.load(scale_ptr + seg)
    tl.store(
        g_ptr + seg.to(tl.int64) * stride_gs + ms[:, None] * stride_gm + ns[None, :] * stride_gn,
        acc.to(g_ptr.dtype.element_ty),
        mask=(ms[:, None] < M) & (ns[None, :] < N),
    )


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: IEEE for float32 tiles; bfloat16 tiles ignore it (Triton's default, TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def segmented_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    max_rows: int,
) -> torch.Tensor:
    """(T, K) rows times per-segment (S, K, N) weights → (T, N) in x's dtype; rows outside every segment are 0.

    `scales` (S,) float32, `starts`/`ends` (S,) int32 on x's device; `max_rows` bounds the longest segment."""
    out = x.new_zeros((x.shape[0], w.shape[2]))
    if max_rows == 0 or w.shape[2] == 0:
        return out
    grid = (w.shape[0], triton.cdiv(max_rows, _BLOCK_ROWS), triton.cdiv(w.shape[2], _BLOCK_COLS))
    _segmented_matmul_kernel[grid](
        x,
        w,
        out,
        scales,
        starts,
        ends,
        w.shape[1],
        w.shape[2],
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        BLOCK_M=_BLOCK_ROWS,
        BLOCK_N=_BLOCK_COLS,
        BLOCK_K=_BLOCK_INNER,
        PRECISION=_precision(x.dtype),
        UPCAST=triton.knobs.runtime.interpret,
    )
    return out


def segment_outer(
    p: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """Per segment s, scale_s · P[rows of s]ᵀ @ Q[rows of s]: (T, M) and (T, N) → (S, M, N) in p's dtype."""
    out = p.new_empty((starts.shape[0], p.shape[1], q.shape[1]))
    if out.numel() == 0:
        return out
    grid = (out.shape[0], triton.cdiv(out.shape[1], _BLOCK_ROWS), triton.cdiv(out.shape[2], _BLOCK_COLS))
    _segment_outer_kernel[grid](
        p,
        q,
        out,
        scales,
        starts,
        ends,
        out.shape[1],
        out.shape[2],
        p.stride(0),
        p.stride(1),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BLOCK_M=_BLOCK_ROWS,
        BLOCK_N=_BLOCK_COLS,
        BLOCK_T=_BLOCK_INNER,
        PRECISION=_precision(p.dtype),
        UPCAST=triton.knobs.runtime.interpret,
    )
    return out
