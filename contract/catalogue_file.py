"""The operator's catalogue file (`LOOM_MODEL_CATALOGUE`, YAML or TOML): the base models a deployment adds to the
built-ins, read once at start-up into `BaseModelEntry`s.

    models:
      - id: Qwen/Qwen3-8B                 # what clients pass as base_model
        source: /srv/models/Qwen3-8B      # or s3://bucket/prefix: a save_pretrained folder
        aliases: [qwen3-8b]
        dtype: bfloat16                   # float32 (default) or bfloat16
        max_context_length: 32768         # default: the config's max_position_embeddings (never above it)
        max_lora_rank: 64
        chat_format: qwen3                # template (the folder's own), kimi_k2 or qwen3
        image_min_pixels: 65536           # vision-language models: the pixel range images are resized into
        image_max_pixels: 16777216        #   (defaults: Qwen3-VL's published processor settings)
        lora_targets: {attn: [q_proj, k_proj, v_proj, o_proj], mlp: [gate_proj, up_proj, down_proj]}
        pool: default                     # the worker pool (LOOM_WORKER_POOL) that serves it
    builtins: true                        # also serve the built-in models (default true)

Everything else is read from the source's `config.json`: the architecture (refused here when Loom cannot serve it),
vocabulary, context, parameter counts (`contract/model_size.py`) and the memory estimates admission uses.

Limits: only `config.json` is read here (the API process has no torch); whether the weights match it is checked
by the worker when it loads the folder (`worker/models/model_folder.py`), also at start-up.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from contract.architectures import architecture_of, max_context_of, text_config_of
from contract.catalogue import (
    BUILTIN_MODELS,
    BaseModelEntry,
    Catalogue,
    ChatFormat,
    Dtype,
    LoraTargets,
    UnknownModel,
    VisionSpec,
)
from contract.model_size import model_size
from contract.settings import Settings
from loom.types.images import QWEN3_VL_GEOMETRY, ImageGeometry

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


class CatalogueError(ValueError):
    """The catalogue file, or a model folder it names, cannot be served; the message names the file and problem."""


class _Targets(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attn: list[str] = Field(default_factory=list)
    mlp: list[str] = Field(default_factory=list)
    experts: list[str] = Field(default_factory=list)
    unembed: list[str] = Field(default_factory=lambda: ["lm_head"])


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    source: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    dtype: Dtype = "float32"
    max_context_length: int | None = Field(None, gt=0)
    max_lora_rank: int = Field(64, gt=0, le=1024)
    chat_format: ChatFormat = "template"
    lora_targets: _Targets | None = None
    pool: str = Field("default", min_length=1)
    train_bytes_per_token: int | None = Field(None, gt=0)
    image_min_pixels: int = Field(QWEN3_VL_GEOMETRY.min_pixels, gt=0)
    image_max_pixels: int = Field(QWEN3_VL_GEOMETRY.max_pixels, gt=0)

    @model_validator(mode="after")
    def _pixel_range(self) -> _Model:
        if self.image_min_pixels > self.image_max_pixels:
            raise ValueError(
                f"image_min_pixels {self.image_min_pixels} exceeds image_max_pixels {self.image_max_pixels}"
            )
        return self


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[_Model] = Field(default_factory=list)
    builtins: bool = True


def _parse(path: Path) -> _File:
    try:
        text = path.read_text()
    except OSError as exc:
        raise CatalogueError(f"{path}: cannot read the catalogue file ({exc.strerror})") from None
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise CatalogueError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}") from None
    try:
        return _File.model_validate(raw or {})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CatalogueError(f"{path}: {problems}") from None


def read_source_config(source: str) -> tuple[dict[str, Any], str]:
    """The parsed `config.json` of a local folder or `s3://bucket/prefix`, and where it was read (for messages)."""
    if source.startswith("s3://"):
        from botocore.exceptions import BotoCoreError, ClientError

        from contract.checkpoint_s3 import env_client, parse_s3_uri

        bucket, prefix = parse_s3_uri(source.rstrip("/"))
        where = f"s3://{bucket}/{prefix}/config.json"
        try:
            raw = env_client().get_object(Bucket=bucket, Key=f"{prefix}/config.json")["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise CatalogueError(f"{where}: cannot read ({exc})") from None
    else:
        where = str(Path(source) / "config.json")
        try:
            raw = Path(where).read_bytes()
        except OSError as exc:
            raise CatalogueError(
                f"{where}: cannot read ({exc.strerror}); is {source} a save_pretrained folder?"
            ) from None
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise CatalogueError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CatalogueError(f"{where}: not a JSON object")
    return config, where


def kv_bytes_per_token(config: Mapping[str, Any], dtype: Dtype) -> int:
    """KV-cache bytes per token: transformers caches MLA's keys and values decompressed, per head."""
    config = text_config_of(config)
    layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    if "kv_lora_rank" in config:
        per_layer = heads * (config["qk_nope_head_dim"] + config["qk_rope_head_dim"] + config["v_head_dim"])
    else:
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        per_layer = 2 * int(config.get("num_key_value_heads") or heads) * head_dim
    return layers * per_layer * DTYPE_BYTES[dtype]


def train_bytes_per_token(config: Mapping[str, Any]) -> int:
    """Estimated peak activation bytes per padded token of a training pass (fp32 activations): about 4.5 floats
    per vocabulary entry (logits, log-softmax and their gradients) plus, per layer, about 20 per hidden unit and 10
    per active MLP unit. Fitted to `benchmarks/train_pass_memory.py`'s measurements (SmolLM2 135M: 4.1 MB
    estimated vs 4.2 MB measured). A vision-language model's language model counts; image tokens are tokens."""
    config = text_config_of(config)
    if "n_routed_experts" in config:
        mlp = config["moe_intermediate_size"] * (config["num_experts_per_tok"] + config.get("n_shared_experts", 0))
    elif "num_experts" in config or "num_local_experts" in config:
        mlp = config["moe_intermediate_size"] * config["num_experts_per_tok"]
    else:
        mlp = config["intermediate_size"]
    per_layer = 20 * config["hidden_size"] + 10 * mlp
    return 4 * int(4.5 * config["vocab_size"] + config["num_hidden_layers"] * per_layer)


def vision_spec_of(config: Mapping[str, Any], model: _Model) -> VisionSpec:
    """A vision-language model's image tiling and special tokens from its config (`vision_config`'s patch, merge
    and temporal patch sizes; the top-level token ids), with the entry's pixel range."""
    vision = config["vision_config"]
    geometry = ImageGeometry(
        patch_size=int(vision["patch_size"]),
        merge_size=int(vision["spatial_merge_size"]),
        temporal_patch_size=int(vision["temporal_patch_size"]),
        min_pixels=model.image_min_pixels,
        max_pixels=model.image_max_pixels,
    )
    return VisionSpec(
        geometry=geometry,
        image_token_id=int(config["image_token_id"]),
        vision_start_token_id=int(config["vision_start_token_id"]),
        vision_end_token_id=int(config["vision_end_token_id"]),
    )


def cache_name_of(model_id: str) -> str:
    """A model cache folder name for an id (`Qwen/Qwen3-8B` -> `qwen--qwen3-8b`)."""
    return re.sub(r"[^a-z0-9._-]+", "-", model_id.lower().replace("/", "--"))


def entry_from_config(model: _Model, config: Mapping[str, Any], where: str) -> BaseModelEntry:
    arch = architecture_of(config, where)
    limit = max_context_of(config)
    if model.max_context_length is not None and limit and model.max_context_length > limit:
        raise CatalogueError(
            f"{model.id}: max_context_length {model.max_context_length} exceeds {where}'s "
            f"max_position_embeddings {limit}"
        )
    try:
        size = model_size(config)
        vocab = int(text_config_of(config)["vocab_size"])
        vision = vision_spec_of(config, model) if arch.vision else None
        kv = kv_bytes_per_token(config, model.dtype)
        train = model.train_bytes_per_token or train_bytes_per_token(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise CatalogueError(f"{where}: incomplete {arch.model_type} config ({type(exc).__name__}: {exc})") from None
    targets = model.lora_targets
    return BaseModelEntry(
        name=model.id,
        cache_name=cache_name_of(model.id),
        arch=arch.model_class,
        vocab_size=vocab,
        max_context_length=model.max_context_length or limit,
        train_bytes_per_token=train,
        kv_bytes_per_token=kv,
        total_params=size.total_params,
        active_params=size.active_params,
        max_lora_rank=model.max_lora_rank,
        aliases=tuple(model.aliases),
        source=model.source,
        dtype=model.dtype,
        chat_format=model.chat_format,
        lora_targets=None
        if targets is None
        else LoraTargets(tuple(targets.attn), tuple(targets.mlp), tuple(targets.unembed), tuple(targets.experts)),
        pool=model.pool,
        vision=vision,
    )


def load_catalogue(path: Path | None) -> Catalogue:
    """The built-ins plus the entries of the catalogue file at `path` (just the built-ins when None)."""
    if path is None:
        return Catalogue(BUILTIN_MODELS.values())
    parsed = _parse(path)
    entries = list(BUILTIN_MODELS.values()) if parsed.builtins else []
    for model in parsed.models:
        config, where = read_source_config(model.source)
        try:
            entries.append(entry_from_config(model, config, where))
        except ValueError as exc:
            raise CatalogueError(f"{path}: {exc}") from None
    try:
        return Catalogue(entries)
    except ValueError as exc:
        raise CatalogueError(f"{path}: {exc}") from None


def served_catalogue(settings: Settings) -> Catalogue:
    """What this deployment serves: the catalogue narrowed to the `base_models` setting."""
    try:
        return load_catalogue(settings.model_catalogue).narrowed(settings.base_models)
    except UnknownModel as exc:
        raise CatalogueError(f"LOOM_BASE_MODELS: {exc}") from None
