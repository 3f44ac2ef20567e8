"""Shared by tests that build their own small Kimi K2 models: the built-in miniature's config as transformers'
DeepseekV3 configuration (tests shrink it further, e.g. its vocabulary)."""

from __future__ import annotations

import copy

from transformers import DeepseekV3Config

from worker.models.builtin_models import tiny_kimi_k2_config_dict


def tiny_kimi_k2_config() -> DeepseekV3Config:
    fields = {k: copy.deepcopy(v) for k, v in tiny_kimi_k2_config_dict().items() if k not in ("auto_map", "model_type")}
    return DeepseekV3Config(**fields)
