"""The public tinker-cookbook, unmodified, trains SmolLM2 on a live `loom serve`: its `math_rl` recipe on the
arithmetic environment, and its supervised chat recipe (`chat_sl`, what `sl_basic` wraps) on the cookbook's own
`example_data/conversations.jsonl`, a few steps each, run as the cookbook's users run them (`python -m ...` with chz
`key=value` arguments, `TINKER_BASE_URL`/`TINKER_API_KEY` in the environment) from its own venv.

Each must exit 0, write a metrics row per step and a final checkpoint that the server then lists. The cookbook
comes from `.venv-cookbook` (scripts/setup-cookbook: tinker-cookbook 0.5.8, the newest the package index can install,
with tinker 0.38); the test is skipped without it, except under CI=true, where it runs the setup script itself.

Configuration a user of SmolLM2 would pass (the recipes' defaults name Qwen models):
- `renderer_name=qwen3_instruct`: the cookbook recommends no renderer for models outside its own table, and
  SmolLM2-Instruct's chat template is ChatML (`<|im_start|>role\\n...<|im_end|>`), which is exactly what the
  Qwen3-instruct renderer writes (no thinking tags); `llama3` would emit header tokens SmolLM2 does not have.
- The cookbook loads the tokenizer by public model id through the Hugging Face hub; nothing may be downloaded from
  a hub at run time, so `HF_ENDPOINT` points at the server's Hub-compatible `/hf` routes (what the README tells an
  offline user to do) and datasets stay offline. Neither recipe touches any other hub or dataset.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import tinker

from contract.catalogue import SMOLLM2
from tests.e2e.hub_tokenizers import hub_env
from tests.e2e.server import LoomServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = ROOT / "scripts" / "setup-cookbook"
STEPS = 2
COMMON = [f"model_name={SMOLLM2.name}", "renderer_name=qwen3_instruct", "lora_rank=8", f"max_steps={STEPS}"]
COMMON += ["eval_every=0", "save_every=1", "behavior_if_log_dir_exists=delete"]


@pytest.fixture(scope="module")
def cookbook_python() -> Path:
    """The cookbook venv's interpreter (scripts/setup-cookbook); skips the tests if absent, except under CI=true."""
    venv = Path(os.environ.get("LOOM_COOKBOOK_VENV", ROOT / ".venv-cookbook"))
    if os.environ.get("CI") == "true":
        result = subprocess.run([str(SETUP_SCRIPT)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"scripts/setup-cookbook failed ({result.returncode}):\n{result.stderr[-4000:]}")
    if not any(venv.glob(".loom-setup-cookbook-*")):
        pytest.skip(f"no cookbook virtual environment at {venv}: run scripts/setup-cookbook (CI=true runs it itself)")
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def cookbook_dir(cookbook_python: Path) -> Path:
    """Where the installed tinker_cookbook package lives (its bundled example data is read from there)."""
    code = "import pathlib, tinker_cookbook; print(pathlib.Path(tinker_cookbook.__file__).parent)"
    return Path(
        subprocess.run([str(cookbook_python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    )


def run_recipe(python: Path, server: LoomServer, tmp_path: Path, module: str, *args: str) -> Path:
    """Run a cookbook recipe module against the server; its log folder, after checking it exited 0."""
    log_path = tmp_path / "log"
    env = hub_env(server.url)
    env.pop("PYTHONPATH", None)  # the venv's own packages only
    env |= {
        "TINKER_BASE_URL": server.url,
        "TINKER_API_KEY": server.api_key,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }
    result = subprocess.run(
        [str(python), "-m", module, *COMMON, f"log_path={log_path}", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, f"{module} exited {result.returncode}:\n{(result.stdout + result.stderr)[-6000:]}"
    return log_path


def check_logs(server: LoomServer, log_path: Path, metric: str) -> None:
    """A finite `metric` for every step, and a final checkpoint whose files the server lists for the run."""
    rows = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values = [row[metric] for row in rows if metric in row]
    assert len(values) == STEPS and all(math.isfinite(v) for v in values), rows
    final = [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines()][-1]
    assert final["name"] == "final", final
    run_id = tinker.ParsedCheckpointTinkerPath.from_tinker_path(final["state_path"]).training_run_id
    listed = tinker.RestClient(base_url=server.url, api_key=server.api_key).list_checkpoints(run_id).result()
    assert {final["state_path"], final["sampler_path"]} <= {c.tinker_path for c in listed.checkpoints}, listed


@pytest.mark.parametrize("loss_fn", [None, "gspo"], ids=["default-loss", "gspo"])
def test_math_rl_arithmetic(cookbook_python: Path, server: LoomServer, tmp_path: Path, loss_fn: str | None) -> None:
    """RL on the arithmetic environment: sample groups, grade them, train; with the recipe's default loss and with
    GSPO (sequence-level importance ratio), chosen the way a user chooses it (`loss_fn=...`)."""
    extra = [] if loss_fn is None else [f"loss_fn={loss_fn}"]
    args = ["env=arithmetic", "group_size=4", "groups_per_batch=2", "max_tokens=4", *extra]
    log_path = run_recipe(cookbook_python, server, tmp_path, "tinker_cookbook.recipes.math_rl.train", *args)
    check_logs(server, log_path, "env/all/reward/total")


def test_chat_sl_on_bundled_conversations(
    cookbook_python: Path, cookbook_dir: Path, server: LoomServer, tmp_path: Path
) -> None:
    """Supervised chat fine-tuning on the cookbook's bundled conversations file."""
    dataset = cookbook_dir / "example_data" / "conversations.jsonl"
    args = [f"dataset={dataset}", "batch_size=4", "max_length=512", "infrequent_eval_every=0"]
    log_path = run_recipe(cookbook_python, server, tmp_path, "tinker_cookbook.recipes.chat_sl.train", *args)
    check_logs(server, log_path, "train_mean_nll")


def test_setup_script_names_the_sdk_loom_speaks() -> None:
    """The cookbook venv gets the same `tinker` SDK as Loom's own venv, so the recipes speak the tested protocol."""
    assert f"tinker=={tinker.__version__}" in SETUP_SCRIPT.read_text(), tinker.__version__
