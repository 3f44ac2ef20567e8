"""Target-token logprobs straight from hidden states, vocabulary logits computed a chunk of tokens at a time.

`target_logprobs(hidden, weight, targets)` is log_softmax(hidden @ weightᵀ)[target] for every token, forward and
backward, without ever holding the (tokens x vocab) logits: a chunk of at most `chunk_tokens` rows is projected,
reduced to its log-sum-exp and target logits, and dropped; backward recomputes each chunk's logits and turns them
into the hidden states' gradient (softmax minus one-hot, times the incoming gradient, times `weight`). Peak extra
memory is about three chunk-sized float32 logit blocks instead of several full-size ones (logits, their float copy,
log-softmax and its gradient), at the price of computing the output projection twice; when one chunk holds every
token, its logits are kept for the backward pass instead (no second projection, one chunk of memory).

Numerics follow the materialised path Loom used before: logits are computed in `weight`'s dtype and reduced in
float32, as `lm_head(hidden).float()` is. `targets` is (N,) (one target per token) or (N, K) (K candidates per
token, as `forward` with top-K targets asks). A LoRA on the output projection (Tinker's `train_unembed`) rides
along as a low-rank term whose gradients come out of the same chunks; a `weight` that requires grad gets its
gradient too.

This is the plain-torch path every device can run and the twin a fused GPU kernel is tested against.
Limits: no logit soft-capping or scaling (none of Loom's architectures has one).
"""

from __future__ import annotations

import torch


def chunk_rows(vocab_size: int, chunk_bytes: int) -> int:
    """Tokens per chunk so that one chunk's float32 logits take at most `chunk_bytes` (at least one token): 64 MiB
    is 341 tokens of SmolLM2's 49,152-word vocabulary, 110 of Qwen3's 151,936."""
    return max(1, chunk_bytes // (4 * vocab_size))


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, low: torch.Tensor | None, up: torch.Tensor | None
) -> torch.Tensor:
    logits = hidden.to(weight.dtype) @ weight.transpose(0, 1)
    if low is not None:  # a LoRA on the output projection: its delta in the factors' dtype, added in the base's
        logits = logits + (low @ up.transpose(0, 1)).to(logits.dtype)
    return logits.float()


class _TargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, low, up, targets, rows: int) -> torch.Tensor:
        picked = targets if targets.dim() == 2 else targets[:, None]
        out = torch.empty(picked.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        ctx.kept = None
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
            logits = _chunk_logits(hidden[part], weight, None if low is None else low[part], up)
            lse[part] = torch.logsumexp(logits, dim=-1)
            out[part] = logits.gather(-1, picked[part])
            if hidden.shape[0] <= rows and any(ctx.needs_input_grad):
                ctx.kept = logits  # one chunk holds every token: keep it rather than project again in backward
            del logits
        out -= lse[:, None]
        ctx.save_for_backward(hidden, weight, low, up, picked, lse)
        ctx.rows = rows
        return out if targets.dim() == 2 else out[:, 0]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, low, up, picked, lse = ctx.saved_tensors
        grad = (grad_out if grad_out.dim() == 2 else grad_out[:, None]).float()
        wants = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if wants[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants[1] else None
        grad_low = torch.empty_like(low) if wants[2] else None
        grad_up = torch.zeros_like(up) if wants[3] else None
        for start in range(0, hidden.shape[0], ctx.rows):
            part = slice(start, start + ctx.rows)
            chunk_low = None if low is None else low[part]
            # d out[i, k] / d logits[i, v] = [v == target_ik] - softmax(logits_i)[v]
            dlogits = ctx.kept if ctx.kept is not None else _chunk_logits(hidden[part], weight, chunk_low, up)
            ctx.kept = None
            dlogits = dlogits.sub_(lse[part, None]).exp_()
            dlogits.mul_(-grad[part].sum(-1, keepdim=True))
            dlogits.scatter_add_(-1, picked[part], grad[part])
            if grad_hidden is not None:
                grad_hidden[part] = (dlogits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += dlogits.transpose(0, 1) @ hidden[part].float()
            if grad_low is not None:
                grad_low[part] = (dlogits.to(up.dtype) @ up).to(low.dtype)
            if grad_up is not None:
                grad_up += (dlogits.transpose(0, 1) @ chunk_low.float()).to(up.dtype)
            del dlogits
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, grad_low, grad_up, None, None


def target_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_bytes: int,
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """log p(target) under logits = hidden @ weightᵀ (+ low @ upᵀ): hidden (N, H), weight (V, H), targets (N,) or
    (N, K) int64; float32 (N,) or (N, K). `low_rank` = (low (N, r), up (V, r)) adds a LoRA's delta: `low` is the
    tokens' scaled down-projection (scale · hidden @ Aᵀ, computed by the caller so autograd reaches A), `up` its B.
    Differentiable in every tensor that requires grad."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not make logits")
    if targets.shape[0] != hidden.shape[0] or targets.dim() not in (1, 2):
        raise ValueError(f"targets {tuple(targets.shape)} do not match {hidden.shape[0]} tokens")
    low, up = low_rank or (None, None)
    return _TargetLogprobs.apply(hidden, weight, low, up, targets, chunk_rows(weight.shape[0], chunk_bytes))
