"""The audit log (`GET /api/v1/audit`, `AdminClient.get_audit_log`) through the real app, in-process
(`LOOM_QUEUE=external`: no model loads), on checkpoints recorded as a worker records them.

- Every event kind is recorded where it happens: a checkpoint's create (the worker's commit), read (weights_info,
  sampling sessions and samples on a path, load_weights, download links, copies, OpenAI model names), publish,
  unpublish, TTL change, delete, expiry (the sweep), copy; a session's move to a project; an API key's revocation.
- Refused requests, replays that change nothing, plain listings and hidden checkpoints record nothing.
- Tenancy: a read of a published checkpoint by another tenant is in the owner's log under the reader's name, and
  the reader's own log holds only the reader's objects.
- The query: `event_type` keeps one resource's events, `day` is one UTC day (default today), entries are sorted by
  time, pages are bounded and bad parameters are 400s naming the parameter.
- The official SDK's `AdminClient.get_audit_log` and Loom's `RestClient.get_audit_log` read the same entries.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from fastapi.testclient import TestClient
from sqlalchemy import select, update

import loom
from api.db.audit import SERVER, Event, record
from api.db.checkpoints import CheckpointRecord, record_checkpoint, sweep_expired_checkpoints
from api.db.keys import create_api_key, revoke_api_key
from api.db.models import AuditEvent, Checkpoint, CheckpointKind
from api.db.types import utcnow
from api.errors import APIError
from api.openai_compat.service import resolve_model
from contract.settings import Settings
from tests.unit.test_checkpoint_management import BASE, Door, error, open_door, rest_url

PROMPT = {"chunks": [{"tokens": [1, 2, 3]}]}


@pytest.fixture
def door(tmp_path: Path) -> Iterator[Door]:
    yield from open_door(Settings(data_dir=tmp_path, base_models=[BASE], queue="external"))


def audit(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    response = client.get("/api/v1/audit", params=params)
    assert response.status_code == 200, response.text
    return response.json()["entries"]


def events(client: TestClient, **params: Any) -> list[tuple[str, str, str | None, str | None]]:
    """(event, actor, tinker_path, purpose) of each entry, in the order served."""
    return [
        (e["event"], e["event_details"]["actor"], e.get("tinker_path"), e.get("purpose"))
        for e in audit(client, **params)
    ]


def new_session(client: TestClient) -> str:
    return client.post("/api/v1/create_session", json={}).json()["session_id"]


# -- what is recorded ---------------------------------------------------------------------------------------------


def test_a_checkpoints_life_is_recorded_in_order_with_its_facts(door: Door) -> None:
    run_id = door.run(door.alice)
    path = door.checkpoint("alice", run_id, "life")
    assert door.alice.post("/api/v1/weights_info", json={"tinker_path": path}).status_code == 200
    assert door.alice.post(rest_url(path, "/publish")).status_code == 200
    assert error(door.alice.post(rest_url(path, "/publish")), 409)  # refused: nothing recorded
    assert door.alice.put(rest_url(path, "/ttl"), json={"ttl_seconds": 7200}).status_code == 200
    assert door.alice.put(rest_url(path, "/ttl"), json={"ttl_seconds": None}).status_code == 200
    assert door.alice.delete(rest_url(path, "/publish")).status_code == 200
    door.alice.get("/api/v1/checkpoints")  # listing records nothing
    door.alice.get(f"/api/v1/training_runs/{run_id}/checkpoints")
    assert door.alice.delete(rest_url(path)).status_code == 200

    entries = audit(door.alice)
    assert [(e["event"], e["event_details"]["actor"], e["tinker_path"], e["model_id"]) for e in entries] == [
        (event, "alice", path, run_id)
        for event in (
            "checkpoint_create",
            "checkpoint_read",
            "checkpoint_publish",
            "checkpoint_ttl_set",
            "checkpoint_ttl_set",
            "checkpoint_unpublish",
            "checkpoint_delete",
        )
    ]
    times = [datetime.fromisoformat(e["timestamp"]) for e in entries]
    assert times == sorted(times) and times[0].date() == utcnow().date()
    created, read, _, ttl, cleared, *_ = entries
    size = created["event_details"]["size_bytes"]
    assert size > 0 and created["event_details"] == {
        "actor": "alice",
        "model_id": run_id,
        "tinker_path": path,
        "checkpoint_type": "training",
        "size_bytes": size,
        "replaced": False,
    }
    assert read["purpose"] == "weights_info" and read["event_details"]["purpose"] == "weights_info"
    assert "purpose" not in created
    assert ttl["event_details"]["ttl_seconds"] == 7200 and ttl["event_details"]["expires_at"]
    assert cleared["event_details"]["ttl_seconds"] is None and cleared["event_details"]["expires_at"] is None
    assert audit(door.bob) == []


def test_every_read_of_a_published_checkpoint_goes_to_the_owners_log_under_the_readers_name(door: Door) -> None:
    alice_run = door.run(door.alice)
    training = door.checkpoint("alice", alice_run, "state")
    sampler = door.checkpoint("alice", alice_run, "sampler", kind="sampler_weights")
    external = door.checkpoint("alice", alice_run, "export", kind="external_weights")
    bob_session = new_session(door.bob)
    assert error(door.bob.post("/api/v1/weights_info", json={"tinker_path": training}), 404)  # not yet published
    for path in (training, sampler, external):
        assert door.alice.post(rest_url(path, "/publish")).status_code == 200
    before = len(audit(door.alice))

    assert door.bob.post("/api/v1/weights_info", json={"tinker_path": training}).status_code == 200
    create = {"session_id": bob_session, "sampling_session_seq_id": 0, "model_path": sampler}
    sampler_id = door.bob.post("/api/v1/create_sampling_session", json=create).json()["sampling_session_id"]
    assert door.bob.post("/api/v1/create_sampling_session", json=create).status_code == 200  # a replay
    on_session = {"sampling_session_id": sampler_id, "seq_id": 0, "prompt": PROMPT, "sampling_params": {}}
    assert door.bob.post("/api/v1/asample", json=on_session).status_code == 200  # the session read it already
    direct = {"model_path": sampler, "prompt": PROMPT, "sampling_params": {"max_tokens": 2}}
    assert door.bob.post("/api/v1/asample", json=direct).status_code == 200
    load = {"session_id": bob_session, "model_seq_id": 1, "path": training, "optimizer": False}
    assert door.bob.post("/api/v1/load_weights", json=load).status_code == 200
    assert door.bob.get(rest_url(external, "/external_weights_urls")).status_code == 200
    copy = {"source_path": training, "destination_project_id": "bobs"}
    copied = door.bob.post("/api/v1/copy_weights", json=copy).json()["tinker_path"]
    with door.state.transaction() as session:
        assert resolve_model(door.state, session, "bob", sampler).storage_uri  # an OpenAI `model`
        with pytest.raises(APIError):
            resolve_model(door.state, session, "bob", f"{sampler}-missing")

    assert events(door.alice)[before:] == [
        ("checkpoint_read", "bob", training, "weights_info"),
        ("checkpoint_read", "bob", sampler, "sampling"),
        ("checkpoint_read", "bob", sampler, "sampling"),
        ("checkpoint_read", "bob", training, "load_weights"),
        ("checkpoint_read", "bob", external, "download"),
        ("checkpoint_read", "bob", training, "copy"),
        ("checkpoint_read", "bob", sampler, "sampling"),
    ]
    # the reader's log holds only the reader's own objects: the copy, not the reads of alice's checkpoints
    (bobs,) = audit(door.bob)
    assert (bobs["event"], bobs["tinker_path"], bobs["event_details"]["actor"]) == ("checkpoint_copy", copied, "bob")
    assert bobs["event_details"]["copied_from"] == training
    assert bobs["event_details"]["model_id"] == copied.removeprefix("tinker://").split("/")[0]

    # once unpublished, bob's reads are 404s and record nothing
    assert door.alice.delete(rest_url(training, "/publish")).status_code == 200
    count = len(audit(door.alice))
    assert error(door.bob.post("/api/v1/weights_info", json={"tinker_path": training}), 404)
    assert error(door.bob.post("/api/v1/load_weights", json={**load, "model_seq_id": 2}), 404)
    assert len(audit(door.alice)) == count


def test_a_refused_sample_on_a_path_records_no_read(door: Door) -> None:
    sampler = door.checkpoint("alice", door.run(door.alice), "s", kind="sampler_weights")
    count = len(audit(door.alice))
    too_long = {"model_path": sampler, "prompt": PROMPT, "sampling_params": {"max_tokens": 10**9}}
    assert error(door.alice.post("/api/v1/asample", json=too_long), 400)
    assert len(audit(door.alice)) == count


def test_hidden_checkpoints_are_not_audited(door: Door) -> None:
    door.checkpoint("alice", door.run(door.alice), "snapshot", kind="sampler_weights", ephemeral=True)
    assert audit(door.alice) == []


def test_an_overwrite_is_a_create_that_replaced_and_expiry_is_the_servers(door: Door) -> None:
    run_id = door.run(door.alice)
    path = door.checkpoint("alice", run_id, "kept")
    with door.state.transaction() as session:
        row = session.scalar(select(Checkpoint).where(Checkpoint.tinker_path == path))
        row.expires_at = utcnow() - timedelta(seconds=1)
        expired_at = row.expires_at
    assert sweep_expired_checkpoints(door.state.sessions) == 1
    expired = audit(door.alice)[-1]
    assert (expired["event"], expired["event_details"]["actor"], expired["tinker_path"]) == (
        "checkpoint_expire",
        SERVER,
        path,
    )
    assert datetime.fromisoformat(expired["event_details"]["expires_at"]) == expired_at

    first = door.checkpoint("alice", run_id, "again")
    with door.state.reading() as session:
        stored = session.scalar(select(Checkpoint).where(Checkpoint.tinker_path == first))
    record = CheckpointRecord(
        run_id=run_id,
        owner="alice",
        checkpoint_id=stored.checkpoint_id,
        kind=CheckpointKind.TRAINING,
        tinker_path=first,
        storage_uri=stored.storage_uri,
        size_bytes=stored.size_bytes,
        ttl_seconds=None,
        ephemeral=False,
    )
    with door.state.transaction() as session:
        record_checkpoint(session, replace(record, overwrite=True))
    creates = [e for e in audit(door.alice) if e["tinker_path"] == first]
    assert [(e["event"], e["event_details"]["replaced"]) for e in creates] == [
        ("checkpoint_create", False),
        ("checkpoint_create", True),
    ]


def test_project_moves_and_key_revocations_are_recorded(door: Door) -> None:
    session_id = new_session(door.alice)
    for project in ("p1", "p1", "p2"):
        moved = door.alice.put(f"/api/v1/sessions/{session_id}/project", json={"project_id": project})
        assert moved.status_code == 200, moved.text
    assert error(door.bob.put(f"/api/v1/sessions/{session_id}/project", json={"project_id": "x"}), 404)
    with door.state.transaction() as session:
        key, plaintext = create_api_key(session, "alice", "ci")
    with TestClient(door.app, headers={"X-API-Key": plaintext}) as ci:
        assert ci.delete("/api/v1/auth/apikey/me").status_code == 204
        assert ci.delete("/api/v1/auth/apikey/me").status_code == 401

    entries = audit(door.alice)
    assert [(e["event"], e["event_details"]) for e in entries] == [
        (
            "project_assign",
            {"actor": "alice", "session_id": session_id, "project_id": "p1", "previous_project_id": None},
        ),
        (
            "project_assign",
            {"actor": "alice", "session_id": session_id, "project_id": "p2", "previous_project_id": "p1"},
        ),
        ("apikey_revoke", {"actor": "alice", "key_id": key.id, "name": "ci", "prefix": plaintext[:12]}),
    ]
    assert all("tinker_path" not in e and "model_id" not in e for e in entries)
    assert audit(door.bob) == []


# -- the query ----------------------------------------------------------------------------------------------------


def test_event_type_keeps_one_resources_events(door: Door) -> None:
    path = door.checkpoint("alice", door.run(door.alice), "c")
    door.alice.put(f"/api/v1/sessions/{new_session(door.alice)}/project", json={"project_id": "p"})
    with door.state.transaction() as session:
        key, _ = create_api_key(session, "alice", "old")
    with door.state.transaction() as session:
        assert revoke_api_key(session, key.id, "alice", actor=SERVER)  # `loom keys revoke`

    assert [e[0] for e in events(door.alice)] == ["checkpoint_create", "project_assign", "apikey_revoke"]
    assert events(door.alice, event_type="all") == events(door.alice)
    assert events(door.alice, event_type="checkpoints") == [("checkpoint_create", "alice", path, None)]
    assert [e[0] for e in events(door.alice, event_type="projects")] == ["project_assign"]
    assert events(door.alice, event_type="organizations") == [("apikey_revoke", SERVER, None, None)]
    assert events(door.alice, event_type="teams") == []


def test_a_day_is_one_utc_day_and_entries_come_sorted_by_time(door: Door) -> None:
    day = date(2026, 3, 14)
    midnight = datetime(2026, 3, 14, tzinfo=UTC)
    moments = {
        "before": midnight - timedelta(microseconds=1),
        "last": midnight + timedelta(days=1) - timedelta(microseconds=1),
        "first": midnight,
        "middle": midnight + timedelta(hours=12),
        "after": midnight + timedelta(days=1),
    }
    with door.state.transaction() as session:
        for name in moments:  # written out of time order
            record(session, owner="alice", actor="alice", event=Event.PROJECT_ASSIGN, project_id=name)
    with door.state.transaction() as session:
        for name, at in moments.items():
            session.execute(
                update(AuditEvent).where(AuditEvent.details["project_id"].as_string() == name).values(at=at)
            )

    entries = audit(door.alice, day=day.isoformat())
    assert [e["event_details"]["project_id"] for e in entries] == ["first", "middle", "last"]
    assert [datetime.fromisoformat(e["timestamp"]) for e in entries] == [
        moments["first"],
        moments["middle"],
        moments["last"],
    ]
    assert [e["event_details"]["project_id"] for e in audit(door.alice, day="2026-03-13")] == ["before"]
    assert [e["event_details"]["project_id"] for e in audit(door.alice, day="2026-03-15")] == ["after"]
    assert audit(door.alice) == []  # today's log: none of these
    today = door.checkpoint("alice", door.run(door.alice), "today")
    assert [e["tinker_path"] for e in audit(door.alice)] == [today]


def test_a_page_is_bounded_and_its_cursor_counts_the_day(door: Door) -> None:
    run_id = door.run(door.alice)
    paths = [door.checkpoint("alice", run_id, f"c{i}") for i in range(5)]
    page = door.alice.get("/api/v1/audit", params={"limit": 2, "offset": 1}).json()
    assert [e["tinker_path"] for e in page["entries"]] == paths[1:3]
    assert page["cursor"] == {"offset": 1, "limit": 2, "total_count": 5}
    assert door.alice.get("/api/v1/audit").json()["cursor"] == {"offset": 0, "limit": 1000, "total_count": 5}


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"event_type": "users"}, "event_type"),
        ({"event_type": ""}, "event_type"),
        ({"day": "2026-13-01"}, "day"),
        ({"day": "yesterday"}, "day"),
        ({"day": "2026-03-14T05:00:00Z"}, "day"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"offset": -1}, "offset"),
        ({"offset": 2**63}, "offset"),
    ],
)
def test_bad_parameters_are_400s_naming_the_parameter(door: Door, params: dict, param: str) -> None:
    assert error(door.alice.get("/api/v1/audit", params=params), 400)["param"] == param


def test_the_audit_log_needs_an_api_key(door: Door) -> None:
    with TestClient(door.app) as anonymous:
        assert anonymous.get("/api/v1/audit").status_code == 401


# -- the SDKs -----------------------------------------------------------------------------------------------------


def test_the_sdks_read_the_same_entries(door: Door) -> None:
    path = door.checkpoint("alice", door.run(door.alice), "sdk")
    door.alice.post("/api/v1/weights_info", json={"tinker_path": path})
    key = door.alice.headers["X-API-Key"]
    service = loom.ServiceClient("http://loom.test", key, transport=httpx.ASGITransport(app=door.app))
    try:
        rest = service.create_rest_client()
        response = rest.get_audit_log("checkpoints", utcnow().date()).result(timeout=30)
        assert [(e.event, e.tinker_path, e.purpose) for e in response.entries] == [
            ("checkpoint_create", path, None),
            ("checkpoint_read", path, "weights_info"),
        ]
        assert response.entries[1].event_details["actor"] == "alice" and response.cursor.total_count == 2
        assert rest.get_audit_log("teams").result(timeout=30).entries == []
    finally:
        service.close()

    # the official SDK's parser, on the route's own answer (its client sends exactly these two parameters)
    raw = door.alice.get("/api/v1/audit", params={"event_type": "all", "day": utcnow().date().isoformat()}).json()
    official = tinker.types.AuditLogResponse.model_validate(raw)
    assert [(e.event, e.tinker_path, e.model_id) for e in official.entries] == [
        (e.event, e.tinker_path, e.model_id) for e in response.entries
    ]
    assert official.entries[1].purpose == "weights_info" and official.entries[1].event_details["actor"] == "alice"
