"""Parameter counts and weight bytes of a causal LM, computed from its `config.json` alone (pure Python, no torch).

`model_size(config)` lists the tensors the architecture's transformers class (contract/architectures.py) holds
and sums them:

- `total_params`: every element of the model's state dict, i.e. parameters plus persistent buffers (DeepSeek-V3 and
  Kimi K2 keep the router's `e_score_correction_bias` as a buffer), tied embeddings once. A unit test pins it to the
  transformers class instantiated on the meta device.
- `active_params`: what one token goes through: everything but the routed experts it is not sent to, i.e. all
  non-expert weights (embeddings, attention, norms, dense MLPs, routers) + shared experts + `num_experts_per_tok`
  routed experts per MoE layer. The input embedding counts in full, as model cards count it.

Per architecture:

- llama / qwen3: grouped-query attention (q, k, v, o; biases when `attention_bias`), qwen3 adds per-head q/k RMSNorms;
  gated MLP (`mlp_bias` for llama). A qwen3 config without `head_dim` gets 128, as transformers gives it.
- qwen3_moe: qwen3 attention; a layer is MoE unless listed in `mlp_only_layers` or off the `decoder_sparse_step`
  grid (those get a dense MLP of `intermediate_size`); MoE layers hold a router [num_experts, hidden] and
  `num_experts` routed experts of `moe_intermediate_size`, no shared expert.
- qwen3_vl / qwen3_vl_moe: the language model of `text_config` as qwen3 / qwen3_moe, plus the vision tower of
  `vision_config` (`_vision_tower`); quantised formats treat the vision linears like decoder linears.
- deepseek_v3 / kimi_k2: MLA attention: q_a [q_lora_rank, hidden] + q_a_layernorm + q_b [heads * (qk_nope + qk_rope),
  q_lora_rank] (one q_proj when `q_lora_rank` is null), kv_a [kv_lora_rank + qk_rope, hidden] + kv_a_layernorm +
  kv_b [heads * (qk_nope + v_head), kv_lora_rank], o [hidden, heads * v_head]; the first `first_k_dense_replace`
  layers have a dense MLP of `intermediate_size`, the rest a router (weight [n_routed_experts, hidden] and
  `e_score_correction_bias` [n_routed_experts]), one shared MLP of `n_shared_experts * moe_intermediate_size` and
  `n_routed_experts` routed experts of `moe_intermediate_size`. The multi-token-prediction layers a checkpoint may
  ship (`num_nextn_predict_layers`; DeepSeek-V3 has one, Kimi K2 none) are not part of the served model:
  `DeepseekV3ForCausalLM` builds none (it skips DeepSeek-V3's `model.layers.61.*` on load), so they are not counted.
  A `moe_layer_freq` other than 1 is refused: transformers ignores it, so no count would match.

Weight bytes per format (`WEIGHT_FORMATS`), as a checkpoint in that format stores the weights:

- float32 / bfloat16: 4 / 2 bytes per element.
- float8, as Kimi K2 and DeepSeek-V3 checkpoints ship: every linear inside the decoder layers (attention,
  dense MLPs, shared and routed experts; not the MoE router) in float8 e4m3, 1 byte per element, plus one float32
  scale per 128x128 block (ceil(out/128) * ceil(in/128) * 4 bytes); embeddings, lm_head, norms, routers and biases
  in bfloat16 (Kimi K2's checkpoint keeps `e_score_correction_bias` in float32: 46 KB more).
- int4, as Kimi-K2-Thinking ships (compressed-tensors pack-quantized, symmetric int4 in groups of 32 along the input
  dimension): routed-expert linears at half a byte per element plus one bfloat16 scale per group
  (out * ceil(in/32) * 2 bytes); everything else in bfloat16. The two-int32 `weight_shape` tensor compressed-tensors
  keeps per quantised linear (8 bytes each) is left out.

Limits: weights only, nothing of optimizer state, gradients, activations or KV cache; the architectures of
contract/architectures.py only (others raise `UnsupportedArchitecture`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from contract.architectures import architecture_of

WeightFormat = Literal["float32", "bfloat16", "float8", "int4"]
WEIGHT_FORMATS: tuple[WeightFormat, ...] = get_args(WeightFormat)
FP8_BLOCK = 128
"""Side of the square weight block one float8 scale covers."""
INT4_GROUP = 32
"""Input elements one int4 scale covers."""


@dataclass(frozen=True)
class ModelSize:
    total_params: int
    active_params: int
    """Parameters one token uses (all of them for a dense model)."""
    weight_bytes: dict[WeightFormat, int]
    """Bytes the weights take in each of `WEIGHT_FORMATS`."""


Kind = Literal["linear", "routed", "other"]
"""How a tensor is stored when quantised: a decoder-layer linear (float8), a routed-expert linear (float8, int4), or
anything else (embeddings, lm_head, norms, routers, biases: bfloat16)."""


@dataclass(frozen=True)
class _Tensors:
    """`count` tensors of one shape ([out, in] for a linear), `active` of which a token uses (None: all)."""

    shape: tuple[int, ...]
    count: int
    kind: Kind = "other"
    active: int | None = None

    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, fmt: WeightFormat) -> int:
        """The bytes one of these tensors takes in `fmt` (module docstring)."""
        n = self.numel()
        if fmt == "float32":
            return 4 * n
        if fmt == "float8" and self.kind != "other":
            out, inp = self.shape
            return n + math.ceil(out / FP8_BLOCK) * math.ceil(inp / FP8_BLOCK) * 4
        if fmt == "int4" and self.kind == "routed":
            out, inp = self.shape
            return math.ceil(n / 2) + out * math.ceil(inp / INT4_GROUP) * 2
        return 2 * n


def _linear(out: int, inp: int, count: int, bias: bool = False) -> list[_Tensors]:
    return [_Tensors((out, inp), count, "linear"), *([_Tensors((out,), count)] if bias else [])]


def _mlp(hidden: int, intermediate: int, count: int, bias: bool = False) -> list[_Tensors]:
    """`count` gated MLPs (gate, up, down)."""
    return [
        *_linear(intermediate, hidden, 2 * count, bias),
        *_linear(hidden, intermediate, count, bias),
    ]


def _routed_experts(hidden: int, intermediate: int, count: int, active: int) -> list[_Tensors]:
    """`count` routed experts, `active` of which a token uses, as the checkpoint stores them (one linear each)."""
    return [
        _Tensors((intermediate, hidden), 2 * count, "routed", 2 * active),
        _Tensors((hidden, intermediate), count, "routed", active),
    ]


def _embeddings_and_norms(config: Mapping[str, Any]) -> list[_Tensors]:
    """Token embedding, lm_head (unless tied), final norm, and the two norms of every decoder layer."""
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    tied = config.get("tie_word_embeddings", False)
    return [
        _Tensors((vocab, hidden), 1 if tied else 2),
        _Tensors((hidden,), 1 + 2 * config["num_hidden_layers"]),
    ]


def _gqa_attention(config: Mapping[str, Any], qk_norm: bool, default_head_dim: int) -> list[_Tensors]:
    layers, hidden, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or default_head_dim
    bias = config.get("attention_bias", False)
    return [
        *_linear(heads * head_dim, hidden, layers, bias),
        *_linear(kv_heads * head_dim, hidden, 2 * layers, bias),
        *_linear(hidden, heads * head_dim, layers, bias),
        *([_Tensors((head_dim,), 2 * layers)] if qk_norm else []),
    ]


def _mla_attention(config: Mapping[str, Any]) -> list[_Tensors]:
    layers, hidden, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
    q_rank, kv_rank = config["q_lora_rank"], config["kv_lora_rank"]
    nope, rope, v_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    bias = config.get("attention_bias", False)
    query = (
        _linear(heads * (nope + rope), hidden, layers)
        if q_rank is None
        else [
            *_linear(q_rank, hidden, layers, bias),
            _Tensors((q_rank,), layers),
            *_linear(heads * (nope + rope), q_rank, layers),
        ]
    )
    return [
        *query,
        *_linear(kv_rank + rope, hidden, layers, bias),
        _Tensors((kv_rank,), layers),
        *_linear(heads * (nope + v_dim), kv_rank, layers),
        *_linear(hidden, heads * v_dim, layers, bias),
    ]


def _llama(config: Mapping[str, Any]) -> list[_Tensors]:
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    return [
        *_embeddings_and_norms(config),
        *_gqa_attention(config, qk_norm=False, default_head_dim=hidden // config["num_attention_heads"]),
        *_mlp(hidden, config["intermediate_size"], layers, config.get("mlp_bias", False)),
    ]


def _qwen3(config: Mapping[str, Any]) -> list[_Tensors]:
    return [
        *_embeddings_and_norms(config),
        *_gqa_attention(config, qk_norm=True, default_head_dim=128),
        *_mlp(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]),
    ]


def _qwen3_moe(config: Mapping[str, Any]) -> list[_Tensors]:
    # transformers 5 writes `num_local_experts` where the published configs say `num_experts`
    experts = config["num_experts"] if "num_experts" in config else config["num_local_experts"]
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    dense_only, step = set(config.get("mlp_only_layers") or ()), config.get("decoder_sparse_step", 1)
    moe = sum(1 for i in range(layers) if i not in dense_only and experts > 0 and (i + 1) % step == 0)
    return [
        *_embeddings_and_norms(config),
        *_gqa_attention(config, qk_norm=True, default_head_dim=hidden // config["num_attention_heads"]),
        *_mlp(hidden, config["intermediate_size"], layers - moe),
        _Tensors((experts, hidden), moe),
        *_routed_experts(hidden, config["moe_intermediate_size"], moe * experts, moe * config["num_experts_per_tok"]),
    ]


def _deepseek_v3(config: Mapping[str, Any]) -> list[_Tensors]:
    if config.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"moe_layer_freq {config['moe_layer_freq']} is not supported (transformers ignores it)")
    hidden, layers, experts = config["hidden_size"], config["num_hidden_layers"], config["n_routed_experts"]
    dense = min(config["first_k_dense_replace"], layers)
    moe, expert_size = layers - dense, config["moe_intermediate_size"]
    return [
        *_embeddings_and_norms(config),
        *_mla_attention(config),
        *_mlp(hidden, config["intermediate_size"], dense),
        _Tensors((experts, hidden), moe),
        _Tensors((experts,), moe),
        *_mlp(hidden, expert_size * config["n_shared_experts"], moe),
        *_routed_experts(hidden, expert_size, moe * experts, moe * config["num_experts_per_tok"]),
    ]


def _vision_tower(vision: Mapping[str, Any]) -> list[_Tensors]:
    """Qwen3-VL's vision tower: a Conv3d patch embedding, a learned position table, `depth` pre-norm blocks
    (LayerNorms, fused qkv and proj, a two-layer MLP, all with biases) and the mergers (the final one and one per
    deepstack layer) that fold `spatial_merge_size`^2 patches into one language-model token."""
    hidden, depth, inner = vision["hidden_size"], vision["depth"], vision["intermediate_size"]
    merged = hidden * vision["spatial_merge_size"] ** 2
    patch = vision.get("in_channels", 3) * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    mergers = 1 + len(vision.get("deepstack_visual_indexes") or ())
    deepstack = mergers - 1
    return [
        _Tensors((hidden, patch), 1),
        _Tensors((hidden,), 1),
        _Tensors((vision["num_position_embeddings"], hidden), 1),
        _Tensors((hidden,), 4 * depth),  # two LayerNorms (weight, bias) per block
        *_linear(3 * hidden, hidden, depth, bias=True),
        *_linear(hidden, hidden, depth, bias=True),
        *_linear(inner, hidden, depth, bias=True),
        *_linear(hidden, inner, depth, bias=True),
        _Tensors((hidden,), 2),  # the final merger normalises before the shuffle...
        _Tensors((merged,), 2 * deepstack),  # ... the deepstack mergers after it
        *_linear(merged, merged, mergers, bias=True),
        *_linear(vision["out_hidden_size"], merged, mergers, bias=True),
    ]


def _qwen3_vl(config: Mapping[str, Any]) -> list[_Tensors]:
    text = {**config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings", False)}
    language = _qwen3_moe(text) if "num_experts" in text or "num_local_experts" in text else _qwen3(text)
    return [*language, *_vision_tower(config["vision_config"])]


_LAYOUTS: dict[str, Callable[[Mapping[str, Any]], list[_Tensors]]] = {
    "LlamaConfig": _llama,
    "Qwen3Config": _qwen3,
    "Qwen3MoeConfig": _qwen3_moe,
    "DeepseekV3Config": _deepseek_v3,
    "Qwen3VLConfig": _qwen3_vl,
    "Qwen3VLMoeConfig": _qwen3_vl,
}
"""The tensors of each transformers configuration class (contract/architectures.py maps `model_type` to one)."""


def model_size(config: Mapping[str, Any]) -> ModelSize:
    """The parameter counts and weight bytes of the model a parsed `config.json` describes (module docstring)."""
    tensors = _LAYOUTS[architecture_of(config, "config.json").config_class](config)
    return ModelSize(
        total_params=sum(t.count * t.numel() for t in tensors),
        active_params=sum((t.count if t.active is None else t.active) * t.numel() for t in tensors),
        weight_bytes={fmt: sum(t.count * t.nbytes(fmt) for t in tensors) for fmt in WEIGHT_FORMATS},
    )
