"""The catalogue of base models a deployment serves: the facts the API validates against and workers load by.

Each `BaseModelEntry` is what clients and the API need to know of a model (its public id and aliases, architecture,
vocabulary, context, LoRA rank limit, size) and how a worker gets it: its files (`source`: a local folder or an
`s3://` prefix in the Hugging Face `save_pretrained` layout; none for a built-in, which the worker builds into its
model cache), the dtype it computes in, the modules LoRA may wrap, its chat format and the worker pool serving it.

`Catalogue` is the set one deployment serves: the built-ins plus the entries of the operator's catalogue file
(`contract/catalogue_file.py`, named by `LOOM_MODEL_CATALOGUE`), narrowed by the `base_models` setting.

Limits: the built-ins are the real SmolLM2-135M-Instruct and faithful miniatures (random-init Kimi K2, Qwen3-MoE and
Qwen3-VL dense / MoE shapes with their real tokenizers); weights never come from a hub.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from loom.types.images import QWEN3_VL_GEOMETRY, ImageGeometry

Dtype = Literal["float32", "bfloat16"]
ChatFormat = Literal["template", "kimi_k2", "qwen3"]
"""How `/v1/chat/completions` renders messages and reads tool calls back: the model folder's own chat template
with no tool-call parsing (`template`), or a published family format (`kimi_k2`, `qwen3`)."""


@dataclass(frozen=True)
class LoraTargets:
    """Leaf module names (and fused expert parameters) that LoRA may wrap, grouped by the Tinker flags."""

    attn: tuple[str, ...]
    mlp: tuple[str, ...]
    unembed: tuple[str, ...] = ("lm_head",)
    experts: tuple[str, ...] = ()
    """Fused 3-D routed-expert parameters (`gate_up_proj`, `down_proj`) on modules whose class name ends in
    `Experts`; trained when `train_mlp` is set."""
    vision: tuple[str, ...] = ()
    """A vision-language model's vision tower and merger linears; trained when `train_vision` is set."""


@dataclass(frozen=True)
class VisionSpec:
    """What a vision-language model's prompts need: how images are tiled into tokens, and the special tokens an
    image sits between (Qwen3-VL: `<|vision_start|>`, one `<|image_pad|>` per image token, `<|vision_end|>`)."""

    geometry: ImageGeometry = QWEN3_VL_GEOMETRY
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653


@dataclass(frozen=True)
class BaseModelEntry:
    name: str
    """The id clients pass as `base_model`."""
    cache_name: str
    """The model's folder under the model cache (built-ins and `s3://` sources are materialised there)."""
    arch: str
    """The transformers causal-LM class (`contract/architectures.py`)."""
    vocab_size: int
    max_context_length: int
    train_bytes_per_token: int
    """Peak activation memory of a training pass per padded token (fp32; measured by
    `benchmarks/train_pass_memory.py` for SmolLM2, estimated from the config otherwise); what admission multiplies
    the pass budget by."""
    kv_bytes_per_token: int
    """KV-cache bytes per token of a decode batch in the worker's dtype."""
    total_params: int
    active_params: int
    """Parameters used per token (all of a dense model; a MoE's shared part plus its top-k routed experts)."""
    max_lora_rank: int = 64
    aliases: tuple[str, ...] = field(default=())
    source: str | None = None
    """A local folder or `s3://bucket/prefix` holding the model's `save_pretrained` files; None for a built-in."""
    dtype: Dtype = "float32"
    """What the worker computes in (quantised checkpoints are dequantised into it while loading)."""
    chat_format: ChatFormat = "template"
    lora_targets: LoraTargets | None = None
    """The modules LoRA may wrap; None derives them from the architecture (`worker/models/registry.py`)."""
    pool: str = "default"
    """The worker pool that serves the model (`LOOM_WORKER_POOL` of its workers)."""
    vision: VisionSpec | None = None
    """Set for a vision-language model (image chunks accepted); None for a text-only one."""

    @property
    def image_token_id(self) -> int | None:
        """The token an image's positions hold (a vision model's `<|image_pad|>`); None for a text model."""
        return None if self.vision is None else self.vision.image_token_id

    def tokenizer_folder(self, model_cache_dir: Path) -> Path:
        """Where the worker exports the model's tokenizer for clients, before publishing it to the checkpoint store
        for the API to serve (`contract/published_tokenizers.py`)."""
        return model_cache_dir / "tokenizers" / self.cache_name

    def folder(self, model_cache_dir: Path) -> Path:
        """Where the model's `save_pretrained` files are read from: the local source itself, or the model cache."""
        if self.source is not None and not self.source.startswith("s3://"):
            return Path(self.source)
        return model_cache_dir / self.cache_name


SMOLLM2 = BaseModelEntry(
    name="HuggingFaceTB/SmolLM2-135M-Instruct",
    cache_name="smollm2-135m-instruct",
    arch="LlamaForCausalLM",
    vocab_size=49152,
    max_context_length=8192,
    train_bytes_per_token=4_200_000,  # 4,005 KiB/token measured at 1×512 (benchmarks/train_pass_memory.py)
    kv_bytes_per_token=2 * 30 * 3 * 64 * 4,
    total_params=134_515_008,
    active_params=134_515_008,
    aliases=("smollm2-135m-instruct",),
)
TINY_KIMI_K2 = BaseModelEntry(
    name="loom/tiny-kimi-k2",
    cache_name="tiny-kimi-k2-v3",
    arch="DeepseekV3ForCausalLM",
    vocab_size=163840,
    max_context_length=4096,
    train_bytes_per_token=3_002_880,  # estimated from the config (contract/catalogue_file.py)
    kv_bytes_per_token=3 * 4 * (32 + 16 + 32) * 4,
    total_params=42_640_560,
    active_params=42_345_648,
    aliases=("tiny-kimi-k2",),
    chat_format="kimi_k2",
)
TINY_QWEN3_MOE = BaseModelEntry(
    name="loom/tiny-qwen3-moe",
    cache_name="tiny-qwen3-moe-v1",
    arch="Qwen3MoeForCausalLM",
    vocab_size=151936,
    max_context_length=4096,
    train_bytes_per_token=2_765_568,  # estimated from the config (contract/catalogue_file.py)
    kv_bytes_per_token=2 * 2 * 2 * 32 * 4,
    total_params=39_389_952,
    active_params=39_095_040,
    aliases=("tiny-qwen3-moe",),
    chat_format="qwen3",
)

TINY_QWEN3_VL = BaseModelEntry(
    name="loom/tiny-qwen3-vl",
    cache_name="tiny-qwen3-vl-v2",
    arch="Qwen3VLForConditionalGeneration",
    vocab_size=151936,
    max_context_length=4096,
    train_bytes_per_token=2_775_808,  # estimated from the text config (contract/catalogue_file.py)
    kv_bytes_per_token=2 * 2 * 2 * 32 * 4,
    total_params=39_702_080,
    active_params=39_702_080,
    aliases=("tiny-qwen3-vl",),
    chat_format="qwen3",
    vision=VisionSpec(),
)
TINY_QWEN3_VL_MOE = BaseModelEntry(
    name="loom/tiny-qwen3-vl-moe",
    cache_name="tiny-qwen3-vl-moe-v2",
    arch="Qwen3VLMoeForConditionalGeneration",
    vocab_size=151936,
    max_context_length=4096,
    train_bytes_per_token=2_765_568,
    kv_bytes_per_token=2 * 2 * 2 * 32 * 4,
    total_params=39_900_736,
    active_params=39_605_824,  # 6 of 8 experts idle per token: 2 layers x 6 x 49,152 parameters
    aliases=("tiny-qwen3-vl-moe",),
    chat_format="qwen3",
    vision=VisionSpec(),
)

BUILTIN_MODELS: dict[str, BaseModelEntry] = {
    entry.name: entry for entry in (SMOLLM2, TINY_KIMI_K2, TINY_QWEN3_MOE, TINY_QWEN3_VL, TINY_QWEN3_VL_MOE)
}


class UnknownModel(ValueError):
    """A configured or requested base model is not in the catalogue."""


class Catalogue:
    """The base models one deployment serves, looked up by id or alias."""

    def __init__(self, entries: Iterable[BaseModelEntry]) -> None:
        self.entries: dict[str, BaseModelEntry] = {}
        self._by_alias: dict[str, BaseModelEntry] = {}
        for entry in entries:
            for key in (entry.name, *entry.aliases):
                if key in self._by_alias:
                    raise UnknownModel(f"{key!r} names two base models ({self._by_alias[key].name}, {entry.name})")
                self._by_alias[key] = entry
            self.entries[entry.name] = entry

    def narrowed(self, names: Iterable[str]) -> Catalogue:
        """The entries `names` lists (ids or aliases), or all of them when `names` is empty."""
        names = list(names)
        if not names:
            return self
        entries = []
        for name in names:
            entry = self.resolve(name)
            if entry is None:
                raise UnknownModel(f"unknown base model {name!r}; the catalogue holds {sorted(self.entries)}")
            entries.append(entry)
        return Catalogue(entries)

    def in_pool(self, pool: str | None) -> Catalogue:
        """The entries the worker pool `pool` serves (all of them when `pool` is None)."""
        return self if pool is None else Catalogue(e for e in self.entries.values() if e.pool == pool)

    def resolve(self, name: str) -> BaseModelEntry | None:
        return self._by_alias.get(name)

    @property
    def names(self) -> list[str]:
        return list(self.entries)
