"""Scale-out shape: an API process with `LOOM_QUEUE=external` and a separate `loom worker` process share only the
database and checkpoint directory; the official SDK trains through them exactly as through `loom serve`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tinker
from tinker import types

from tests.e2e.server import LoomServer, free_port
from tests.e2e.wire import SMOL

pytestmark = pytest.mark.e2e


def test_api_and_worker_in_separate_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"LOOM_BASE_MODELS": SMOL, "LOOM_QUEUE": "external"}
    api = LoomServer(tmp_path, free_port(), env_extra=env).start()
    worker_log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "worker"],
        env={**os.environ, "LOOM_DATA_DIR": str(tmp_path), **env},
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    try:
        monkeypatch.setenv("TINKER_BASE_URL", api.url)
        monkeypatch.setenv("TINKER_API_KEY", api.api_key)
        training = tinker.ServiceClient().create_lora_training_client(base_model=SMOL, rank=4).result()
        datum = types.Datum(
            model_input=types.ModelInput.from_ints([1, 2, 3, 4, 5]), loss_fn_inputs={"target_tokens": [2, 3, 4, 5, 6]}
        )
        losses = []
        for _ in range(3):
            fb = training.forward_backward([datum], "cross_entropy")
            training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            losses.append(fb.result().metrics["loss:sum"])
        assert losses[-1] < losses[0]
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()
    finally:
        worker.terminate()
        worker.wait(30)
        api.stop()
