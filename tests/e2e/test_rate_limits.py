"""A tenant's tokens-per-minute limit, met by the official tinker SDK in an ordinary training loop.

Tenant `throttled` (its own limit set with the real `loom tenants set`, on the shared server) may submit 32 tokens
a minute; the loop pipelines four forward_backward + optim_step pairs of 16-token data, so at least one
forward_backward is refused with 429 whatever the second the test starts at. The SDK waits for `Retry-After` and
sends it again; every step completes, in order: the losses are those of the same loop (same LoRA seed) run first
by an unlimited tenant. The access log shows the refusal, and `GET /api/v1/limits` reports the limit.

Limits: waits for the next minute window (up to a minute of the suite).
"""

from __future__ import annotations

import json

import httpx
import pytest
import tinker
from tinker import types

from tests.e2e.server import LoomServer, create_key, loom_cli
from tests.e2e.wire import SMOL

TOKENS_PER_MINUTE = 32
STEPS = 4


def training_losses(server: LoomServer, key: str) -> list[float]:
    """Four pipelined SL steps on one 16-token datum from a fixed LoRA seed; the loss of each."""
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    training = service.create_lora_training_client(base_model=SMOL, rank=4, seed=7).result()
    tokens = list(range(300, 317))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[16])},
    )
    steps = []
    for _ in range(STEPS):
        steps.append(training.forward_backward([datum], "cross_entropy"))
        steps.append(training.optim_step(types.AdamParams(learning_rate=1e-2)))
    return [future.result().metrics["loss:sum"] for future in steps[::2]]


def test_the_sdk_waits_out_a_tokens_per_minute_limit_and_every_step_lands_in_order(server: LoomServer) -> None:
    reference = training_losses(server, create_key(server.data_dir, "unthrottled"))
    key = create_key(server.data_dir, "throttled")
    loom_cli(server.data_dir, "tenants", "set", "throttled", "--tokens-per-minute", str(TOKENS_PER_MINUTE))

    assert training_losses(server, key) == pytest.approx(reference, rel=1e-4)
    lines = [json.loads(line) for line in server.access_log_path.read_text().splitlines() if line.startswith("{")]
    refused = [
        line
        for line in lines
        if line["tenant"] == "throttled" and line["status"] == 429 and line["path"] == "/api/v1/forward_backward"
    ]
    assert refused, "no forward_backward was refused: the limit was not met"

    limits = httpx.get(f"{server.url}/api/v1/limits", headers={"X-API-Key": key}).json()
    assert limits["tokens_per_minute"]["limit"] == TOKENS_PER_MINUTE
