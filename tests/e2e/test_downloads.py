"""Downloading trained weights with the official `tinker` SDK and CLI: a PEFT adapter that reproduces the server.

The official SDK trains SmolLM2 two steps, exports the adapter with `save_weights_external` and asks for its
`get_external_weights_urls`. The files are then fetched three ways — a plain HTTP client with no API key, the
unmodified `tinker checkpoint download` (with its progress bar, and again with `--format json`), and Loom's own
SDK (`RestClient.download_checkpoint`) — and must be byte-identical. The downloaded folder is loaded with
`peft.PeftModel.from_pretrained` onto the plain transformers SmolLM2 and its per-token logprobs of a sequence match
the server's `compute_logprobs` on the same weights within 1e-4 (while differing from the base model's by more
than 1e-3, so an adapter PEFT ignored would fail). The run's checkpoint list shows the exports as `external`.
Another tenant gets 404 for the URLs. An export encrypted to an age key downloads as `.age` files that decrypt to
the same adapter.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pyrage
import pytest
import tinker
import torch
from peft import PeftModel
from pyrage import x25519
from tinker import types
from transformers import AutoModelForCausalLM

import loom
from contract.catalogue import SMOLLM2
from contract.settings import Settings

pytestmark = pytest.mark.e2e

SMOL = SMOLLM2.name
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
LOGPROB_ATOL = 1e-4
TINKER_CLI = str(Path(sys.executable).with_name("tinker"))


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 5000) for _ in range(n)]


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:]}
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([TINKER_CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@torch.no_grad()
def _token_logprobs(model: torch.nn.Module, tokens: list[int]) -> list[float]:
    logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return logprobs.gather(1, torch.tensor(tokens[1:])[:, None])[:, 0].tolist()


@pytest.fixture(scope="module")
def exported(server, tmp_path_factory):
    """A two-step SmolLM2 run exported as external weights, plus the server's logprobs of `probe` on them."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_BASE_URL", server.url)
        env.setenv("TINKER_API_KEY", server.api_key)
        service = tinker.ServiceClient()
        training = service.create_lora_training_client(base_model=SMOL, rank=8, seed=11).result()
        batch = [_datum(_tokens(12, seed)) for seed in (1, 2)]
        for _ in range(2):
            training.forward_backward(batch, "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        path = training.save_weights_external("final").result().path
        identity = x25519.Identity.generate()
        sealed = training.save_weights_external("sealed", age_encryption_recipients=[str(identity.to_public())])
        sealed_path = sealed.result().path
        probe = _tokens(16, seed=3)
        sampler = training.save_weights_and_get_sampling_client().result()
        server_logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(probe)).result()
        rest = tinker.RestClient()
        urls = rest.get_external_weights_urls(path).result()
        listed = rest.list_checkpoints(path.removeprefix("tinker://").split("/")[0]).result().checkpoints
    return {
        "path": path,
        "sealed_path": sealed_path,
        "identity": identity,
        "urls": urls,
        "listed": {c.tinker_path: c.checkpoint_type for c in listed},
        "probe": probe,
        "server_logprobs": server_logprobs,
        "dir": tmp_path_factory.mktemp("downloads"),
    }


def test_download_paths_agree_and_the_adapter_reproduces_the_server(server, exported, monkeypatch) -> None:
    path, urls, root = exported["path"], exported["urls"], exported["dir"]
    run_id = path.removeprefix("tinker://").split("/")[0]
    assert path == f"tinker://{run_id}/external_weights/final"
    assert sorted(urls.urls) == ADAPTER_FILES
    assert exported["listed"][path] == exported["listed"][exported["sealed_path"]] == "external"

    by_http = root / "http"
    by_http.mkdir()
    with httpx.Client(timeout=60) as plain:
        for name, url in urls.urls.items():
            response = plain.get(url)
            assert response.status_code == 200, response.text
            assert response.headers["content-length"] == str(len(response.content))
            (by_http / name).write_bytes(response.content)
    adapter = _files(by_http)
    config = json.loads(adapter["adapter_config.json"])
    assert config["base_model_name_or_path"] == SMOL and config["r"] == 8

    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": server.api_key}
    _cli("checkpoint", "download", path, "--output", str(root / "cli"), env=env, cwd=root)
    cli_folder = root / "cli" / path.removeprefix("tinker://").replace("/", "_")
    assert _files(cli_folder) == adapter
    out = _cli("--format", "json", "checkpoint", "download", path, "-o", str(root / "json"), env=env, cwd=root)
    report = json.loads(out.stdout)
    assert report["checkpoint_path"] == path
    assert report["file_size_bytes"] == sum(len(data) for data in adapter.values())
    assert _files(Path(report["destination"])) == adapter

    with loom.ServiceClient(base_url=server.url, api_key=server.api_key) as ours:
        written = ours.create_rest_client().download_checkpoint(path, root / "loom").result(120)
    assert sorted(written) == ADAPTER_FILES and _files(root / "loom") == adapter

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = SMOLLM2.folder(Settings().model_cache_dir)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    probe = exported["probe"]
    base_logprobs = _token_logprobs(base, probe)
    peft_logprobs = _token_logprobs(PeftModel.from_pretrained(base, str(by_http)).eval(), probe)
    server_logprobs = exported["server_logprobs"]
    assert server_logprobs[0] is None and len(server_logprobs) == len(probe)
    assert peft_logprobs == pytest.approx(server_logprobs[1:], abs=LOGPROB_ATOL)
    assert max(abs(a - b) for a, b in zip(peft_logprobs, base_logprobs)) > 1e-3


def test_another_tenant_cannot_get_the_urls(server, exported, other_tenant_key) -> None:
    run_id = exported["path"].removeprefix("tinker://").split("/")[0]
    route = f"/api/v1/training_runs/{run_id}/checkpoints/external_weights/final/external_weights_urls"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get(route, headers={"X-API-Key": other_tenant_key}).status_code == 404
        assert client.get(route, headers={"X-API-Key": server.api_key}).status_code == 200


def test_an_age_encrypted_export_downloads_as_age_files(server, exported) -> None:
    sealed_path, root = exported["sealed_path"], exported["dir"]
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": server.api_key}
    _cli("checkpoint", "download", sealed_path, "-o", str(root / "sealed"), env=env, cwd=root)
    sealed = _files(root / "sealed" / sealed_path.removeprefix("tinker://").replace("/", "_"))
    assert sorted(sealed) == [f"{name}.age" for name in ADAPTER_FILES]
    with httpx.Client(timeout=60) as plain:
        adapter = {name: plain.get(url).content for name, url in exported["urls"].urls.items()}
    for name, data in adapter.items():
        assert pyrage.decrypt(sealed[f"{name}.age"], [exported["identity"]]) == data
