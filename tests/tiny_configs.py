"""Shared by tests that build their own small Kimi K2 models: the built-in miniature's config as transformers'
DeepseekV3 configuration (tests shrink it further, e.g. its vocabulary)."""

from __future__ import annotations

from transformers import DeepseekV3Config

from worker.models.builtin_models import tiny_kimi_k2_config_dict
from worker.models.model_folder import transformers_config


def tiny_kimi_k2_config() -> DeepseekV3Config:
    return transformers_config(tiny_kimi_k2_config_dict())
