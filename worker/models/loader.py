"""Loads a base model once, frozen, with multi-LoRA wrappers installed, plus its tokenizer.

`load_base_model` takes a catalogue entry to a `LoadedModel`: the folder is materialised (`registry.model_dir`) and
checked (`model_folder.check_model_folder`), the config is read into the architecture's transformers classes
(`kimi_k2` into DeepseekV3's, never remote code), and the weights are loaded by transformers shard by shard
(per-expert checkpoint tensors fused into the classes' expert parameters; Kimi K2's fp8 block and int4
compressed-tensors weights dequantised on the way, `worker/models/quantized_checkpoints.py`) into the runtime's dtype
and moved to its device (`worker/models/runtime.py`).
Anything missing, unexpected or wrongly shaped fails here, at start-up, naming the file.

Limits: quantised weights are always dequantised (no fp8/int4 compute path yet); the whole dense model is held in
the worker's memory (a ZeRO-3 group partitions it instead, `worker/sharded_base.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from contract.architectures import text_config_of
from contract.catalogue import BaseModelEntry
from worker.lora.adapter import TargetWeight
from worker.lora.layers import AdapterRouter, install_multi_lora
from worker.models.kimi_tokenizer import load_tokenizer
from worker.models.model_folder import (
    ModelFolder,
    ModelFolderError,
    check_model_folder,
    loading_problems,
    require_tokenizer,
    transformers_config,
)
from worker.models.packed_attention import install_packed_attention
from worker.models.quantized_checkpoints import cast_leftovers, load_options, loading_quantization
from worker.models.registry import lora_targets, model_dir
from worker.models.runtime import ModelRuntime
from worker.models.tokenizer_export import PREPROCESSOR_CONFIG, export_tokenizer
from worker.models.vision_inputs import ImageEncoder, encoder_for


@dataclass
class LoadedModel:
    spec: BaseModelEntry
    path: Path
    model: torch.nn.Module
    tokenizer: Any
    """A transformers tokenizer (Kimi K2's tiktoken-based one for its folders)."""
    router: AdapterRouter
    targets: list[TargetWeight]
    sharding: Any = None
    """With ZeRO-3 (`worker/sharded_base.py`): the `ShardedBase` that partitions `model`, kept alive with it."""
    images: ImageEncoder | None = None
    """A vision-language model's image encoder (None for a text model)."""
    runtime: ModelRuntime = field(default_factory=ModelRuntime)
    """The device, dtype and memory trades this worker runs the model with."""

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.get_text_config().vocab_size)


def hf_config(folder: ModelFolder) -> transformers.PretrainedConfig:
    """The folder's config as its architecture's transformers configuration class, its quantisation as Loom loads
    it (`loading_quantization`: block-FP8 by Loom's own quantizer); `ValueError` for one Loom does not load."""
    quantization = loading_quantization(folder.config)
    overrides = {} if quantization is None else {"quantization_config": quantization}
    return transformers_config(folder.config, **overrides)


def load_weights(folder: ModelFolder, dtype: torch.dtype) -> torch.nn.Module:
    """The folder's model with dense `dtype` weights, frozen, in eval mode; a `ModelFolderError` if the weights do
    not match the config."""
    model_class = getattr(transformers, folder.architecture.model_class)
    try:
        config = hf_config(folder)
        model, info = model_class.from_pretrained(
            str(folder.path),
            config=config,
            attn_implementation="sdpa",
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **load_options(folder.config, dtype),
        )
    except ValueError as exc:
        raise ModelFolderError(f"{folder.path}: {exc}") from None
    problem = loading_problems(folder, info, tied=bool(getattr(config, "tie_word_embeddings", False)))
    if problem:
        raise ModelFolderError(problem)
    cast_leftovers(model, dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def check_entry_matches(entry: BaseModelEntry, folder: ModelFolder, tokenizer: Any) -> None:
    """The catalogue's facts about the model agree with its folder."""
    config_vocab = int(text_config_of(folder.config).get("vocab_size", 0))
    if entry.arch != folder.architecture.model_class or entry.vocab_size != config_vocab:
        raise ModelFolderError(
            f"{folder.path / 'config.json'}: a {folder.architecture.model_class} with vocabulary {config_vocab}, "
            f"but the catalogue says {entry.name} is a {entry.arch} with vocabulary {entry.vocab_size}"
        )
    if len(tokenizer) > config_vocab:
        raise ModelFolderError(
            f"{folder.path}: the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary {config_vocab}"
        )


def open_model(entry: BaseModelEntry, model_cache_dir: Path) -> tuple[ModelFolder, Any]:
    """`entry`'s checked folder (materialised under `model_cache_dir` first when it lives elsewhere) and its
    tokenizer, exported for clients: where the dense and the ZeRO-3 loaders both start."""
    folder = check_model_folder(model_dir(entry, model_cache_dir))
    require_tokenizer(folder.path)
    tokenizer = load_tokenizer(folder.path)
    check_entry_matches(entry, folder, tokenizer)
    processor = folder.path / PREPROCESSOR_CONFIG
    export_tokenizer(tokenizer, entry.tokenizer_folder(model_cache_dir), processor if processor.is_file() else None)
    return folder, tokenizer


def load_base_model(entry: BaseModelEntry, model_cache_dir: Path, runtime: ModelRuntime | None = None) -> LoadedModel:
    """`entry`'s model, from its folder, on `runtime`'s device in its dtype (default: the CPU, the entry's dtype),
    with multi-LoRA installed."""
    runtime = runtime or ModelRuntime()
    folder, tokenizer = open_model(entry, model_cache_dir)
    model = load_weights(folder, runtime.base_dtype(entry)).to(runtime.device)
    if entry.vision is None:  # a text model's training passes pack their sequences (`worker/trainer.py`)
        install_packed_attention(model)
    router, targets = install_multi_lora(model, lora_targets(entry))
    images = encoder_for(entry.vision)
    return LoadedModel(entry, folder.path, model, tokenizer, router, targets, images=images, runtime=runtime)
