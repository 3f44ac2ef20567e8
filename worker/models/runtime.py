"""How one worker runs its base model: on which device, in which dtype, and the memory-for-compute trades of its
training passes.

`runtime_for(settings)` resolves the settings (`device`, `base_dtype`, `logprob_chunk_bytes`,
`activation_checkpoint_tokens`, `pack_sequences`) against this machine (and, through `ModelRuntime.base_dtype`, the
catalogue entry): `auto` is the first CUDA GPU when torch sees one, in bfloat16, else the CPU in the entry's dtype.
Adapters and optimizer state are float32 on the same device whatever the base's dtype (`worker/lora/adapter.py`).

Limits: one device per worker process (a ZeRO-3 group uses DeepSpeed's placement instead); quantised bases are
dequantised to the dtype here (no fp8 compute path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from contract.catalogue import BaseModelEntry
from contract.settings import DEFAULT_CHECKPOINT_TOKENS, DEFAULT_LOGPROB_CHUNK_BYTES, Settings

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelRuntime:
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None
    """The base's dtype; None: the catalogue entry's."""
    logprob_chunk_bytes: int = DEFAULT_LOGPROB_CHUNK_BYTES
    """Float32 logit bytes a training pass holds at once (`gpu_kernels/chunked_logprobs.py`); 0 materialises all."""
    checkpoint_tokens: int = DEFAULT_CHECKPOINT_TOKENS
    """Micro-batches of at least this many tokens run with activation checkpointing; 0 = never."""
    pack_sequences: bool = True
    """A text model's training micro-batch packs its sequences into one row (`worker/trainer.py`)."""

    def base_dtype(self, entry: BaseModelEntry) -> torch.dtype:
        return self.dtype or TORCH_DTYPES[entry.dtype]


def resolve_device(name: str) -> torch.device:
    """`auto` → `cuda` when torch sees a GPU, else `cpu`; anything else as torch spells it. `ValueError` for a
    device this process cannot use."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA GPU on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: workers run on `cpu` or `cuda`")
    return device


def runtime_for(settings: Settings) -> ModelRuntime:
    device = resolve_device(settings.device)
    dtype = None
    if settings.base_dtype != "auto":
        dtype = TORCH_DTYPES[settings.base_dtype]
    elif device.type == "cuda":
        dtype = torch.bfloat16
    return ModelRuntime(
        device, dtype, settings.logprob_chunk_bytes, settings.activation_checkpoint_tokens, settings.pack_sequences
    )
