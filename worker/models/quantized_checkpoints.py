"""Kimi K2's two published quantised checkpoint formats: write them from a dense folder, and load them back dense.

- Kimi-K2-Instruct is block-FP8, DeepSeek-V3's layout: every Linear weight of attention and MLP (dense MLP, shared
  and routed experts) is stored as float8_e4m3fn with a float32 `<name>.weight_scale_inv` holding one scale per
  128x128 block, partial at the edges (dense weight = fp8 value x scale). Embeddings, lm_head, norms, the router's
  `mlp.gate.weight` and its `e_score_correction_bias` stay unquantised.
- Kimi-K2-Thinking is compressed-tensors `pack-quantized`: only the routed experts are int4 (symmetric, one scale
  per 32 input columns), stored as `weight_packed` int32 [out, in/8], `weight_scale` bfloat16 [out, in/32] and
  `weight_shape` int32 [2]; attention, shared experts, the dense MLP and lm_head are in the config's `ignore` list.

`quantize_fp8_block` and `quantize_int4_compressed` rewrite a `save_pretrained` folder in place into those layouts
(the numerics are compressed-tensors' own scale, rounding and packing functions), so tests and benchmarks can
exercise loading the real checkpoints without them. `load_options` gives the `from_pretrained` arguments that
dequantise such a folder while it loads (`worker/models/loader.py` loads with them), and `cast_leftovers` fixes the
dtypes transformers leaves behind, so the model holds plain `nn.Linear` modules and dense fused expert parameters
for Loom's LoRA wrappers.

Limits: round-to-nearest quantisation of the given weights, not Moonshot's quantisation-aware training, so the
error is the format's and says nothing of Kimi's published accuracy. Tensor names are DeepseekV3's
(`model.layers.N.{self_attn,mlp}...`) and int4 needs in-features divisible by 32. A folder is rewritten one shard
at a time (peak memory about one shard read plus one shard written); an interrupted rewrite leaves shards of both
layouts behind, so rewrite a copy. transformers 5.23 dequantises FP8 wrongly where a weight dimension above 128 is
not a multiple of 128 (it takes the block to be the dimension over the scale count: a 192-row weight's two scales
are read as 96-row blocks, silently), and refuses where that does not divide: the real Kimi-K2-Instruct's
`kv_a_proj_with_mqa` [576, 7168] with [5, 56] scales fails to load.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from compressed_tensors.quantization.lifecycle.forward import quantize
from compressed_tensors.quantization.utils import calculate_qparams, maybe_pad_tensor_for_block_quant
from compressed_tensors.utils.match import match_name
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CompressedTensorsConfig, FineGrainedFP8Config, PreTrainedModel

FP8_BLOCK_CONFIG: dict = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
"""Kimi-K2-Instruct's `quantization_config` (DeepSeek-V3's block-FP8)."""

INT4_COMPRESSED_CONFIG: dict = {
    "config_groups": {
        "group_0": {
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": 32,
                "num_bits": 4,
                "observer": "minmax",
                "observer_kwargs": {},
                "strategy": "group",
                "symmetric": True,
                "type": "int",
            },
        }
    },
    "format": "pack-quantized",
    "ignore": [
        "lm_head",
        "re:.*self_attn.*",
        "re:.*shared_experts.*",
        r"re:.*mlp\.(gate|up|gate_up|down)_proj.*",
    ],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}
"""Kimi-K2-Thinking's `quantization_config`: every Linear is targeted, and the ignore list leaves routed experts."""

_LINEAR_WEIGHT = re.compile(r"^model\.layers\.\d+\.(?:self_attn|mlp)\..*_proj(?:_with_mqa)?\.weight$")
"""A DeepseekV3 checkpoint's Linear weights: attention projections, dense MLP, shared and routed experts."""

_INDEX = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_CONFIG_CLASSES = {"fp8": FineGrainedFP8Config, "compressed-tensors": CompressedTensorsConfig}
"""quant_method -> the transformers config that can dequantise it while loading."""

Converter = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def _block_scales(weight: torch.Tensor, args: QuantizationArgs, block: tuple[int, int]) -> torch.Tensor:
    """One scale per `block` of the 2-D `weight` (partial at the edges), by compressed-tensors' rule for `args`."""
    padded = maybe_pad_tensor_for_block_quant(weight, block)
    blocks = padded.reshape(padded.shape[0] // block[0], block[0], padded.shape[1] // block[1], block[1])
    scale, _ = calculate_qparams(blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3)), args)
    return scale


def _fp8_converter() -> Converter:
    block = tuple(FP8_BLOCK_CONFIG["weight_block_size"])
    args = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=list(block), symmetric=True)

    def convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if not _LINEAR_WEIGHT.match(name):
            return {name: tensor}
        weight = tensor.to(torch.float32)
        scale = _block_scales(weight, args, block)
        fp8 = quantize(x=weight, scale=scale, zero_point=None, args=args, dtype=torch.float8_e4m3fn)
        return {name: fp8, f"{name}_scale_inv": scale}

    return convert


def _int4_converter() -> Converter:
    config = QuantizationConfig.model_validate(INT4_COMPRESSED_CONFIG)
    (scheme,) = config.config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(config.format)
    block = (1, scheme.weights.group_size)

    def convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        module = name.removesuffix(".weight")
        if not _LINEAR_WEIGHT.match(name) or any(match_name(module, ignored) for ignored in config.ignore):
            return {name: tensor}
        weight = tensor.to(torch.float32)
        # Kimi-K2-Thinking stores bf16 scales; quantising against the rounded scale keeps the stored pair exact.
        scale = _block_scales(weight, scheme.weights, block).to(torch.bfloat16)
        packed = compressor.compress({"weight": weight, "weight_scale": scale}, scheme)
        packed["weight_shape"] = packed["weight_shape"].to(torch.int32)  # the published dtype
        return {f"{module}.{key}": value for key, value in packed.items()}

    return convert


def _rewrite(folder: Path, convert: Converter, quantization_config: dict) -> None:
    """Pass every tensor of the folder through `convert`, one shard at a time, then record `quantization_config`."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method")
        raise ValueError(f"{folder} is already quantised ({method})")
    index_path = folder / _INDEX
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    shards = sorted(set(index["weight_map"].values())) if index else [_SINGLE_FILE]
    weight_map: dict[str, str] = {}
    total_size = 0
    for shard in shards:
        path = folder / shard
        with safe_open(path, framework="pt") as reader:
            metadata = reader.metadata()
            written: dict[str, torch.Tensor] = {}
            for name in reader.keys():
                written.update(convert(name, reader.get_tensor(name)))
        staging = path.with_name(f".{shard}.partial")
        save_file({name: tensor.contiguous() for name, tensor in written.items()}, staging, metadata=metadata)
        os.replace(staging, path)
        weight_map.update(dict.fromkeys(written, shard))
        total_size += sum(tensor.numel() * tensor.element_size() for tensor in written.values())
    if index:
        index["metadata"]["total_size"] = total_size
        index["weight_map"] = dict(sorted(weight_map.items()))
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config["quantization_config"] = quantization_config
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def quantize_fp8_block(folder: Path) -> None:
    """Rewrite the dense DeepseekV3 `save_pretrained` folder in place into Kimi-K2-Instruct's block-FP8 layout."""
    _rewrite(folder, _fp8_converter(), FP8_BLOCK_CONFIG)


def quantize_int4_compressed(folder: Path) -> None:
    """Rewrite the dense DeepseekV3 `save_pretrained` folder in place into Kimi-K2-Thinking's int4 layout."""
    _rewrite(folder, _int4_converter(), INT4_COMPRESSED_CONFIG)


def load_options(config: dict, dtype: torch.dtype) -> dict:
    """`from_pretrained` keyword arguments that load a folder with this `config.json` into dense `dtype` weights.

    A quantised folder is dequantised while it loads, on any device, so no quantised module or scale is left.
    Raises `ValueError` for a quantisation transformers cannot dequantise that way.
    """
    quantization = config.get("quantization_config")
    if quantization is None:
        return {"dtype": dtype}
    method = quantization.get("quant_method")
    if method not in _CONFIG_CLASSES:
        raise ValueError(
            f"unsupported quantisation {method!r} in config.json; Loom loads {' and '.join(_CONFIG_CLASSES)}"
        )
    dequantizing = _CONFIG_CLASSES[method].from_dict({**quantization, "dequantize": True})
    return {"dtype": dtype, "quantization_config": dequantizing}


def cast_leftovers(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Cast what a dequantising load left out of `dtype`, except the modules the model keeps in float32.

    transformers 5.23 leaves some parameters of a dequantising load out of `dtype`: with FP8, those stored
    unquantised keep the checkpoint's dtype; with compressed-tensors, dequantised experts keep their scales' dtype.
    """
    kept = model._keep_in_fp32_modules | model._keep_in_fp32_modules_strict
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.dtype != dtype and not any(module in name for module in kept):
            param.data = param.data.to(dtype)
