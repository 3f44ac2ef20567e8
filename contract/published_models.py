"""Published checkpoints whose `config.json` Loom keeps as data, with the parameter counts their authors state.

Each `PublishedModel` names a public checkpoint, its file under `contract/model_configs/` (the checkpoint's
`config.json` as published: same keys, values and key order) and the total and activated parameter counts its
model card or report states, with where they are stated. `published_config(slug)` reads one file.

Limits: these are data for sizing (`contract/model_size.py`, `scripts/hardware_table.py`) and for tests that pin
the size arithmetic to transformers; listing a model here neither puts it in the catalogue nor fetches weights.
The stated counts are headline figures, rounded by their authors (see `tests/unit/test_model_configs.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"


@dataclass(frozen=True)
class PublishedModel:
    name: str
    """The public id (`org/name` on the Hugging Face Hub)."""
    slug: str
    """Its file: `contract/model_configs/<slug>.json`."""
    total_params: int
    """Total parameters as stated (a rounded figure: 1.04T is 1_040_000_000_000)."""
    active_params: int
    """Parameters used per token as stated (the total for a dense model)."""
    source: str
    """Where the two counts are stated (the config itself is `https://huggingface.co/<name>/blob/main/config.json`)."""


PUBLISHED_MODELS: dict[str, PublishedModel] = {
    m.slug: m
    for m in (
        PublishedModel(
            "moonshotai/Kimi-K2-Instruct",
            "kimi-k2-instruct",
            total_params=1_040_000_000_000,
            active_params=32_000_000_000,
            source="https://arxiv.org/abs/2507.20534",
        ),
        PublishedModel(
            "Qwen/Qwen3-235B-A22B",
            "qwen3-235b-a22b",
            total_params=235_000_000_000,
            active_params=22_000_000_000,
            source="https://huggingface.co/Qwen/Qwen3-235B-A22B",
        ),
        PublishedModel(
            "Qwen/Qwen3-30B-A3B",
            "qwen3-30b-a3b",
            total_params=30_500_000_000,
            active_params=3_300_000_000,
            source="https://huggingface.co/Qwen/Qwen3-30B-A3B",
        ),
        PublishedModel(
            "Qwen/Qwen3-32B",
            "qwen3-32b",
            total_params=32_800_000_000,
            active_params=32_800_000_000,
            source="https://huggingface.co/Qwen/Qwen3-32B",
        ),
        PublishedModel(
            "Qwen/Qwen3-8B",
            "qwen3-8b",
            total_params=8_200_000_000,
            active_params=8_200_000_000,
            source="https://huggingface.co/Qwen/Qwen3-8B",
        ),
        PublishedModel(
            "Qwen/Qwen3-0.6B",
            "qwen3-0.6b",
            total_params=600_000_000,
            active_params=600_000_000,
            source="https://huggingface.co/Qwen/Qwen3-0.6B",
        ),
        PublishedModel(
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "smollm2-135m-instruct",
            total_params=135_000_000,
            active_params=135_000_000,
            source="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
    )
}


def published_config(slug: str) -> dict[str, Any]:
    """The published `config.json` of `PUBLISHED_MODELS[slug]`, parsed (KeyError for a slug not listed)."""
    return json.loads((CONFIG_DIR / f"{PUBLISHED_MODELS[slug].slug}.json").read_text())
