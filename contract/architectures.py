"""The model architectures Loom can serve, keyed by a `config.json`'s `model_type`.

An `Architecture` names the transformers configuration and causal-LM classes a model folder loads into, and the
facts the API derives from a config without loading anything (vocabulary, context length). Kimi K2 ships
`model_type: kimi_k2` with its own remote-code classes; its layout is DeepSeek-V3's, so it loads into
transformers' DeepseekV3 classes (no remote code is ever run).

Qwen3-VL (dense and MoE) loads into its `...ForConditionalGeneration` class: a vision tower and merger in front of
a Qwen3 language model whose facts (vocabulary, context) sit in the config's `text_config`.

Limits: causal language models (Llama, Qwen3 dense, Qwen3-MoE, DeepSeek-V3 / Kimi K2) and Qwen3-VL only; an
architecture not listed here is refused when the catalogue is read, before any weights are touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Architecture:
    model_type: str
    """`config.json` `model_type`."""
    config_class: str
    """The transformers configuration class the config loads into."""
    model_class: str
    """The transformers causal-LM class (also the catalogue's `arch`)."""
    moe: bool
    """Whether the MLPs are routed experts (fused 3-D expert parameters in transformers 5)."""
    vision: bool = False
    """A vision-language model (its language model's facts are in `text_config`)."""


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "LlamaConfig", "LlamaForCausalLM", moe=False),
        Architecture("qwen3", "Qwen3Config", "Qwen3ForCausalLM", moe=False),
        Architecture("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", moe=True),
        Architecture("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM", moe=True),
        Architecture("kimi_k2", "DeepseekV3Config", "DeepseekV3ForCausalLM", moe=True),
        Architecture("qwen3_vl", "Qwen3VLConfig", "Qwen3VLForConditionalGeneration", moe=False, vision=True),
        Architecture("qwen3_vl_moe", "Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", moe=True, vision=True),
    )
}


class UnsupportedArchitecture(ValueError):
    """A model folder's config names an architecture Loom cannot serve."""


def architecture_of(config: Mapping[str, Any], source: str) -> Architecture:
    """The architecture of a parsed `config.json` read from `source` (named in the error)."""
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        raise UnsupportedArchitecture(
            f"{source}: model_type {model_type!r} is not supported; Loom serves {sorted(ARCHITECTURES)}"
        )
    return arch


def text_config_of(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a parsed `config.json`: its `text_config` for a vision-language model, else
    the config itself."""
    text = config.get("text_config")
    return text if isinstance(text, Mapping) else config


def max_context_of(config: Mapping[str, Any]) -> int:
    """The longest sequence the config allows (`max_position_embeddings`, which already counts any YaRN scaling)."""
    return int(text_config_of(config).get("max_position_embeddings") or 0)
