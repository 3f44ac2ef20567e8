"""Loads a base model once, frozen, in float32, with multi-LoRA wrappers installed, plus its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from contract.catalogue import BaseModelEntry
from worker.lora.adapter import TargetWeight
from worker.lora.layers import AdapterRouter, install_multi_lora
from worker.models.kimi_tokenizer import load_tokenizer
from worker.models.registry import lora_targets, model_dir


@dataclass
class LoadedModel:
    spec: BaseModelEntry
    path: Path
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    router: AdapterRouter
    targets: list[TargetWeight]
    sharding: Any = None
    """With ZeRO-3 (`worker/sharded_base.py`): the `ShardedBase` that partitions `model`, kept alive with it."""

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


def load_base_model(entry: BaseModelEntry, model_cache_dir: Path) -> LoadedModel:
    """`entry`'s model from its folder under `model_cache_dir` (built there first if missing)."""
    path = model_dir(entry, model_cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    model.requires_grad_(False)
    router, targets = install_multi_lora(model, lora_targets(entry))
    tokenizer = load_tokenizer(path)
    return LoadedModel(entry, path, model, tokenizer, router, targets)
