"""Check a model folder before any weight is loaded, and materialise `s3://` sources into the model cache.

`check_model_folder` reads only `config.json`, the shard index and each shard's safetensors header, and refuses,
naming the file and the problem: an architecture Loom cannot serve, an index that is not JSON or has no weight map,
a shard the index names that is missing or unreadable, a tensor the index places in a shard that lacks it, a shard
tensor or `*.safetensors` file the index does not list, or a folder with no weights (`require_tokenizer`: or no tokenizer). `loading_problems` turns what
transformers reports after loading (missing, unexpected or wrongly shaped tensors, i.e. a config that does not
match the weights) into the same kind of message. Both run when a worker starts, never at a first request.
`transformers_config` reads a config into its architecture's transformers class, for loading and for building.

`fetch_s3_folder` downloads every object under an `s3://` prefix into the model cache once (`folder_once`), checking
every size against the listing, so a half-downloaded folder is never used.

Limits: shapes are checked by transformers while loading (a header check could not know the fused-expert or
quantised layouts); every rank of a ZeRO-3 group downloads and reads all shards.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from contract.architectures import Architecture, architecture_of
from contract.catalogue_file import CatalogueError
from worker.models.folder_once import folder_once

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tiktoken.model", "tokenizer.model", "vocab.json")


class ModelFolderError(CatalogueError):
    """A model folder cannot be served; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    config: dict[str, Any]
    architecture: Architecture
    weight_map: dict[str, str]
    """Checkpoint tensor name -> the shard file holding it."""


def _header_keys(shard: Path) -> set[str]:
    try:
        with safe_open(str(shard), framework="pt") as f:
            return set(f.keys())
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise ModelFolderError(f"{shard}: not a readable safetensors file ({exc})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ModelFolderError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise ModelFolderError(f"{path}: not valid JSON ({exc})") from None


def _index_weight_map(path: Path) -> dict[str, str]:
    index = _read_json(path / INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFolderError(f"{path / INDEX}: no `weight_map` of tensor name -> shard file")
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or shard.startswith("."):
            raise ModelFolderError(f"{path / INDEX}: tensor {name!r} maps to {shard!r}, not a shard file name")
        by_shard.setdefault(shard, []).append(name)
    for shard, names in sorted(by_shard.items()):
        if not (path / shard).is_file():
            raise ModelFolderError(
                f"{path / shard}: missing; {INDEX} places {len(names)} tensor(s) there (e.g. {names[0]})"
            )
        keys = _header_keys(path / shard)
        absent = sorted(set(names) - keys)
        if absent:
            raise ModelFolderError(
                f"{path / shard}: lacks {len(absent)} tensor(s) that {INDEX} places there (e.g. {absent[0]})"
            )
        unlisted = sorted(keys - set(names))
        if unlisted:
            raise ModelFolderError(
                f"{path / shard}: holds {len(unlisted)} tensor(s) that {INDEX} does not list (e.g. {unlisted[0]})"
            )
    for stray in sorted(set(p.name for p in path.glob("*.safetensors")) - set(by_shard)):
        raise ModelFolderError(f"{path / stray}: a weights file {INDEX} does not list")
    return dict(weight_map)


def check_model_folder(path: Path) -> ModelFolder:
    """The folder's config, architecture and tensor placement, or a `ModelFolderError` naming what is wrong."""
    if not path.is_dir():
        raise ModelFolderError(f"{path}: not a folder")
    config = _read_json(path / "config.json")
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path / 'config.json'}: not a JSON object")
    try:
        architecture = architecture_of(config, str(path / "config.json"))
    except ValueError as exc:
        raise ModelFolderError(str(exc)) from None
    if (path / INDEX).exists():
        weight_map = _index_weight_map(path)
    elif (path / SINGLE).is_file():
        weight_map = dict.fromkeys(_header_keys(path / SINGLE), SINGLE)
    else:
        raise ModelFolderError(f"{path}: no weights (neither {SINGLE} nor {INDEX})")
    return ModelFolder(path, config, architecture, weight_map)


def transformers_config(config: Mapping[str, Any], **overrides: Any):
    """A parsed `config.json` as its architecture's transformers configuration class (`kimi_k2` as DeepseekV3's),
    with `overrides` in place of its fields. Fields are deep-copied: the classes rewrite nested dicts (a legacy
    `rope_scaling`) in place."""
    import transformers

    config_class = getattr(transformers, architecture_of(config, "config.json").config_class)
    skip = ("auto_map", "model_type", "transformers_version")
    fields = {k: copy.deepcopy(v) for k, v in config.items() if k not in skip}
    return config_class(**(fields | overrides))


def require_tokenizer(path: Path) -> None:
    """Refuse a model folder without tokenizer files (a model Loom serves must come with its tokenizer)."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFolderError(f"{path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")


def loading_problems(folder: ModelFolder, info: dict[str, Any], tied: bool) -> str | None:
    """What transformers' loading report (`output_loading_info=True`) says is wrong, naming the files."""

    def where(name: str) -> str:
        shard = folder.weight_map.get(name)
        return str(folder.path / shard) if shard else str(folder.path / INDEX)

    missing = sorted(k for k in info.get("missing_keys", ()) if not (tied and k == "lm_head.weight"))
    if missing:
        return (
            f"{folder.path / 'config.json'} describes {len(missing)} tensor(s) the checkpoint lacks "
            f"(e.g. {missing[0]}); the folder does not match its config"
        )
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        return (
            f"{where(unexpected[0])}: holds {len(unexpected)} tensor(s) the {folder.architecture.model_type} "
            f"config has no place for (e.g. {unexpected[0]})"
        )
    mismatched = sorted(info.get("mismatched_keys", ()), key=str)
    if mismatched:
        first = mismatched[0]
        name = first[0] if isinstance(first, tuple) else str(first)
        shapes = f": checkpoint {tuple(first[1])} vs config {tuple(first[2])}" if isinstance(first, tuple) else ""
        return (
            f"{where(name)}: {len(mismatched)} tensor(s) do not have the shape {folder.path / 'config.json'} "
            f"implies (e.g. {name}{shapes})"
        )
    return None


def fetch_s3_folder(source: str, target: Path) -> Path:
    """`target`, holding every object under the `s3://` prefix `source` (downloaded once, atomically)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from contract.checkpoint_s3 import env_client, parse_s3_uri

    bucket, prefix = parse_s3_uri(source.rstrip("/"))

    def download(staging: Path) -> None:
        client = env_client()
        listed: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
            for obj in page.get("Contents", ()):
                name = obj["Key"][len(prefix) + 1 :]
                if name and "/" not in name:
                    listed[name] = obj["Size"]
                    client.download_file(bucket, obj["Key"], str(staging / name))
        if "config.json" not in listed:
            raise ModelFolderError(f"{source}: no config.json under this prefix")
        for name, size in listed.items():
            if (staging / name).stat().st_size != size:
                raise ModelFolderError(f"{source}/{name}: downloaded {(staging / name).stat().st_size} of {size} bytes")

    try:
        return folder_once(target, "config.json", download)
    except (BotoCoreError, ClientError) as exc:
        raise ModelFolderError(f"{source}: cannot download ({exc})") from None
