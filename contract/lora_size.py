"""How many parameters one training run's LoRA adapter has, computed from a `config.json` alone (pure Python).

The targets are the ones Loom wraps (`worker/models/registry.py` `LORA_TARGETS`, installed by
`worker/lora/layers.py`), and every target weight W of shape (out, in) gets A (r, in) and B (out, r), so a target
costs r * (in + out) parameters (`worker/lora/adapter.py`):

- attention (`attn`): GQA q, k, v, o (Llama, Qwen3, Qwen3-MoE, Qwen3-VL's language model); MLA q_a, q_b (or one
  q_proj when `q_lora_rank` is null), kv_a_proj_with_mqa, kv_b, o (DeepSeek-V3 / Kimi K2);
- dense MLPs and DeepSeek-V3's shared expert (`mlp`): gate, up, down;
- routed experts (`experts`, trained with `train_mlp`): transformers 5 fuses them into `gate_up_proj`
  (E, 2 * moe_intermediate, hidden) and `down_proj` (E, hidden, moe_intermediate), and Loom gives each expert its own
  A and B of the fused weight (`per-expert`). The `shared` layout is the variant Loom does not train today: one A/B
  pair per fused weight of a layer, shared by all its routed experts (E times fewer expert parameters);
- unembedding (`unembed`): lm_head (wrapped even when tied to the input embedding);
- vision (`vision`, Qwen3-VL only, off by default): each vision block's qkv, proj, linear_fc1, linear_fc2 and the
  merger's and every deepstack merger's linear_fc1, linear_fc2.

Limits: counts only; the groups trained are Tinker's flags (default: attn, mlp/experts and unembed, not vision).
A unit test pins the count to the adapter Loom creates on its tiny built-in models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from contract.architectures import architecture_of

ExpertLora = Literal["per-expert", "shared"]
EXPERT_LORA: tuple[ExpertLora, ...] = get_args(ExpertLora)
Group = Literal["attn", "mlp", "experts", "unembed", "vision"]
DEFAULT_GROUPS: tuple[Group, ...] = ("attn", "mlp", "experts", "unembed")
"""What a run trains with Tinker's default flags (train_attn, train_mlp, train_unembed; no train_vision)."""


@dataclass(frozen=True)
class Target:
    """`count` target weights of one shape (one per layer, say), each with `experts` LoRA pairs."""

    group: Group
    in_features: int
    out_features: int
    count: int
    experts: int = 1
    active_experts: int = 1
    """How many of the `experts` pairs one token goes through (top-k for per-expert routed LoRA)."""

    def params_per_rank(self) -> int:
        return self.count * self.experts * (self.in_features + self.out_features)

    def active_params_per_rank(self) -> int:
        return self.count * self.active_experts * (self.in_features + self.out_features)


@dataclass(frozen=True)
class LoraSize:
    params_per_rank: dict[Group, int]
    """Adapter parameters at rank 1, per group trained (everything scales linearly with the rank)."""
    active_params_per_rank: int
    """Rank-1 parameters one token's forward pass goes through (top-k experts' pairs, not all of them)."""

    def params(self, rank: int) -> int:
        return rank * sum(self.params_per_rank.values())


def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The language model's config: `text_config` for Qwen3-VL (with the top-level embedding tie), else itself."""
    if "text_config" not in config:
        return dict(config)
    return {**config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings", False)}


def routed_experts(text: Mapping[str, Any]) -> int:
    """Routed experts per MoE layer (0 for a dense model); transformers 5 may write `num_local_experts`."""
    return text.get("n_routed_experts") or text.get("num_experts") or text.get("num_local_experts") or 0


def moe_layers(text: Mapping[str, Any]) -> int:
    """How many decoder layers hold routed experts (DeepSeek-V3's `first_k_dense_replace`, Qwen3-MoE's grid)."""
    layers, experts = text["num_hidden_layers"], routed_experts(text)
    if not experts:
        return 0
    if "first_k_dense_replace" in text:
        return layers - min(text["first_k_dense_replace"], layers)
    dense_only, step = set(text.get("mlp_only_layers") or ()), text.get("decoder_sparse_step", 1)
    return sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)


def _attention(text: Mapping[str, Any], default_head_dim: int) -> list[Target]:
    layers, hidden, heads = text["num_hidden_layers"], text["hidden_size"], text["num_attention_heads"]
    if "kv_lora_rank" in text:  # MLA
        q_rank, kv_rank = text["q_lora_rank"], text["kv_lora_rank"]
        nope, rope, v_dim = text["qk_nope_head_dim"], text["qk_rope_head_dim"], text["v_head_dim"]
        query = (
            [Target("attn", hidden, heads * (nope + rope), layers)]
            if q_rank is None
            else [Target("attn", hidden, q_rank, layers), Target("attn", q_rank, heads * (nope + rope), layers)]
        )
        return [
            *query,
            Target("attn", hidden, kv_rank + rope, layers),
            Target("attn", kv_rank, heads * (nope + v_dim), layers),
            Target("attn", heads * v_dim, hidden, layers),
        ]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or default_head_dim
    return [
        Target("attn", hidden, heads * head_dim, layers),
        Target("attn", hidden, kv_heads * head_dim, 2 * layers),
        Target("attn", heads * head_dim, hidden, layers),
    ]


def _mlp(hidden: int, intermediate: int, count: int) -> list[Target]:
    return [Target("mlp", hidden, intermediate, 2 * count), Target("mlp", intermediate, hidden, count)]


def _vision(vision: Mapping[str, Any]) -> list[Target]:
    hidden, depth, inner = vision["hidden_size"], vision["depth"], vision["intermediate_size"]
    merged = hidden * vision["spatial_merge_size"] ** 2
    mergers = 1 + len(vision.get("deepstack_visual_indexes") or ())
    return [
        Target("vision", hidden, 3 * hidden, depth),
        Target("vision", hidden, hidden, depth),
        Target("vision", hidden, inner, depth),
        Target("vision", inner, hidden, depth),
        Target("vision", merged, merged, mergers),
        Target("vision", merged, vision["out_hidden_size"], mergers),
    ]


def lora_targets(config: Mapping[str, Any], expert_lora: ExpertLora = "per-expert") -> list[Target]:
    """Every weight Loom's LoRA can wrap in the model `config` describes, all groups (module docstring)."""
    arch = architecture_of(config, "config.json")
    text = text_config(config)
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    default_head_dim = (
        128 if arch.config_class in ("Qwen3Config", "Qwen3VLConfig") else hidden // text["num_attention_heads"]
    )
    experts, moe = routed_experts(text), moe_layers(text)
    targets = [*_attention(text, default_head_dim), *_mlp(hidden, text["intermediate_size"], layers - moe)]
    if moe:
        expert_size, top_k = text["moe_intermediate_size"], text["num_experts_per_tok"]
        pairs, active = (experts, top_k) if expert_lora == "per-expert" else (1, 1)
        targets += [
            Target("experts", hidden, 2 * expert_size, moe, pairs, active),
            Target("experts", expert_size, hidden, moe, pairs, active),
        ]
        if text.get("n_shared_experts"):
            targets += _mlp(hidden, expert_size * text["n_shared_experts"], moe)
    targets.append(Target("unembed", hidden, text["vocab_size"], 1))
    if arch.vision:
        targets += _vision(config["vision_config"])
    return targets


def lora_size(
    config: Mapping[str, Any], groups: tuple[Group, ...] = DEFAULT_GROUPS, expert_lora: ExpertLora = "per-expert"
) -> LoraSize:
    """The rank-1 parameter counts of the adapter a run training `groups` gets (module docstring)."""
    targets = [t for t in lora_targets(config, expert_lora) if t.group in groups and t.count]
    per_group: dict[Group, int] = {}
    for t in targets:
        per_group[t.group] = per_group.get(t.group, 0) + t.params_per_rank()
    return LoraSize(per_group, sum(t.active_params_per_rank() for t in targets))
