"""Model folders through the catalogue: each supported architecture loads from a `save_pretrained` folder into
the same logits transformers gives, with LoRA wrappers in place, in float32 or bfloat16; a damaged folder fails
when the worker loads it, naming the file and the problem."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from contract.catalogue import SMOLLM2, TINY_QWEN3_MOE
from contract.catalogue_file import load_catalogue
from tests.unit.worker_fixtures import MODEL_CACHE, make_adapter, register, token_ids
from worker.models.loader import load_base_model
from worker.models.model_folder import INDEX, ModelFolderError
from worker.models.registry import model_dir
from worker.trainer import TrainDatum, WorkItem, run_forward_backward

VOCAB = 49152  # SmolLM2's tokenizer, borrowed by every test folder
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"intermediate_size": 128, "num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"intermediate_size": 128, "num_key_value_heads": 2, "head_dim": 16}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
        },
    ),  # fmt: skip
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "num_key_value_heads": 4,
        },
    ),  # fmt: skip
}
CONFIGS["kimi_k2"] = CONFIGS["deepseek_v3"]


def _tokenizer_files(out: Path) -> None:
    smol = model_dir(SMOLLM2, MODEL_CACHE)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smol / name).exists():
            shutil.copy(smol / name, out / name)


def _write_folder(out: Path, model_type: str) -> Path:
    config_class, model_class, extra = CONFIGS[model_type]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**COMMON, **extra, tie_word_embeddings=False)
    getattr(transformers, model_class)(config).save_pretrained(out, max_shard_size="2MB")
    if model_type == "kimi_k2":  # Kimi K2 ships its own model_type; Loom loads it into the DeepseekV3 classes
        raw = json.loads((out / "config.json").read_text())
        raw["model_type"] = "kimi_k2"
        (out / "config.json").write_text(json.dumps(raw))
    _tokenizer_files(out)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    return {mt: _write_folder(root / mt, mt) for mt in CONFIGS}


def _load(folder: Path, tmp_path: Path, model_id: str = "test/model"):
    catalogue = tmp_path / "catalogue.yaml"
    catalogue.write_text(f"builtins: false\nmodels:\n  - id: {model_id}\n    source: {folder}\n")
    entry = load_catalogue(catalogue).entries[model_id]
    return entry, load_base_model(entry, tmp_path / "cache")


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_each_architecture_loads_through_the_catalogue(folders, tmp_path: Path, model_type: str) -> None:
    folder = folders[model_type]
    assert len(list(folder.glob("model-*.safetensors"))) > 1 and (folder / INDEX).exists()
    entry, lm = _load(folder, tmp_path)
    assert entry.arch == CONFIGS[model_type][1] and entry.vocab_size == VOCAB
    # the kimi_k2 folder holds the deepseek_v3 folder's weights (same seed and shape) under Kimi's model_type
    same_weights = folders["deepseek_v3" if model_type == "kimi_k2" else model_type]
    reference = getattr(transformers, CONFIGS[model_type][1]).from_pretrained(str(same_weights), dtype=torch.float32)
    ids = torch.tensor([lm.tokenizer.encode("The quick brown fox jumps", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    kinds = {t.name.rsplit(".", 1)[-1] for t in lm.targets}
    assert {"q_proj" if model_type != "deepseek_v3" and model_type != "kimi_k2" else "q_a_proj", "o_proj"} <= kinds
    if model_type in ("qwen3_moe", "deepseek_v3", "kimi_k2"):
        assert {"gate_up_proj", "down_proj"} <= kinds  # LoRA reaches the fused routed experts


def test_bfloat16_entry_loads_in_bfloat16(folders, tmp_path: Path) -> None:
    catalogue = tmp_path / "catalogue.yaml"
    catalogue.write_text(f"builtins: false\nmodels:\n  - id: m\n    source: {folders['qwen3']}\n    dtype: bfloat16\n")
    lm = load_base_model(load_catalogue(catalogue).entries["m"], tmp_path / "cache")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


def _damaged(folders, tmp_path: Path) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(folders["llama"], copy)
    return copy


def _first_shard(folder: Path) -> tuple[str, str]:
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    name = sorted(weight_map)[0]
    return name, weight_map[name]


def _break_index(folder: Path) -> str:
    (folder / INDEX).write_text('{"weight_map": {')
    return f"{folder / INDEX}: not valid JSON"


def _remove_shard(folder: Path) -> str:
    _, shard = _first_shard(folder)
    (folder / shard).unlink()
    return f"{folder / shard}: missing; {INDEX} places"


def _drop_tensor_from_shard(folder: Path) -> str:
    name, shard = _first_shard(folder)
    tensors = load_file(folder / shard)
    del tensors[name]
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    return f"{folder / shard}: lacks 1 tensor(s) that {INDEX} places there (e.g. {name})"


def _unlisted_tensor(folder: Path) -> str:
    index = json.loads((folder / INDEX).read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shard = index["weight_map"].pop(name)
    (folder / INDEX).write_text(json.dumps(index))
    return f"{folder / shard}: holds 1 tensor(s) that {INDEX} does not list (e.g. {name})"


def _unlisted_shard(folder: Path) -> str:
    index = json.loads((folder / INDEX).read_text())
    name, shard = _first_shard(folder)
    del index["weight_map"][name]  # lm_head.weight fills a shard alone
    (folder / INDEX).write_text(json.dumps(index))
    return f"{folder / shard}: a weights file {INDEX} does not list"


def _truncate_shard(folder: Path) -> str:
    _, shard = _first_shard(folder)
    data = (folder / shard).read_bytes()
    (folder / shard).write_bytes(data[: len(data) // 2])
    return f"{folder / shard}: not a readable safetensors file"


def _drop_tensor_everywhere(folder: Path) -> str:
    index = json.loads((folder / INDEX).read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shard = index["weight_map"].pop(name)
    (folder / INDEX).write_text(json.dumps(index))
    tensors = load_file(folder / shard)
    del tensors[name]
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    return f"{folder / 'config.json'} describes 1 tensor(s) the checkpoint lacks (e.g. {name})"


def _wrong_config(folder: Path) -> str:
    raw = json.loads((folder / "config.json").read_text())
    raw["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(raw))
    return f"do not have the shape {folder / 'config.json'} implies"


def _unsupported(folder: Path) -> str:
    raw = json.loads((folder / "config.json").read_text())
    raw["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(raw))
    return f"{folder / 'config.json'}: model_type 'mamba' is not supported"


def _no_tokenizer(folder: Path) -> str:
    (folder / "tokenizer.json").unlink()
    return f"{folder}: no tokenizer files"


@pytest.mark.parametrize(
    "damage",
    [
        _break_index,
        _remove_shard,
        _drop_tensor_from_shard,
        _unlisted_tensor,
        _unlisted_shard,
        _truncate_shard,
        _drop_tensor_everywhere,
        _wrong_config,
        _no_tokenizer,
    ],
)
def test_a_damaged_folder_fails_at_load_naming_the_file(folders, tmp_path: Path, damage) -> None:
    folder = _damaged(folders, tmp_path)
    catalogue = tmp_path / "catalogue.yaml"
    catalogue.write_text(f"builtins: false\nmodels:\n  - id: m\n    source: {folder}\n")
    entry = load_catalogue(catalogue).entries["m"]
    expected = damage(folder)
    with pytest.raises(ModelFolderError) as err:
        load_base_model(entry, tmp_path / "cache")
    assert expected in str(err.value)


def test_an_unsupported_architecture_is_refused_by_the_catalogue_too(folders, tmp_path: Path) -> None:
    folder = _damaged(folders, tmp_path)
    expected = _unsupported(folder)
    catalogue = tmp_path / "catalogue.yaml"
    catalogue.write_text(f"models:\n  - id: m\n    source: {folder}\n")
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
        load_catalogue(catalogue)


def test_a_bfloat16_base_trains_float32_adapters_like_a_float32_base() -> None:
    """`dtype: bfloat16` halves the base; the LoRA factors (and so their gradients) stay float32."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        lm = load_base_model(dataclasses.replace(TINY_QWEN3_MOE, dtype=dtype), MODEL_CACHE)
        adapter = make_adapter(lm, 8, 0, b_std=0.01)
        tokens = token_ids(24, 1)
        datum = TrainDatum(tokens[:-1], {"target_tokens": torch.tensor(tokens[1:]), "weights": torch.ones(23)})
        (result,) = run_forward_backward(lm, [WorkItem(register(lm, adapter), [datum], "cross_entropy")])
        grads = torch.cat([p.grad.flatten() for pair in adapter.params.values() for p in pair])
        assert {p.dtype for pair in adapter.params.values() for p in pair} == {torch.float32}
        results[dtype] = (result.losses[0], grads)
    (loss32, grad32), (loss16, grad16) = results["float32"], results["bfloat16"]
    assert abs(loss16 - loss32) / loss32 < 1e-2
    assert float((grad16 - grad32).norm() / grad32.norm()) < 5e-2
