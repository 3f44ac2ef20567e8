"""The operator's catalogue file: entries derived from each source's config.json, refusals that name the file and
the problem, narrowing by `base_models` and pools, and what `loom models`, capabilities and /v1/models show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.cli import main as loom_main
from contract.catalogue import BUILTIN_MODELS, SMOLLM2
from contract.catalogue_file import CatalogueError, load_catalogue, served_catalogue
from contract.published_models import published_config
from contract.settings import Settings


def _folder(root: Path, name: str, config: dict) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _qwen3_8b(tmp_path: Path) -> Path:
    return _folder(tmp_path, "qwen3-8b", published_config("qwen3-8b"))


def _write(tmp_path: Path, text: str, suffix: str = ".yaml") -> Path:
    path = tmp_path / f"catalogue{suffix}"
    path.write_text(text)
    return path


def test_yaml_entry_takes_its_facts_from_the_folders_config(tmp_path: Path) -> None:
    folder = _qwen3_8b(tmp_path)
    path = _write(
        tmp_path,
        f"""
models:
  - id: Qwen/Qwen3-8B
    source: {folder}
    aliases: [qwen3-8b]
    dtype: bfloat16
    max_context_length: 32768
    max_lora_rank: 32
    chat_format: qwen3
    pool: big
""",
    )
    catalogue = load_catalogue(path)
    entry = catalogue.resolve("qwen3-8b")
    assert entry is not None and entry.name == "Qwen/Qwen3-8B"
    assert entry.arch == "Qwen3ForCausalLM"
    assert entry.vocab_size == 151936
    assert entry.max_context_length == 32768 and entry.max_lora_rank == 32
    assert entry.dtype == "bfloat16" and entry.chat_format == "qwen3" and entry.pool == "big"
    assert 8.1e9 < entry.total_params < 8.3e9 and entry.total_params == entry.active_params
    # 36 layers × 8 KV heads × 128 head dim × (K and V) × 2 bytes
    assert entry.kv_bytes_per_token == 36 * 8 * 128 * 2 * 2
    assert entry.folder(tmp_path / "cache") == folder
    assert set(BUILTIN_MODELS) <= set(catalogue.names)


def test_toml_catalogue_without_builtins_and_context_from_config(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "kimi", published_config("kimi-k2-instruct"))
    path = _write(
        tmp_path,
        f"""
builtins = false
[[models]]
id = "moonshotai/Kimi-K2-Instruct"
source = "{folder}"
chat_format = "kimi_k2"
""",
        ".toml",
    )
    catalogue = load_catalogue(path)
    assert catalogue.names == ["moonshotai/Kimi-K2-Instruct"]
    entry = catalogue.entries["moonshotai/Kimi-K2-Instruct"]
    assert entry.arch == "DeepseekV3ForCausalLM"  # model_type kimi_k2 loads into the DeepseekV3 classes
    assert entry.max_context_length == 131072 and entry.vocab_size == 163840
    assert 1.0e12 < entry.total_params < 1.1e12 and 3.1e10 < entry.active_params < 3.3e10


@pytest.mark.parametrize(
    ("body", "config", "expected"),
    [
        ("models:\n  - id: x\n    source: {folder}\n    dtyp: bfloat16\n", None, "models.0.dtyp: Extra inputs"),
        ("models:\n  - id: x\n    source: {folder}\n    dtype: float8\n", None, "models.0.dtype"),
        ("models: [\n", None, "not valid YAML"),
        ("models:\n  - id: x\n    source: {folder}\n", {"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        (
            "models:\n  - id: x\n    source: {folder}\n    max_context_length: 65536\n",
            "qwen3-8b",
            "exceeds",
        ),
        ("models:\n  - id: x\n    source: {folder}\n", {"model_type": "qwen3"}, "incomplete qwen3 config"),
        (
            "models:\n  - id: x\n    source: {folder}\n    aliases: [smollm2-135m-instruct]\n",
            "qwen3-8b",
            "'smollm2-135m-instruct' names two base models",
        ),
    ],
)
def test_bad_catalogues_are_refused_naming_the_file(tmp_path: Path, body: str, config, expected: str) -> None:
    if isinstance(config, str):
        config = published_config(config)
    folder = _folder(tmp_path, "m", config or published_config("qwen3-8b"))
    path = _write(tmp_path, body.format(folder=folder))
    with pytest.raises(CatalogueError) as err:
        load_catalogue(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value) or str(folder / "config.json") in str(err.value)


def test_a_source_without_config_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, f"models:\n  - id: x\n    source: {tmp_path / 'nowhere'}\n")
    with pytest.raises(CatalogueError, match="nowhere/config.json: cannot read"):
        load_catalogue(path)


def test_served_catalogue_narrows_by_name_and_pool(tmp_path: Path) -> None:
    folder = _qwen3_8b(tmp_path)
    path = _write(tmp_path, f"models:\n  - id: Qwen/Qwen3-8B\n    source: {folder}\n    pool: big\n")
    settings = Settings(data_dir=tmp_path, model_catalogue=path, base_models=["Qwen/Qwen3-8B", "smollm2-135m-instruct"])
    served = served_catalogue(settings)
    assert served.names == ["Qwen/Qwen3-8B", SMOLLM2.name]
    assert served.in_pool("big").names == ["Qwen/Qwen3-8B"]
    assert served.in_pool("default").names == [SMOLLM2.name]
    with pytest.raises(CatalogueError, match="unknown base model 'nope'"):
        served_catalogue(Settings(data_dir=tmp_path, model_catalogue=path, base_models=["nope"]))


def test_loom_models_lists_the_catalogue_with_sizes(tmp_path: Path, monkeypatch, capsys) -> None:
    folder = _qwen3_8b(tmp_path)
    path = _write(tmp_path, f"models:\n  - id: Qwen/Qwen3-8B\n    source: {folder}\n    dtype: bfloat16\n")
    monkeypatch.setenv("LOOM_MODEL_CATALOGUE", str(path))
    monkeypatch.setenv("LOOM_DATA_DIR", str(tmp_path))
    loom_main(["models"])
    lines = capsys.readouterr().out.splitlines()
    qwen = next(line for line in lines if line.startswith("Qwen/Qwen3-8B"))
    assert "Qwen3ForCausalLM" in qwen and "8.19B" in qwen and "15.26 GiB" in qwen and str(folder) in qwen
    assert any(line.startswith(SMOLLM2.name) and "built-in" in line for line in lines)


def test_a_bad_catalogue_ends_loom_with_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOOM_MODEL_CATALOGUE", str(_write(tmp_path, "models: 3\n")))
    with pytest.raises(SystemExit) as exit_:
        loom_main(["models"])
    assert "catalogue.yaml: models: Input should be a valid list" in str(exit_.value)


def test_a_vision_language_entry_gets_its_image_geometry_and_sizes_from_the_config(tmp_path: Path) -> None:
    """Qwen3-VL-MoE in transformers' default (30B-A3B-style) shape: the vision spec comes from the config and the
    entry's pixel range, and the parameter count is the transformers class's own."""
    import torch
    import transformers

    config = transformers.Qwen3VLMoeConfig()
    folder = _folder(tmp_path, "qwen3-vl-moe", config.to_dict() | {"model_type": "qwen3_vl_moe"})
    path = _write(
        tmp_path,
        f"models:\n  - id: Qwen/Qwen3-VL-30B-A3B-Instruct\n    source: {folder}\n    chat_format: qwen3\n"
        "    image_min_pixels: 3136\n    image_max_pixels: 1003520\n",
    )
    entry = load_catalogue(path).resolve("Qwen/Qwen3-VL-30B-A3B-Instruct")
    assert entry.arch == "Qwen3VLMoeForConditionalGeneration" and entry.vocab_size == 151936
    vision = entry.vision
    assert (vision.image_token_id, vision.vision_start_token_id, vision.vision_end_token_id) == (151655, 151652, 151653)
    g = vision.geometry
    assert (g.patch_size, g.merge_size, g.temporal_patch_size, g.min_pixels, g.max_pixels) == (16, 2, 2, 3136, 1003520)
    with torch.device("meta"):
        model = transformers.Qwen3VLMoeForConditionalGeneration(config)
    assert entry.total_params == sum(t.numel() for t in model.state_dict().values())
    assert entry.active_params < entry.total_params
    bad = _write(tmp_path, path.read_text().replace("image_min_pixels: 3136", "image_min_pixels: 9999999"), ".yml")
    with pytest.raises(CatalogueError, match="image_min_pixels"):
        load_catalogue(bad)
