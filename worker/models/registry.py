"""The worker's half of the model catalogue: where each base model's files come from, and where LoRA goes.

The catalogue itself (ids, architecture, vocabulary, context; `contract/catalogue.py`) is shared with the API.
Here, per catalogue entry, is the local folder holding its `save_pretrained` files (`model_dir`: the operator's
local source as is; an `s3://` source downloaded once into the model cache; a built-in built there once by
`worker/models/builtin_models.py`), and per architecture which module names belong to attention, MLP, routed
experts and unembedding for LoRA targeting (`lora_targets`; a catalogue entry may name its own).

Limits: weights never come from a hub; a folder in the model cache is built or downloaded once and never refreshed
(delete it to take a new copy).
"""

from __future__ import annotations

from pathlib import Path

from contract.catalogue import BaseModelEntry, LoraTargets
from worker.models.builtin_models import BUILDERS
from worker.models.folder_once import folder_once
from worker.models.model_folder import fetch_s3_folder

_DENSE_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_DENSE_MLP = ("gate_proj", "up_proj", "down_proj")
_FUSED_EXPERTS = ("gate_up_proj", "down_proj")
QWEN3_VL_VISION = ("qkv", "proj", "linear_fc1", "linear_fc2")
"""Qwen3-VL's vision blocks (attention `qkv`/`proj`, MLP `linear_fc1`/`linear_fc2`) and patch mergers."""
LORA_TARGETS: dict[str, LoraTargets] = {
    "LlamaForCausalLM": LoraTargets(attn=_DENSE_ATTN, mlp=_DENSE_MLP),
    "Qwen3ForCausalLM": LoraTargets(attn=_DENSE_ATTN, mlp=_DENSE_MLP),
    "Qwen3MoeForCausalLM": LoraTargets(attn=_DENSE_ATTN, mlp=_DENSE_MLP, experts=_FUSED_EXPERTS),
    "Qwen3VLForConditionalGeneration": LoraTargets(attn=_DENSE_ATTN, mlp=_DENSE_MLP, vision=QWEN3_VL_VISION),
    "Qwen3VLMoeForConditionalGeneration": LoraTargets(
        attn=_DENSE_ATTN, mlp=_DENSE_MLP, experts=_FUSED_EXPERTS, vision=QWEN3_VL_VISION
    ),
    "DeepseekV3ForCausalLM": LoraTargets(
        attn=("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
        mlp=_DENSE_MLP,
        experts=_FUSED_EXPERTS,
    ),
}


def lora_targets(entry: BaseModelEntry) -> LoraTargets:
    """The modules LoRA wraps in `entry`'s model: its own list, else its architecture's."""
    if entry.lora_targets is not None:
        return entry.lora_targets
    try:
        return LORA_TARGETS[entry.arch]
    except KeyError:
        raise ValueError(f"{entry.name}: no LoRA targets known for architecture {entry.arch}") from None


def model_dir(entry: BaseModelEntry, model_cache_dir: Path) -> Path:
    """The local folder holding the model's `save_pretrained` files, materialised first when needed."""
    target = entry.folder(model_cache_dir)
    if entry.source is None:
        return folder_once(target, "config.json", BUILDERS[entry.name])
    if entry.source.startswith("s3://"):
        return fetch_s3_folder(entry.source, target)
    return target
