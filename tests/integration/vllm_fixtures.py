"""Helpers for tests that run the vLLM sampling backend (worker/vllm/) against a real vLLM server.

`require_vllm_venv()` finds the separate vLLM virtual environment made by scripts/setup-vllm. When it is missing
the test is skipped, except under `CI=true`, where the script is run (it takes a few minutes the first time).
`train_adapters()` trains LoRA adapters with Loom's own trainer and optimizer, all runs in one mixed batch per step.
`assert_logprobs_close()` / `assert_top_logprobs_close()` compare our logprobs with vLLM's within `LP_ATOL`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from contract.settings import Settings
from loom.types import AdamParams
from worker.adapter_pool import AdapterPool, ResidentRun
from worker.lora.adapter import LoraSpec
from worker.models.loader import LoadedModel
from worker.trainer import TrainDatum, WorkItem, run_forward_backward

SETUP_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "setup-vllm"

LP_ATOL = 1e-3
"""Logprob tolerance between our engine and vLLM (float32 on both sides; see test_vllm_backend.py)."""

GAPS = {"max |dlogprob|": 0.0}
"""Largest logprob difference seen by any test (printed at module teardown)."""


def assert_logprobs_close(a: list[float], b: list[float], what: str) -> float:
    """Assert two logprob lists agree within LP_ATOL; record the largest gap in GAPS."""
    assert len(a) == len(b), what
    diff = max((abs(x - y) for x, y in zip(a, b)), default=0.0)
    GAPS["max |dlogprob|"] = max(GAPS["max |dlogprob|"], diff)
    assert diff <= LP_ATOL, f"{what}: logprobs differ by {diff:.2e}\nours {a}\nvllm {b}"
    return diff


def assert_top_logprobs_close(a, b, what: str) -> None:
    """Assert two per-position top-k logprob lists agree (ties within LP_ATOL may swap order or membership)."""
    assert len(a) == len(b), what
    for i, (ta, tb) in enumerate(zip(a, b)):
        if ta is None or tb is None:
            assert ta is None and tb is None, f"{what}[{i}]"
            continue
        # Same set of tokens unless two of them are within the tolerance of each other (order may swap then).
        da, db = dict(ta), dict(tb)
        for tok in set(da) ^ set(db):
            holder = da if tok in da else db
            assert holder[tok] - min(holder.values()) <= LP_ATOL, f"{what}[{i}]: {ta} vs {tb}"
        for tok in set(da) & set(db):
            assert abs(da[tok] - db[tok]) <= LP_ATOL, f"{what}[{i}]: {ta} vs {tb}"


def _ready(venv: Path) -> bool:
    return (venv / "bin" / "python").exists() and any(venv.glob(".loom-setup-vllm-*"))


def require_vllm_venv() -> Path:
    """The vLLM venv, set up by scripts/setup-vllm; skips the test if absent (runs the script under CI=true)."""
    venv = Settings().vllm_venv
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
