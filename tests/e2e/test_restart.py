"""A server restart loses no acknowledged request: finished results are served again from the database, and
requests accepted while no worker was running execute once workers come back."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.server import LoomServer, free_port
from tests.e2e.wire import SMOL, datum, fb_body, new_run, result

pytestmark = pytest.mark.e2e


def client(server: LoomServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"X-API-Key": server.api_key}, timeout=60)


def test_results_and_queued_requests_survive_restarts(tmp_path) -> None:
    port = free_port()
    first = LoomServer(tmp_path, port, env_extra={"LOOM_BASE_MODELS": SMOL}).start()
    try:
        with client(first) as http:
            run_id = new_run(http)
            fb = http.post("/api/v1/forward_backward", json=fb_body(run_id, 1, [datum([1, 2, 3, 4])])).json()
            done = result(http, fb["request_id"])
    finally:
        first.stop()

    # A server with no workers acknowledges a sampling request; it stays queued in the database.
    api_only = LoomServer(tmp_path, port, env_extra={"LOOM_BASE_MODELS": SMOL, "LOOM_QUEUE": "external"}).start()
    try:
        with client(api_only) as http:
            sample = http.post(
                "/api/v1/asample",
                json={
                    "base_model": SMOL,
                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                    "sampling_params": {"max_tokens": 3, "temperature": 0.0},
                    "num_samples": 2,
                },
            ).json()
            poll = http.post("/api/v1/retrieve_future", json={"request_id": sample["request_id"]}, timeout=60).json()
            assert poll["type"] == "try_again"
    finally:
        api_only.stop()

    again = LoomServer(tmp_path, port, env_extra={"LOOM_BASE_MODELS": SMOL}).start()
    try:
        with client(again) as http:
            assert result(http, fb["request_id"]) == done
            sampled = result(http, sample["request_id"])
            assert len(sampled["sequences"]) == 2 and all(len(s["tokens"]) == 3 for s in sampled["sequences"])
    finally:
        again.stop()
