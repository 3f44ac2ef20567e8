"""Kimi K2's quantised checkpoint formats (worker/models/quantized_checkpoints.py), written and loaded back.

A tiny DeepseekV3 (seed 0, float32, several shards) is quantised in both formats, block-FP8 twice: once with every
Linear dimension a multiple of the 128 block or below it, once with partial blocks at the edges (Kimi-K2-Instruct's
own shapes have them, e.g. `kv_a_proj_with_mqa` [576, 7168] with [5, 56] scales, which Loom's own dequantise op
reads and transformers 5.23's does not). Each test checks the layout against what Moonshot publishes, then loads
it dense and compares it with two models:

- the *reference*: the original folder with every quantised weight replaced by its dequantisation, computed here
  from the stored tensors without the loader's code (fp8 value x its block's scale; int4 nibbles, lowest bits
  first, minus 8, x the group's scale). Loading must be exact: equal weights, logits equal to float tolerance.
- the *original*: the error must be the format's. Per tensor, e4m3 keeps 3 mantissa bits, so rounding moves a
  value by at most 2^-4 of itself (about 2.7% RMS on Gaussian weights); int4 with scale absmax/7.5 per group of
  32 moves a value by at most absmax/15, about 15% of a Gaussian group's RMS (about 9% RMS error). The lower
  bounds make sure something was quantised. The logits cannot be bounded linearly from the weight errors, since
  top-k routing is discontinuous: Gaussian noise of 0.1% on the attention weights flipped one token's experts here
  and moved the logits by 3%. So the bound is the same network's sensitivity: the logits error must stay under
  twice that of Gaussian noise with each tensor's measured relative error (mean of three draws), and above zero.

What loading holds in memory at once is transformers' affair, and not deterministic (it materialises checkpoint
tensors in a thread pool): the rewrite's one-shard-at-a-time is tested instead, and benchmarks/quantized_load.py
measures the loads' peak memory.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM, FineGrainedFP8Config
from transformers.quantizers import AutoHfQuantizer

from tests.tiny_configs import tiny_kimi_k2_config
from worker.models import quantized_checkpoints
from worker.models.loader import load_weights
from worker.models.model_folder import check_model_folder
from worker.models.quantized_checkpoints import (
    FP8_BLOCK_METHOD,
    Fp8BlockConfig,
    Fp8BlockDequantize,
    dequantize_fp8_block,
    load_options,
    loading_quantization,
    quantize_fp8_block,
    quantize_int4_compressed,
)

FP8_BLOCK = 128
INT4_GROUP = 32
TOKENS = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
KIMI_K2_INSTRUCT_QUANTIZATION = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
KIMI_K2_THINKING_IGNORE = [
    "lm_head",
    "re:.*self_attn.*",
    "re:.*shared_experts.*",
    r"re:.*mlp\.(gate|up|gate_up|down)_proj.*",
]
WEIGHT_ERROR = {"fp8": (0.01, 2**-4), "int4": (0.05, 0.15)}
"""Bounds on a quantised tensor's relative L2 error (see the module docstring)."""
QUANTISED_SUFFIXES = ("_scale_inv", "weight_scale", "weight_packed", "weight_shape", "weight_zero_point")


def tiny_config(**overrides: int) -> DeepseekV3Config:
    config = tiny_kimi_k2_config()
    for key, value in {"vocab_size": 1000, **overrides}.items():
        setattr(config, key, value)
    return config


BLOCK_ALIGNED = {"qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16}
"""Every Linear dimension a multiple of 128 or below it."""
PARTIAL_BLOCKS = {"hidden_size": 192, "kv_lora_rank": 304}
"""Partial blocks at the edges (see `test_fp8_edges_folder_has_partial_blocks`): Kimi's `kv_a_proj_with_mqa`
[576, 7168] scaled down to [320, 192], with [3, 2] scales."""


def write_dense(folder: Path, config: DeepseekV3Config) -> None:
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(config).to(torch.float32).save_pretrained(folder, max_shard_size="300KB")
    assert len(list(folder.glob("*.safetensors"))) >= 4


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder (the tiny checkpoints fit in memory), checking the index against the shards."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as reader:
            for name in reader.keys():
                assert index["weight_map"][name] == shard.name
                found[name] = reader.get_tensor(name)
    assert set(found) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in found.values())
    return found


def is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    """Independent of the module's regex: 2-D weights in the layers, minus norms and the router."""
    return (
        name.startswith("model.layers.")
        and tensor.ndim == 2
        and not name.endswith(("layernorm.weight", "mlp.gate.weight"))
    )


def is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


def dequantise_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Each value times its block's scale, the grid of scales repeated over the blocks and cut to the weight."""
    rows, cols = weight.shape[-2:]
    grid = scale.repeat_interleave(FP8_BLOCK, -2).repeat_interleave(FP8_BLOCK, -1)[..., :rows, :cols]
    return weight.to(torch.float32) * grid


def dequantise_int4(packed: torch.Tensor, scale: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Eight nibbles per int32, lowest bits first, stored as value + 8; the product is taken in the scale's dtype."""
    nibbles = (packed.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 0xF
    values = (nibbles.reshape(packed.shape[0], -1) - 8)[:, : int(shape[1])]
    return (values.to(scale.dtype) * scale.repeat_interleave(INT4_GROUP, 1)).to(torch.float32)


def dequantised(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as the format defines them, under their dense names."""
    stored = tensors(folder)
    dense: dict[str, torch.Tensor] = {}
    for name, tensor in stored.items():
        if name.endswith(("_scale_inv", "weight_scale", "weight_shape")):
            continue
        if f"{name}_scale_inv" in stored:
            dense[name] = dequantise_fp8(tensor, stored[f"{name}_scale_inv"])
        elif name.endswith(".weight_packed"):
            module = name.removesuffix(".weight_packed")
            parts = (stored[f"{module}.weight_scale"], stored[f"{module}.weight_shape"])
            dense[f"{module}.weight"] = dequantise_int4(tensor, *parts)
        else:
            dense[name] = tensor
    return dense


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per format: its dense original, the quantised copy and the reference (original with dequantised weights)."""
    root = tmp_path_factory.mktemp("quantized")
    made: dict[str, Path] = {}
    for fmt, config, quantise in [
        ("fp8", tiny_config(**BLOCK_ALIGNED), quantize_fp8_block),
        ("fp8-edges", tiny_config(**PARTIAL_BLOCKS), quantize_fp8_block),
        ("int4", tiny_config(), quantize_int4_compressed),
    ]:
        dense, quantised, reference = root / f"{fmt}-dense", root / fmt, root / f"{fmt}-reference"
        write_dense(dense, config)
        shutil.copytree(dense, quantised)
        quantise(quantised)
        shutil.copytree(dense, reference)
        by_shard = json.loads((dense / "model.safetensors.index.json").read_text())["weight_map"]
        weights = dequantised(quantised)
        for shard in sorted(set(by_shard.values())):
            save_file({n: weights[n] for n, s in by_shard.items() if s == shard}, reference / shard)
        made |= {f"{fmt}-dense": dense, fmt: quantised, f"{fmt}-reference": reference}
    return made


def test_fp8_folder_has_kimi_k2_instruct_layout(folders: dict[str, Path]) -> None:
    dense, stored = tensors(folders["fp8-dense"]), tensors(folders["fp8"])
    quantised = {name for name, tensor in dense.items() if is_linear_weight(name, tensor)}
    assert {n.rpartition(".")[0].rpartition(".")[2] for n in quantised} == {
        *("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
        *("gate_proj", "up_proj", "down_proj"),
    }
    assert set(stored) == set(dense) | {f"{name}_scale_inv" for name in quantised}
    for name, original in dense.items():
        if name in quantised:
            rows, cols = original.shape
            assert stored[name].dtype == torch.float8_e4m3fn and stored[name].shape == original.shape
            scale = stored[f"{name}_scale_inv"]
            assert scale.dtype == torch.float32
            assert scale.shape == (math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK))
        else:
            assert torch.equal(stored[name], original), name
    config = json.loads((folders["fp8"] / "config.json").read_text())
    assert config["quantization_config"] == KIMI_K2_INSTRUCT_QUANTIZATION


def test_int4_folder_has_kimi_k2_thinking_layout(folders: dict[str, Path]) -> None:
    dense, stored = tensors(folders["int4-dense"]), tensors(folders["int4"])
    experts = {name for name, tensor in dense.items() if is_linear_weight(name, tensor) and is_routed_expert(name)}
    assert len(experts) == 2 * 8 * 3  # 2 MoE layers x 8 routed experts x gate/up/down
    suffixes = ("weight_packed", "weight_scale", "weight_shape")
    modules = {name.removesuffix(".weight") for name in experts}
    assert set(stored) == (set(dense) - experts) | {f"{module}.{suffix}" for module in modules for suffix in suffixes}
    for module in modules:
        rows, cols = dense[f"{module}.weight"].shape
        packed, scale, shape = (stored[f"{module}.{suffix}"] for suffix in suffixes)
        assert packed.dtype == torch.int32 and packed.shape == (rows, cols // 8)
        assert scale.dtype == torch.bfloat16 and scale.shape == (rows, cols // INT4_GROUP)
        assert shape.dtype == torch.int32 and shape.tolist() == [rows, cols]
    for name in set(dense) - experts:
        assert torch.equal(stored[name], dense[name]), name
    config = json.loads((folders["int4"] / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["format"], config["quantization_status"]) == (
        "compressed-tensors",
        "pack-quantized",
        "compressed",
    )
    assert config["ignore"] == KIMI_K2_THINKING_IGNORE and config["kv_cache_scheme"] is None
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    weights = {key: group["weights"][key] for key in ("num_bits", "type", "symmetric", "strategy", "group_size")}
    assert weights == {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}


def relative_error(value: torch.Tensor, original: torch.Tensor) -> float:
    return ((value.float() - original.float()).norm() / original.float().norm()).item()


def assert_dense(model: torch.nn.Module, dtype: torch.dtype, names: set[str]) -> None:
    """What Loom's LoRA wrappers need: plain Linear modules, dense fused experts, nothing quantised left."""
    for module in model.modules():
        assert not hasattr(module, "quantization_scheme") and "FP8" not in type(module).__name__
        if isinstance(module, torch.nn.Linear):
            assert type(module) is torch.nn.Linear
    params = dict(model.named_parameters())
    assert set(params) == names
    assert {param.dtype for param in params.values()} == {dtype}
    assert not [name for name in model.state_dict() if name.endswith(QUANTISED_SUFFIXES)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("fmt", ["fp8", "fp8-edges", "int4"])
def test_quantised_folder_loads_dense_and_exact(folders: dict[str, Path], fmt: str, dtype: torch.dtype) -> None:
    reference = AutoModelForCausalLM.from_pretrained(folders[f"{fmt}-reference"], dtype=dtype)
    loaded = load_weights(check_model_folder(folders[fmt]), dtype)
    assert_dense(loaded, dtype, {name for name, _ in reference.named_parameters()})
    expected = reference.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS).logits, reference(TOKENS).logits)


def noise_equivalent_error(original: torch.nn.Module, errors: dict[str, float], seed: int) -> float:
    """Logits error of `original` with each parameter in `errors` moved by Gaussian noise of that relative size."""
    noisy = copy.deepcopy(original)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in noisy.named_parameters():
            if name in errors:
                noise = torch.randn(param.shape, generator=generator)
                param.add_(noise * (errors[name] * param.norm() / noise.norm()))
        return relative_error(noisy(TOKENS).logits, original(TOKENS).logits)


@pytest.mark.parametrize("fmt", ["fp8", "fp8-edges", "int4"])
def test_quantisation_error_is_the_formats(folders: dict[str, Path], fmt: str) -> None:
    original = AutoModelForCausalLM.from_pretrained(folders[f"{fmt}-dense"], dtype=torch.float32)
    loaded = load_weights(check_model_folder(folders[fmt]), torch.float32)
    originals = dict(original.named_parameters())
    errors = {name: relative_error(value, originals[name]) for name, value in loaded.named_parameters()}
    errors = {name: error for name, error in errors.items() if error > 0}
    fused_experts = {f"model.layers.{i}.mlp.experts.{p}" for i in (1, 2) for p in ("gate_up_proj", "down_proj")}
    linear = {
        n for n, t in tensors(folders[f"{fmt}-dense"]).items() if is_linear_weight(n, t) and not is_routed_expert(n)
    }
    assert set(errors) == (fused_experts if fmt == "int4" else fused_experts | linear)
    low, high = WEIGHT_ERROR[fmt.removesuffix("-edges")]
    assert all(low < error <= high for error in errors.values()), errors
    with torch.no_grad():
        logits_error = relative_error(loaded(TOKENS).logits, original(TOKENS).logits)
    noise_error = sum(noise_equivalent_error(original, errors, seed) for seed in range(3)) / 3
    assert 0 < logits_error < 2 * noise_error


def test_fp8_edges_folder_has_partial_blocks(folders: dict[str, Path]) -> None:
    """The partial blocks that `test_quantised_folder_loads_dense_and_exact[fp8-edges-*]` loads exactly."""
    stored = tensors(folders["fp8-edges"])
    shapes = {
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": ((320, 192), (3, 2)),
        "model.layers.0.self_attn.q_b_proj.weight": ((192, 64), (2, 1)),
        "model.layers.0.self_attn.kv_b_proj.weight": ((256, 304), (2, 3)),
        "model.layers.0.mlp.down_proj.weight": ((192, 256), (2, 2)),
        "model.layers.1.mlp.experts.0.gate_proj.weight": ((64, 192), (1, 2)),
        "model.layers.1.mlp.experts.0.down_proj.weight": ((192, 64), (2, 1)),
    }
    for name, (shape, grid) in shapes.items():
        assert (stored[name].shape, stored[f"{name}_scale_inv"].shape) == (shape, grid), name


def block_fp8_dequantizer() -> Fp8BlockDequantize:
    """The dequantise op transformers' registry gives a block-FP8 folder's load: Loom's registered quantizer's."""
    options = load_options({"quantization_config": KIMI_K2_INSTRUCT_QUANTIZATION}, torch.float32)
    quantizer = AutoHfQuantizer.from_config(options["quantization_config"], pre_quantized=True)
    op = quantizer.get_load_operations()["dequantize"](quantizer)
    assert isinstance(op, Fp8BlockDequantize)
    return op


@pytest.mark.parametrize(
    "shape", [(576, 7168), (320, 192), (192, 64), (256, 128), (2, 192, 300)], ids=lambda s: "x".join(map(str, s))
)
def test_fp8_block_dequantize_takes_the_block_from_the_config(shape: tuple[int, ...]) -> None:
    """Kimi-K2-Instruct's `kv_a_proj_with_mqa` [576, 7168] (scales [5, 56]) among them, and stacked experts."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator).to(torch.float8_e4m3fn)
    grid = (*shape[:-2], math.ceil(shape[-2] / FP8_BLOCK), math.ceil(shape[-1] / FP8_BLOCK))
    scale = torch.rand(grid, generator=generator) + 0.5
    dense = block_fp8_dequantizer().convert({"weight": weight, "weight_scale_inv": scale})["weight"]
    assert dense.dtype == torch.float32 and dense.is_contiguous()
    assert torch.equal(dense, dequantise_fp8(weight, scale))


def test_fp8_block_dequantize_refuses_other_layouts() -> None:
    weight = torch.zeros(320, 192).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"needs \(3, 2\) scales; got a torch.float8_e4m3fn weight with \(2, 1\)"):
        dequantize_fp8_block(weight, torch.ones(2, 1), (128, 128))
    with pytest.raises(ValueError, match="torch.uint8 scales"):
        dequantize_fp8_block(weight, torch.ones(3, 2, dtype=torch.uint8), (128, 128))
    with pytest.raises(ValueError, match="got a torch.int8 weight"):
        dequantize_fp8_block(torch.zeros(320, 96, dtype=torch.int8), torch.ones(3, 1), (128, 128))


def test_load_options(folders: dict[str, Path]) -> None:
    assert load_options({"model_type": "deepseek_v3"}, torch.bfloat16) == {"dtype": torch.bfloat16}
    config = json.loads((folders["int4"] / "config.json").read_text())
    options = load_options(config, torch.float32)
    assert options["dtype"] == torch.float32 and options["quantization_config"].dequantize
    with pytest.raises(ValueError, match="'gptq'"):
        load_options({"quantization_config": {"quant_method": "gptq", "bits": 4}}, torch.float32)
    fp8 = json.loads((folders["fp8"] / "config.json").read_text())
    assert loading_quantization(fp8) == {**KIMI_K2_INSTRUCT_QUANTIZATION, "quant_method": FP8_BLOCK_METHOD}
    block = load_options(fp8, torch.float32)["quantization_config"]
    assert type(block) is Fp8BlockConfig and block.quant_method == FP8_BLOCK_METHOD and block.dequantize
    assert list(block.weight_block_size) == [128, 128]
    per_tensor = {"quantization_config": {"quant_method": "fp8", "weight_block_size": None}}
    assert loading_quantization(per_tensor) == per_tensor["quantization_config"]
    assert type(load_options(per_tensor, torch.float32)["quantization_config"]) is FineGrainedFP8Config
    with pytest.raises(ValueError, match="scale_fmt='ue8m0'"):
        load_options({"quantization_config": {**KIMI_K2_INSTRUCT_QUANTIZATION, "scale_fmt": "ue8m0"}}, torch.float32)
    with pytest.raises(ValueError, match=f"'{FP8_BLOCK_METHOD}'"):
        load_options({"quantization_config": {"quant_method": FP8_BLOCK_METHOD}}, torch.float32)
    with pytest.raises(ValueError, match="already quantised"):
        quantize_int4_compressed(folders["int4"])


def test_single_file_folder_is_rewritten_in_place(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense = DeepseekV3ForCausalLM(tiny_config(**BLOCK_ALIGNED))
    dense.save_pretrained(tmp_path)
    quantize_fp8_block(tmp_path)
    assert {path.name for path in tmp_path.glob("model*")} == {"model.safetensors"}
    with safe_open(tmp_path / "model.safetensors", framework="pt") as reader:
        assert reader.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float8_e4m3fn
    assert_dense(
        load_weights(check_model_folder(tmp_path), torch.float32),
        torch.float32,
        {name for name, _ in dense.named_parameters()},
    )


def test_rewrite_holds_one_shard_at_a_time(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a shard is written, no tensor read from an earlier one is alive (CPython frees on last use)."""
    folder = tmp_path / "fp8"
    shutil.copytree(folders["fp8-dense"], folder)
    alive: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
    read_per_shard: list[int] = []

    class CountingReader:
        def __init__(self, path: Path, framework: str) -> None:
            self.reader = safe_open(path, framework=framework)

        def __enter__(self) -> CountingReader:
            self.inner = self.reader.__enter__()
            read_per_shard.append(0)
            return self

        def __exit__(self, *exc: object) -> None:
            self.reader.__exit__(*exc)

        def metadata(self) -> dict[str, str]:
            return self.inner.metadata()

        def keys(self) -> list[str]:
            return self.inner.keys()

        def get_tensor(self, name: str) -> torch.Tensor:
            tensor = self.inner.get_tensor(name)
            alive.add(tensor)
            read_per_shard[-1] += 1
            return tensor

    def checking_save(tensors: dict[str, torch.Tensor], *args: object, **kwargs: object) -> None:
        assert len(alive) <= read_per_shard[-1]
        save_file(tensors, *args, **kwargs)

    monkeypatch.setattr(quantized_checkpoints, "safe_open", CountingReader)
    monkeypatch.setattr(quantized_checkpoints, "save_file", checking_save)
    quantize_fp8_block(folder)
    assert len(read_per_shard) >= 4
