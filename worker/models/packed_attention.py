"""Attention for packed training rows: each sequence of a packed row attends only to itself, computed sequence by
sequence, so a packed micro-batch costs the attention of its sequences (Σ nᵢ²), not of the whole row (N²).

`install_packed_attention(model)` switches a text model to `PACKED_ATTENTION`, a transformers attention function
(registered with `AttentionInterface`, its masks built as SDPA's) that behaves exactly like "sdpa" unless the
forward call carries `cu_seq_lens_q` (the sequences' boundaries, as flash-attn's varlen path takes them): then it
runs SDPA causally on each sequence's slice of queries, keys and values and concatenates the results. The trainer
passes those boundaries with a packed row (`worker/trainer.py`); every other caller (the sampler with its KV cache
and padding masks) goes through plain SDPA. On a GPU with flash-attn, transformers' own "flash_attention_2" reads
the same boundaries.

Limits: one SDPA call per sequence and layer (Python-level loop: about 20 µs each on a CPU); packed rows only
(batch of 1) and never with a KV cache.
"""

from __future__ import annotations

import itertools

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

PACKED_ATTENTION = "loom_packed_sdpa"
BOUNDARY_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA over (1, heads, N, d) queries split at `cu_seq_lens_q` (each slice causal, no mask), else plain SDPA."""
    bounds = kwargs.get("cu_seq_lens_q")
    rest = {k: v for k, v in kwargs.items() if k not in BOUNDARY_KWARGS}
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **rest)
    edges = bounds.tolist()
    outputs = [
        sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout, scaling, True, **rest
        )[0]
        for a, b in zip(edges, edges[1:])
    ]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def install_packed_attention(model: torch.nn.Module) -> None:
    """Run `model`'s attention through `packed_sdpa` (a text model loaded with "sdpa")."""
    model.set_attn_implementation(PACKED_ATTENTION)


def boundaries(lengths: list[int], device: torch.device) -> dict[str, torch.Tensor | int]:
    """The forward keyword arguments that mark a packed row's sequences of `lengths` tokens."""
    edges = torch.tensor(list(itertools.accumulate(lengths, initial=0)), dtype=torch.int32, device=device)
    longest = max(lengths)
    return {"cu_seq_lens_q": edges, "cu_seq_lens_k": edges, "max_length_q": longest, "max_length_k": longest}
