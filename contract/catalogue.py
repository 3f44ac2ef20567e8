"""The catalogue of base models a deployment can serve: the facts the API validates against and workers load by.

Each `BaseModelEntry` is what clients and the API need to know of a model (its public id and aliases, architecture,
vocabulary, context, LoRA rank limit) and where its files live in the model cache (`cache_name`). How a worker
materialises those files and which modules LoRA wraps are the worker's business (`worker/models/registry.py`),
keyed by the entry's name and architecture.

`Catalogue` is the set one process serves (all built-ins, or the names the `base_models` setting lists), resolving
ids and aliases.

Limits: only the built-in entries exist; weights never come from a hub.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class BaseModelEntry:
    name: str
    """The id clients pass as `base_model`."""
    cache_name: str
    """The model's folder under the model cache."""
    arch: str
    """The transformers architecture (`config.json` `architectures[0]`)."""
    vocab_size: int
    max_context_length: int
    train_bytes_per_token: int
    """Peak activation memory of a training pass per padded token (fp32, measured by
    `benchmarks/train_pass_memory.py`); what admission multiplies the pass budget by."""
    kv_bytes_per_token: int
    """KV-cache bytes per token of a decode batch (fp32: 2 × layers × KV heads × head dim × 4)."""
    max_lora_rank: int = 64
    aliases: tuple[str, ...] = field(default=())

    def folder(self, model_cache_dir: Path) -> Path:
        """Where the model's `save_pretrained` files live (built there once by the worker)."""
        return model_cache_dir / self.cache_name


SMOLLM2 = BaseModelEntry(
    name="HuggingFaceTB/SmolLM2-135M-Instruct",
    cache_name="smollm2-135m-instruct",
    arch="LlamaForCausalLM",
    vocab_size=49152,
    max_context_length=8192,
    train_bytes_per_token=4_200_000,  # 4,005 KiB/token measured at 1×512 (benchmarks/train_pass_memory.py)
    kv_bytes_per_token=2 * 30 * 3 * 64 * 4,
    aliases=("smollm2-135m-instruct",),
)
TINY_KIMI_K2 = BaseModelEntry(
    name="loom/tiny-kimi-k2",
    cache_name="tiny-kimi-k2-v2",
    arch="DeepseekV3ForCausalLM",
    vocab_size=129280,
    max_context_length=4096,
    train_bytes_per_token=2_300_000,  # 2,179 KiB/token measured at 1×512
    kv_bytes_per_token=2 * 3 * 4 * (32 + 16 + 32) * 4,
    aliases=("tiny-kimi-k2",),
)

BUILTIN_MODELS: dict[str, BaseModelEntry] = {entry.name: entry for entry in (SMOLLM2, TINY_KIMI_K2)}


class UnknownModel(ValueError):
    """A configured or requested base model is not in the catalogue."""


class Catalogue:
    """The base models one deployment serves, looked up by id or alias."""

    def __init__(self, entries: Iterable[BaseModelEntry]) -> None:
        self.entries = {entry.name: entry for entry in entries}
        self._by_alias = {alias: entry for entry in self.entries.values() for alias in (entry.name, *entry.aliases)}

    @classmethod
    def serving(cls, names: Iterable[str]) -> Catalogue:
        """The built-ins named in `names` (ids or aliases), or all of them when `names` is empty."""
        names = list(names)
        if not names:
            return cls(BUILTIN_MODELS.values())
        builtins = cls(BUILTIN_MODELS.values())
        entries = []
        for name in names:
            entry = builtins.resolve(name)
            if entry is None:
                raise UnknownModel(f"unknown base model {name!r}; built-in: {sorted(BUILTIN_MODELS)}")
            entries.append(entry)
        return cls(entries)

    def resolve(self, name: str) -> BaseModelEntry | None:
        return self._by_alias.get(name)

    @property
    def names(self) -> list[str]:
        return list(self.entries)
