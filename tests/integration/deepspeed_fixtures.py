"""Finding a Python that can import DeepSpeed, for the tests that run ranks under it.

`deepspeed_python()` returns this interpreter when it has `deepspeed`, else `.venv-ds/bin/python` (made by
scripts/setup-deepspeed, which runs first under `CI=true`), else None (the caller skips). `rank_env()` is the
environment ranks run with: DeepSpeed's CPU accelerator, one torch thread each, and the shared-memory op that
scripts/setup-deepspeed pre-built. The `ranks_leave_no_shm` fixture removes the shared-memory buffers
(/dev/shm/deepspeed_allreduce_buffer_*, 66 MiB each) that DeepSpeed's CPU collectives leave behind when their
ranks exit.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup-deepspeed"


def deepspeed_python() -> str | None:
    if importlib.util.find_spec("deepspeed") is not None:
        return sys.executable
    if os.environ.get("CI") == "true" and SETUP_SCRIPT.exists():
        result = subprocess.run([str(SETUP_SCRIPT)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"scripts/setup-deepspeed failed ({result.returncode}):\n{result.stderr[-4000:]}")
    venv_python = REPO_ROOT / ".venv-ds" / "bin" / "python"
    if venv_python.exists():
        probe = subprocess.run([str(venv_python), "-c", "import deepspeed"], capture_output=True, text=True)
        if probe.returncode == 0:
            return str(venv_python)
    return None


SHM_BUFFERS = "deepspeed_allreduce_buffer_*"


@pytest.fixture
def ranks_leave_no_shm() -> Iterator[None]:
    shm = Path("/dev/shm")
    before = set(shm.glob(SHM_BUFFERS))
    yield
    for leftover in set(shm.glob(SHM_BUFFERS)) - before:
        leftover.unlink(missing_ok=True)


def rank_env(python: str) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    if python != sys.executable:
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(python).parents[1] / "torch_extensions"))
    return env
