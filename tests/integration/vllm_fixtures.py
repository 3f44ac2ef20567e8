"""Helpers for tests that run the vLLM sampling backend (worker/vllm_backend.py) against a real vLLM server.

`require_vllm_venv()` finds the separate vLLM virtual environment made by scripts/setup-vllm. When it is missing
the test is skipped, except under `CI=true`, where the script is run (it takes a few minutes the first time).
`train_adapters()` trains LoRA adapters with Loom's own trainer and optimizer, all runs in one mixed batch per step.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from loom.types import AdamParams
from worker.adapter_pool import AdapterPool, ResidentRun
from worker.lora.adapter import LoraSpec
from worker.models.loader import LoadedModel
from worker.trainer import TrainDatum, WorkItem, run_forward_backward
from worker.vllm_backend import REPO_ROOT, default_venv

SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup-vllm"


def _ready(venv: Path) -> bool:
    return (venv / "bin" / "python").exists() and any(venv.glob(".loom-setup-vllm-*"))


def require_vllm_venv() -> Path:
    """The vLLM venv, set up by scripts/setup-vllm; skips the test if absent (runs the script under CI=true)."""
    venv = default_venv()
    if os.environ.get("CI") == "true":
        result = subprocess.run([str(SETUP_SCRIPT)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"scripts/setup-vllm failed ({result.returncode}):\n{result.stderr[-4000:]}")
    if not _ready(venv):
        pytest.skip(f"no vLLM virtual environment at {venv}: run scripts/setup-vllm (CI=true runs it itself)")
    return venv


def chat_prompt(lm: LoadedModel, user: str) -> list[int]:
    text = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
    )
    return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def completion_datum(lm: LoadedModel, prompt: str, completion: str) -> TrainDatum:
    """Cross-entropy datum that trains only the completion tokens."""
    p = lm.tokenizer(prompt)["input_ids"]
    full = p + lm.tokenizer(completion, add_special_tokens=False)["input_ids"]
    weights = [0.0] * (len(p) - 1) + [1.0] * (len(full) - len(p))
    return TrainDatum(
        full[:-1], {"target_tokens": torch.tensor(full[1:]), "weights": torch.tensor(weights, dtype=torch.float32)}
    )


def train_adapters(
    pool: AdapterPool,
    specs: Sequence[LoraSpec],
    data: list[TrainDatum],
    steps: int,
    learning_rate: float,
) -> list[ResidentRun]:
    """One run per spec, each trained on `data` for `steps` AdamW steps, all runs in one forward/backward a step."""
    runs = [pool.create_run(f"vllm-test-{i}", spec) for i, spec in enumerate(specs)]
    for _ in range(steps):
        run_forward_backward(pool.lm, [WorkItem(run.slot, data, "cross_entropy") for run in runs])
        for run in runs:
            run.optimizer.step(AdamParams(learning_rate=learning_rate))
    return runs
