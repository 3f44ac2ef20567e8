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

Block-FP8 is dequantised by Loom's own transformers quantizer, registered under `FP8_BLOCK_METHOD` through
transformers' `register_quantization_config`/`register_quantizer`: `loading_quantization` renames an `fp8` folder's
method to it when the folder gives a `weight_block_size`, and `Fp8BlockQuantizer` subclasses transformers'
FineGrainedFP8 quantizer with one change, its dequantise op (`Fp8BlockDequantize`). transformers 5.23's op takes
the block to be the weight dimension over the scale count, which is wrong where a dimension above the block is not
a multiple of it (a 192-row weight's two scales read as 96-row blocks, silently; the real Kimi-K2-Instruct's
`kv_a_proj_with_mqa` [576, 7168] with [5, 56] scales refused); Loom's takes the block from the config and cuts the
last blocks off at the weight's edges (`dequantize_fp8_block`). It runs per checkpoint tensor while transformers
streams the shards, before transformers fuses per-expert tensors into the expert parameters.

Limits: round-to-nearest quantisation of the given weights, not Moonshot's quantisation-aware training, so the
error is the format's and says nothing of Kimi's published accuracy. Tensor names are DeepseekV3's
(`model.layers.N.{self_attn,mlp}...`) and int4 needs in-features divisible by 32. A folder is rewritten one shard
at a time (peak memory about one shard read plus one shard written); an interrupted rewrite leaves shards of both
layouts behind, so rewrite a copy. Block-FP8 loads need float8_e4m3fn weights with float scales
(`scale_fmt: float`, fp8 experts: DeepSeek-V3's and Kimi-K2-Instruct's layout); DeepSeek-V4's ue8m0 scales and
fp4 experts are refused. An `fp8` folder that gives no `weight_block_size` (per-tensor scales) is left to
transformers' own quantizer.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from compressed_tensors.quantization.lifecycle.forward import quantize
from compressed_tensors.quantization.utils import calculate_qparams, maybe_pad_tensor_for_block_quant
from compressed_tensors.utils.match import match_name
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import FineGrainedFP8Config, PreTrainedModel
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
from transformers.quantizers import AutoQuantizationConfig, register_quantization_config, register_quantizer
from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

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
_LOADABLE_METHODS = ("fp8", "compressed-tensors")
"""The `quant_method`s of the folders Loom loads (dequantising them while they load)."""

FP8_BLOCK_METHOD = "loom_fp8_block"
"""The `quant_method` Loom loads a block-FP8 folder under (`loading_quantization`), served by `Fp8BlockQuantizer`."""

Converter = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def dequantize_fp8_block(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The float32 values of block-FP8 `weight` [..., rows, cols]: each element times the scale of its `block`.

    `scale` holds one scale per block, [..., ceil(rows / block rows), ceil(cols / block cols)], the last row and
    column of blocks partial where a dimension is not a multiple of the block. Raises `ValueError` for another
    weight dtype or scale grid.
    """
    *leading, rows, cols = weight.shape
    block_rows, block_cols = block
    grid = (math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    if weight.dtype != torch.float8_e4m3fn or not scale.is_floating_point() or scale.shape != (*leading, *grid):
        raise ValueError(
            f"a block-FP8 weight is float8_e4m3fn with float scales, one per {block_rows}x{block_cols} block: "
            f"a {tuple(weight.shape)} weight needs {(*leading, *grid)} scales; got a {weight.dtype} weight "
            f"with {tuple(scale.shape)} {scale.dtype} scales"
        )
    padded = weight.new_zeros((*leading, grid[0] * block_rows, grid[1] * block_cols), dtype=torch.float32)
    padded[..., :rows, :cols] = weight
    blocks = padded.view(*leading, grid[0], block_rows, grid[1], block_cols)
    blocks *= scale.to(torch.float32)[..., :, None, :, None]
    return padded[..., :rows, :cols]


class Fp8BlockDequantize(Fp8Dequantize):
    """transformers' FP8 dequantise op, with the block size taken from the config (`dequantize_fp8_block`).

    transformers' own op derives the block from the scale grid, wrongly at partial edge blocks; the rest of the op
    (pairing each weight with its `weight_scale_inv`, per expert before they are fused) is transformers'. The result
    is in the dtype of the parameter it loads into (float32 when transformers does not say).
    """

    def _dequantize_one(
        self, quantized: torch.Tensor, scales: torch.Tensor, output_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        block_rows, block_cols = self.hf_quantizer.quantization_config.weight_block_size
        dense = dequantize_fp8_block(quantized, scales, (block_rows, block_cols))
        return dense.to(output_dtype or torch.float32).contiguous()


@register_quantization_config(FP8_BLOCK_METHOD)
class Fp8BlockConfig(FineGrainedFP8Config):
    """transformers' `FineGrainedFP8Config` of a block-FP8 checkpoint, under `FP8_BLOCK_METHOD`.

    Raises `ValueError` for what `Fp8BlockDequantize` does not read: no block size, ue8m0 scales, fp4 experts.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "quant_method": FP8_BLOCK_METHOD})

    def post_init(self) -> None:
        super().post_init()
        if self.weight_block_size is None or self.scale_fmt != "float" or self.expert_dtype != "fp8":
            raise ValueError(
                "Loom loads block-FP8 with a weight_block_size, float scales and fp8 experts; got "
                f"weight_block_size={self.weight_block_size}, scale_fmt={self.scale_fmt!r}, "
                f"expert_dtype={self.expert_dtype!r}"
            )


@register_quantizer(FP8_BLOCK_METHOD)
class Fp8BlockQuantizer(FineGrainedFP8HfQuantizer):
    """transformers' FineGrainedFP8 quantizer, dequantising with `Fp8BlockDequantize`."""

    def get_load_operations(self) -> dict[str, type[Fp8Dequantize]]:
        return {"dequantize": Fp8BlockDequantize}


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


def loading_quantization(config: dict) -> dict | None:
    """The `quantization_config` of a folder with this `config.json` as Loom loads it; None when unquantised.

    Block-FP8 (`fp8` with a `weight_block_size`) is put under `FP8_BLOCK_METHOD`, so that transformers loads it
    with `Fp8BlockQuantizer`; `worker/models/loader.py: hf_config` gives it to the model's config in place of the
    folder's. Raises `ValueError` for a quantisation Loom does not load.
    """
    quantization = config.get("quantization_config")
    if quantization is None:
        return None
    method = quantization.get("quant_method")
    if method not in _LOADABLE_METHODS:
        raise ValueError(
            f"unsupported quantisation {method!r} in config.json; Loom loads {' and '.join(_LOADABLE_METHODS)}"
        )
    if method == "fp8" and quantization.get("weight_block_size"):
        return {**quantization, "quant_method": FP8_BLOCK_METHOD}
    return quantization


def load_options(config: dict, dtype: torch.dtype) -> dict:
    """`from_pretrained` keyword arguments that load a folder with this `config.json` into dense `dtype` weights.

    A quantised folder is dequantised while it loads, on any device, so no quantised module or scale is left; the
    model's config must carry `loading_quantization(config)`, which these arguments' config merges into.
    Raises `ValueError` for a quantisation Loom does not load.
    """
    quantization = loading_quantization(config)
    if quantization is None:
        return {"dtype": dtype}
    dequantizing = AutoQuantizationConfig.from_dict({**quantization, "dequantize": True})
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
