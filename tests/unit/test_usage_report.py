"""Usage per key and per run (`GET /api/v1/usage/report`), through the real app with jobs finished by hand.

Alice trains one run with two of her keys and samples its checkpoint through a sampling session; the report
splits the tokens by the key that submitted them, gives the sample to the run whose stored weights it read, and
the run's stored checkpoint its gigabyte-hours; the CSV export holds the same rows; `per=window` totals them over the window; bob's report holds none of
alice's; the window is checked like billing's (whole past hours), up to 31 days.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.db.models import Checkpoint, Job, JobState
from contract.jobs import SampleJob, TinkerPrompt
from contract.settings import Settings
from loom.types import USAGE_REPORT_COLUMNS, ModelInput, SamplingParams
from tests.unit.test_admission import fb_request
from tests.unit.test_checkpoint_management import BASE, BASE_NAME, Door, error, finish, open_door


@pytest.fixture
def door(tmp_path) -> Iterator[Door]:
    yield from open_door(Settings(data_dir=tmp_path, base_models=[BASE], queue="external"))


HOUR = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)


def finished_at(door: Door, request_id: str, at: datetime) -> None:
    with door.state.transaction() as session:
        session.execute(
            update(Job).where(Job.id == request_id).values(state=JobState.DONE.value, result={}, finished_at=at)
        )


def test_the_report_splits_usage_by_key_and_run_and_exports_csv(door: Door) -> None:
    second_key = door.alice.post("/api/v1/keys", json={"name": "ci"}).json()
    alice_ci = TestClient(door.app, headers={"X-API-Key": second_key["api_key"]})
    run_id = door.run(door.alice)
    by_key = {
        door.alice.post("/api/v1/forward_backward", json=fb_request(run_id, 1, 9)).json()["request_id"]: HOUR,
        alice_ci.post("/api/v1/forward_backward", json=fb_request(run_id, 2, 4)).json()["request_id"]: HOUR,
    }
    for request_id, at in by_key.items():
        finished_at(door, request_id, at)
    path = door.checkpoint("alice", run_id, "policy", kind="sampler_weights")
    with door.state.transaction() as session:
        session.execute(update(Checkpoint).where(Checkpoint.tinker_path == path).values(created_at=HOUR))
    sampler = {"session_id": run_id.split(":")[0], "sampling_session_seq_id": 0, "model_path": path}
    sampler_id = door.alice.post("/api/v1/create_sampling_session", json=sampler).json()["sampling_session_id"]
    sample = SampleJob(
        prompt=TinkerPrompt(model_input=ModelInput.from_ints([1, 2, 3])),
        sampling_params=SamplingParams(max_tokens=2),
        storage_uri=door.row(path).storage_uri,  # what the API resolves the session's checkpoint to
    )
    result = {"type": "sample", "sequences": [{"tokens": [4, 5], "stop_reason": "length"}]}
    finish(door, "alice", sampler_id, 0, sample, result, HOUR + timedelta(minutes=5))

    window = {"start": HOUR.isoformat(), "end": (HOUR + timedelta(hours=1)).isoformat()}
    report = door.alice.get("/api/v1/usage/report", params=window).json()
    rows = {(row.get("api_key_name"), row.get("run_id")): row for row in report["rows"]}
    assert set(rows) == {("test", run_id), ("ci", run_id), (None, run_id)}
    assert rows["test", run_id]["tokens_trained"] == 9 and rows["ci", run_id]["tokens_trained"] == 4
    assert rows["ci", run_id]["api_key_prefix"] == second_key["key"]["prefix"]
    unkeyed = rows[None, run_id]  # the sample (submitted by hand, with no key) and the stored checkpoint
    assert unkeyed["tokens_prompt"] == 3 and unkeyed["tokens_generated"] == 2 and unkeyed["requests"] == 1
    assert unkeyed["storage_gigabyte_hours"] == pytest.approx(door.row(path).size_bytes / 1e9, rel=1e-6)
    assert all(row["base_model"] == BASE_NAME for row in rows.values())

    exported = door.alice.get("/api/v1/usage/report", params={**window, "format": "csv"})
    assert exported.headers["content-type"].startswith("text/csv")
    assert "attachment" in exported.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert tuple(table[0]) == USAGE_REPORT_COLUMNS and len(table) == 3
    assert sorted(int(row["tokens_trained"]) for row in table) == [0, 4, 9]

    assert door.bob.get("/api/v1/usage/report", params=window).json()["rows"] == []

    two_hours = {**window, "end": (HOUR + timedelta(hours=2)).isoformat(), "per": "window"}
    totals = door.alice.get("/api/v1/usage/report", params=two_hours).json()["rows"]
    assert {row["hour"] for row in totals} == {HOUR.isoformat().replace("+00:00", "Z")}  # one bucket: the window
    by_run = {(row.get("api_key_name"), row.get("run_id")): row for row in totals}
    assert by_run["test", run_id]["tokens_trained"] == 9 and by_run[None, run_id]["tokens_generated"] == 2
    assert by_run[None, run_id]["storage_gigabyte_hours"] == pytest.approx(2 * unkeyed["storage_gigabyte_hours"])


@pytest.mark.parametrize(
    ("window", "param"),
    [
        ({"start": "2026-01-01T00:30:00Z", "end": "2026-01-01T02:00:00Z"}, "start"),
        ({"start": "2026-01-01T00:00:00Z", "end": "2026-02-02T00:00:00Z"}, "end"),
        ({"start": "2999-01-01T00:00:00Z", "end": "2999-01-02T00:00:00Z"}, "start"),
        ({"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T01:00:00Z", "format": "xml"}, "format"),
    ],
)
def test_a_bad_report_window_or_format_is_400_naming_it(door: Door, window: dict, param: str) -> None:
    assert error(door.alice.get("/api/v1/usage/report", params=window), 400)["param"] == param
