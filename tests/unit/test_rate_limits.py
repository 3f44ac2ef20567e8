"""Per-tenant rate limits and quotas through the real app, in-process (`LOOM_QUEUE=external`: no model loads).

The limiter's clock is pinned (`PinnedClock`), so a test never straddles a minute boundary by chance:
- requests per minute: headers on every counted response, 429 `rate_limit_exceeded` with `Retry-After` (to the
  next minute) and `x-should-retry: true` beyond, per tenant (another tenant is untouched), futures polls and
  heartbeats never counted, the next minute open again; a tenant's own limit beats the deployment default;
- tokens per minute: a forward_backward over the limit is refused before it is queued and takes no seq_id, so the
  same op sent again next minute is queued at its place; one request bigger than a minute's tokens is refused for
  good (`x-should-retry: false`);
- quotas: a run beyond `concurrent_runs` and a save beyond `stored_bytes` get 429 `quota_exceeded` (no retry);
  unloading a run or deleting a checkpoint makes room; a replayed create is never refused;
- a sample counts its Tinker prompt and n × max_tokens;
- `GET /api/v1/limits` reports the limits and the use of each; `loom tenants set/list` set and show them.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from api.cli import main as loom_cli
from api.db.models import Job
from api.db.tenants import set_limits
from api.rate_limits import WINDOW_SECONDS, RateLimiter, submitted_tokens
from contract.jobs import ChatPrompt, SampleJob, TinkerPrompt
from contract.settings import Settings
from loom.types import ModelInput, SamplingParams
from tests.unit.test_admission import fb_request
from tests.unit.test_checkpoint_management import BASE, Door, error, open_door


class PinnedClock:
    def __init__(self) -> None:
        self.now = 1_000 * WINDOW_SECONDS + 15.5  # 44.5 s before the next window

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> PinnedClock:
    return PinnedClock()


def limited_door(tmp_path: Path, clock: PinnedClock, **limits: int) -> Iterator[Door]:
    settings = Settings(data_dir=tmp_path, base_models=[BASE], queue="external", **limits)
    for door in open_door(settings):
        door.state.rate_limiter = RateLimiter(settings, clock)
        yield door


def queued_jobs(door: Door) -> int:
    with door.state.reading() as session:
        return session.scalar(select(func.count()).select_from(Job))


def test_requests_per_minute_are_counted_per_tenant_and_refused_with_retry_after(tmp_path, clock) -> None:
    for door in limited_door(tmp_path, clock, tenant_requests_per_minute=3):
        for remaining in (2, 1, 0):
            ok = door.alice.get("/api/v1/keys")
            assert ok.status_code == 200
            assert ok.headers["x-ratelimit-limit-requests"] == "3"
            assert ok.headers["x-ratelimit-remaining-requests"] == str(remaining)
            assert ok.headers["x-ratelimit-reset-requests"] == "45s"
        refused = door.alice.get("/api/v1/keys")
        assert error(refused, 429)["code"] == "rate_limit_exceeded"
        assert refused.headers["retry-after"] == "45" and refused.headers["x-should-retry"] == "true"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert "3 requests per minute" in refused.json()["error"]["message"]

        assert door.bob.get("/api/v1/keys").status_code == 200  # another tenant's window
        polled = door.alice.post("/api/v1/retrieve_future", json={"request_id": "nope"})
        assert polled.status_code != 429 and "x-ratelimit-limit-requests" not in polled.headers

        clock.now += 45
        assert door.alice.get("/api/v1/keys").headers["x-ratelimit-remaining-requests"] == "2"


def test_a_tenants_own_limit_beats_the_deployment_default(tmp_path, clock) -> None:
    for door in limited_door(tmp_path, clock):
        assert "x-ratelimit-limit-requests" not in door.bob.get("/api/v1/keys").headers  # no limit by default
        with door.state.transaction() as session:
            set_limits(session, "alice", {"requests_per_minute": 1})
        assert door.alice.get("/api/v1/keys").status_code == 200
        assert door.alice.get("/api/v1/keys").status_code == 429
        assert door.bob.get("/api/v1/keys").status_code == 200


def test_tokens_per_minute_refuse_a_training_op_that_is_queued_at_its_place_when_sent_again(tmp_path, clock) -> None:
    for door in limited_door(tmp_path, clock, tenant_tokens_per_minute=10):
        model_id = door.run(door.alice)
        first = door.alice.post("/api/v1/forward_backward", json=fb_request(model_id, 1, 6))
        assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "4"
        before = queued_jobs(door)
        refused = door.alice.post("/api/v1/forward_backward", json=fb_request(model_id, 2, 6))
        assert error(refused, 429)["code"] == "rate_limit_exceeded" and refused.headers["x-should-retry"] == "true"
        later = door.alice.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": 3, "adam_params": {}})
        assert later.status_code == 200  # pipelined behind the refused op: it waits for seq 2
        assert queued_jobs(door) == before + 1  # the refusal took no place

        clock.now += WINDOW_SECONDS
        again = door.alice.post("/api/v1/forward_backward", json=fb_request(model_id, 2, 6))
        assert again.status_code == 200, again.text
        assert again.json()["request_id"] == f"{model_id}:2"

        too_big = door.alice.post("/api/v1/forward_backward", json=fb_request(model_id, 4, 11))
        assert error(too_big, 429)["code"] == "rate_limit_exceeded"
        assert too_big.headers["x-should-retry"] == "false" and "retry-after" not in too_big.headers


def test_concurrent_runs_are_a_quota_that_unloading_frees(tmp_path, clock) -> None:
    for door in limited_door(tmp_path, clock, tenant_concurrent_runs=1):
        session_id = door.alice.post("/api/v1/create_session", json={}).json()["session_id"]
        first = door.run(door.alice, 0, session_id)
        door.run(door.alice, 0, session_id)  # a replayed create is the same run, never refused
        body = {"session_id": session_id, "model_seq_id": 1, "base_model": BASE}
        refused = door.alice.post("/api/v1/create_model", json=body)
        assert error(refused, 429)["code"] == "quota_exceeded" and refused.headers["x-should-retry"] == "false"
        assert door.run(door.bob)  # bob has a quota of his own

        assert door.alice.post("/api/v1/unload_model", json={"model_id": first}).status_code == 200
        assert door.alice.post("/api/v1/create_model", json=body).status_code == 200


def test_stored_bytes_are_a_quota_that_deleting_frees(tmp_path, clock) -> None:
    for door in limited_door(tmp_path, clock, tenant_stored_bytes=1):
        model_id = door.run(door.alice)
        path = door.checkpoint("alice", model_id, "full")
        door.checkpoint("alice", model_id, "snapshot", kind="sampler_weights", ephemeral=True)
        save = {"model_id": model_id, "path": "more", "seq_id": 1}
        refused = door.alice.post("/api/v1/save_weights", json=save)
        assert error(refused, 429)["code"] == "quota_exceeded" and refused.headers["x-should-retry"] == "false"

        limits = door.alice.get("/api/v1/limits").json()
        assert limits["stored_bytes"]["limit"] == 1 and limits["stored_bytes"]["used"] == door.row(path).size_bytes

        run_id, checkpoint_id = path.removeprefix("tinker://").split("/", 1)
        deleted = door.alice.delete(f"/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}")
        assert deleted.status_code in (200, 204), deleted.text
        assert door.alice.post("/api/v1/save_weights", json={**save, "seq_id": 2}).status_code == 200


def test_limits_report_each_limit_and_its_use(tmp_path, clock) -> None:
    for door in limited_door(tmp_path, clock, tenant_requests_per_minute=50, tenant_tokens_per_minute=100):
        model_id = door.run(door.alice)
        door.alice.post("/api/v1/forward_backward", json=fb_request(model_id, 1, 7))
        limits = door.alice.get("/api/v1/limits").json()
        assert limits["tenant"] == "alice"
        assert limits["requests_per_minute"] == {"limit": 50, "used": 3, "reset_seconds": 44.5}  # not itself
        assert limits["tokens_per_minute"]["used"] == 7
        assert limits["concurrent_runs"] == {"used": 1}  # no quota: no limit reported
        assert door.bob.get("/api/v1/limits").json()["tokens_per_minute"]["used"] == 0


def test_loom_tenants_sets_and_lists_a_tenants_own_limits(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LOOM_DATA_DIR", str(tmp_path))

    def loom(*argv: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            loom_cli(list(argv))
        return out.getvalue()

    loom("tenants", "set", "alice", "--requests-per-minute", "10", "--stored-bytes", "1000")
    loom("tenants", "set", "alice", "--stored-bytes", "default")
    assert loom("tenants", "list").splitlines()[1].split("\t") == ["alice", "no", "10", "-", "-", "-"]
    with pytest.raises(SystemExit, match="positive"):
        loom("tenants", "set", "alice", "--concurrent-runs", "0")


def test_a_sample_counts_its_prompt_and_every_token_it_may_write() -> None:
    prompt = TinkerPrompt(model_input=ModelInput.from_ints([1, 2, 3, 4]))
    sample = SampleJob(prompt=prompt, sampling_params=SamplingParams(max_tokens=10), num_samples=2)
    assert submitted_tokens(sample) == 4 + 2 * 10
    chat = SampleJob(prompt=ChatPrompt(messages=[{"role": "user", "content": "hi"}]), sampling_params=SamplingParams())
    assert submitted_tokens(chat) == 0  # text the worker tokenizes, and no max_tokens: nothing known to count
