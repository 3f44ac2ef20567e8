"""A server restart loses no acknowledged request: finished results are served again from the database, and
requests accepted while no worker was running execute once workers come back. A request left running by servers
that died running it `LOOM_MAX_ATTEMPTS` times is failed as a poison request on the next start, and another
tenant's request that was running with it completes."""

from __future__ import annotations

import httpx
import pytest

from api.db.models import Job, JobState
from api.db.session import make_engine, make_session_factory
from contract.settings import Settings
from tests.e2e.server import LoomServer, create_key, free_port
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


def test_a_poison_request_left_running_by_dead_servers_is_failed_and_the_other_runs(tmp_path) -> None:
    port, env = free_port(), {"LOOM_BASE_MODELS": SMOL, "LOOM_MAX_ATTEMPTS": "2"}
    first = LoomServer(tmp_path, port, env_extra=env).start()
    bob_key = create_key(tmp_path, "bob")
    try:
        with client(first) as alice, client(first) as bob:
            bob.headers["X-API-Key"] = bob_key
            alice_run, bob_run = new_run(alice), new_run(bob)
    finally:
        first.stop()

    api_only = LoomServer(tmp_path, port, env_extra={**env, "LOOM_QUEUE": "external"}).start()
    try:
        with client(api_only) as alice, client(api_only) as bob:
            bob.headers["X-API-Key"] = bob_key
            body = [datum([1, 2, 3, 4])]
            poison = alice.post("/api/v1/forward_backward", json=fb_body(alice_run, 1, body)).json()["request_id"]
            other = bob.post("/api/v1/forward_backward", json=fb_body(bob_run, 1, body)).json()["request_id"]
    finally:
        api_only.stop()
    # Both were running when a server died; the poison one had already taken down the server before.
    sessions = make_session_factory(make_engine(Settings(data_dir=tmp_path).database_url))
    with sessions.begin() as session:
        for job_id, attempt in ((poison, 2), (other, 1)):
            job = session.get(Job, job_id)
            job.state, job.lease_owner, job.attempt = JobState.LEASED.value, "dead-host:1:smollm2", attempt
            job.lease_expires_at = job.created_at.replace(year=job.created_at.year + 1)

    again = LoomServer(tmp_path, port, env_extra=env).start()
    try:
        with client(again) as alice, client(again) as bob:
            bob.headers["X-API-Key"] = bob_key
            failed = result(alice, poison)
            assert failed["category"] == "server" and "lost 2 times" in failed["error"], failed
            assert result(bob, other)["metrics"]["loss:sum"] > 0
    finally:
        again.stop()
