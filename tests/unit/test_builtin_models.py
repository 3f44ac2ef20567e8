"""The built-in models are what the catalogue says they are, and the miniatures are faithful to the published
Kimi K2 and Qwen3-MoE configs and checkpoint formats they stand in for."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from contract.architectures import text_config_of
from contract.catalogue import BUILTIN_MODELS, SMOLLM2, TINY_KIMI_K2, TINY_QWEN3_MOE
from contract.catalogue_file import kv_bytes_per_token, train_bytes_per_token
from contract.model_size import model_size
from contract.published_models import published_config
from tests.unit.worker_fixtures import MODEL_CACHE
from worker.models.builtin_models import TINY_KIMI_K2_SHAPE, TINY_QWEN3_MOE_SHAPE
from worker.models.kimi_tokenizer import KimiTokenizer, load_tokenizer
from worker.models.model_folder import check_model_folder
from worker.models.registry import model_dir


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_catalogue_facts_match_the_built_folder(name: str) -> None:
    entry = BUILTIN_MODELS[name]
    folder = check_model_folder(model_dir(entry, MODEL_CACHE))
    size = model_size(folder.config)
    assert entry.arch == folder.architecture.model_class
    assert entry.vocab_size == text_config_of(folder.config)["vocab_size"]
    assert (entry.total_params, entry.active_params) == (size.total_params, size.active_params)
    assert entry.kv_bytes_per_token == kv_bytes_per_token(folder.config, entry.dtype)
    if entry is not SMOLLM2:  # SmolLM2's is measured (benchmarks/train_pass_memory.py), the miniatures' estimated
        assert entry.train_bytes_per_token == train_bytes_per_token(folder.config)


def test_tiny_kimi_k2_is_kimi_k2_shrunk_and_shipped_as_kimi_ships() -> None:
    path = model_dir(TINY_KIMI_K2, MODEL_CACHE)
    config = json.loads((path / "config.json").read_text())
    published = published_config("kimi-k2-instruct")
    assert config["model_type"] == "kimi_k2" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    changed = {k for k in published if config.get(k) != published[k]}
    assert changed == set(TINY_KIMI_K2_SHAPE)  # everything else as published, quantization_config included
    assert config["rope_scaling"]["type"] == "yarn" and config["routed_scaling_factor"] == 2.827
    assert config["scoring_func"] == "sigmoid" and config["first_k_dense_replace"] == 1
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    with safe_open(str(path / index[name]), framework="pt") as f:
        assert str(f.get_slice(name).get_dtype()) == "F8_E4M3"
        assert f"{name[: -len('weight')]}weight_scale_inv" in f.keys()
    tokenizer = load_tokenizer(path)
    assert isinstance(tokenizer, KimiTokenizer) and len(tokenizer) == 163840
    assert tokenizer.convert_tokens_to_ids(["<|im_user|>", "<|im_middle|>", "<|im_end|>"]) == [163587, 163601, 163586]
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 163586


def test_tiny_qwen3_moe_is_qwen3_30b_a3b_shrunk_with_the_real_tokenizer() -> None:
    path = model_dir(TINY_QWEN3_MOE, MODEL_CACHE)
    config = json.loads((path / "config.json").read_text())
    published = published_config("qwen3-30b-a3b")
    assert {k for k in published if config.get(k) != published[k]} == set(TINY_QWEN3_MOE_SHAPE)
    tokenizer = load_tokenizer(path)
    assert tokenizer.encode("Hello world!", add_special_tokens=False) == [9707, 1879, 0]
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<tool_call>"]) == [151644, 151657]
