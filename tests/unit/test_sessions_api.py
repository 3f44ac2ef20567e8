"""Sessions through the real app: listing, details, search, projects, finishing, trace export, and the calling key.

Jobs never run by themselves here (`LOOM_QUEUE=external`); the tests finish them through the job store.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import update

from api.db.models import ApiKey, Checkpoint, ClientSession
from api.routers.sessions import TRACE_LINK_LIFETIME
from api.session_records import STALE_AFTER
from api.signed_links import sign
from tests.unit.api_fixtures import LoomApi, loom_api, new_run, new_sampler, new_session, sample

__all__ = ["loom_api"]


def search(client, **request) -> list[str]:
    response = client.post("/api/v1/sessions/search", json=request)
    assert response.status_code == 200, response.text
    return [s["session_id"] for s in response.json()["sessions"]]


def finish(client, session_id: str, reason: str = "success", detail: str | None = None):
    return client.post(f"/api/v1/sessions/{session_id}/finish", json={"reason": {"type": reason}, "detail": detail})


def test_list_and_get_sessions_newest_first(loom_api: LoomApi) -> None:
    client = loom_api.client()
    older = new_session(client, display_name="first", user_metadata={"team": "rl", "n": 3})
    newer = new_session(client, project_id="p1")
    run = new_run(client, older)
    sampler = new_sampler(client, older)

    listed = client.get("/api/v1/sessions", params={"limit": 1}).json()
    assert listed == {"sessions": [newer], "cursor": {"offset": 0, "limit": 1, "total_count": 2}}
    assert client.get("/api/v1/sessions", params={"limit": 1, "offset": 1}).json()["sessions"] == [older]

    details = client.get(f"/api/v1/sessions/{older}", params={"access_scope": "accessible"}).json()
    assert details["training_run_ids"] == [run] and details["sampler_ids"] == [sampler]
    assert details["user_metadata"] == {"team": "rl", "n": "3"} and details["display_name"] == "first"
    assert details["project_id"] == "default" and details["status"] == {"type": "active"}
    assert client.get(f"/api/v1/sessions/{newer}").json()["project_id"] == "p1"


def test_other_tenants_sessions_are_not_found(loom_api: LoomApi) -> None:
    alice, mallory = loom_api.client(), loom_api.client("mallory")
    session_id = new_session(alice, display_name="secret")
    assert mallory.get(f"/api/v1/sessions/{session_id}").status_code == 404
    assert mallory.get("/api/v1/sessions").json()["sessions"] == []
    assert search(mallory, session_id=session_id) == [] and search(mallory, display_name="secret") == []
    assert search(mallory, owner={"type": "user", "owner_urns": ["alice"]}) == []
    assert mallory.put(f"/api/v1/sessions/{session_id}/project", json={"project_id": "x"}).status_code == 404
    assert finish(mallory, session_id).status_code == 404
    assert mallory.get(f"/api/v1/sessions/{session_id}/trace_export").status_code == 404
    assert mallory.post("/api/v1/session_heartbeat", json={"session_id": session_id}).status_code == 404
    assert alice.get(f"/api/v1/sessions/{session_id}").json()["project_id"] == "default"


def test_search_filters_and_pages(loom_api: LoomApi) -> None:
    client = loom_api.client()
    nightly = new_session(client, display_name="Nightly GSM8K run", user_metadata={"team": "rl"}, project_id="p1")
    weekly = new_session(client, display_name="weekly eval", user_metadata={"team": "eval"})
    other = new_session(client, display_name="nightly sft")
    finish(client, other, "errored", "oom")
    with loom_api.state.transaction() as session:  # not heard from for a while: no longer known to run
        stale = datetime.now(UTC) - STALE_AFTER - timedelta(seconds=1)
        session.execute(update(ClientSession).where(ClientSession.id == weekly).values(last_heartbeat_at=stale))

    assert search(client, display_name="NIGHTLY run") == [nightly]
    assert search(client, display_name="nightly") == [other, nightly]
    assert search(client, display_name="weekly", session_id=nightly) == [weekly, nightly]
    assert search(client, user_metadata={"team": "rl"}) == [nightly]
    assert search(client, project_ids=["p1"]) == [nightly]
    assert search(client, project_ids=["default"]) == [other, weekly]
    assert search(client, statuses=[{"type": "active"}]) == [nightly]
    assert search(client, statuses=[{"type": "client_finished", "reasons": ["errored"]}]) == [other]
    assert search(client, statuses=[{"type": "client_finished", "reasons": ["success"]}]) == []
    assert search(client, statuses=[{"type": "cancelled"}, {"type": "failed"}]) == []
    assert search(client, owner={"type": "user", "owner_urns": ["alice"]}) == [other, weekly, nightly]

    page = client.post("/api/v1/sessions/search", json={"limit": 2}).json()
    assert [s["session_id"] for s in page["sessions"]] == [other, weekly]
    rest = client.post("/api/v1/sessions/search", json={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [s["session_id"] for s in rest["sessions"]] == [nightly] and "next_cursor" not in rest
    summary = {s["session_id"]: s for s in page["sessions"]}
    assert summary[other]["status"] == {"type": "client_finished", "reason": {"type": "errored"}, "detail": "oom"}
    assert "status" not in summary[weekly]
    assert client.post("/api/v1/sessions/search", json={"limit": 201}).status_code == 400


def test_search_counts_checkpoints_and_assigning_a_project_moves_the_session(loom_api: LoomApi) -> None:
    client = loom_api.client()
    session_id = new_session(client)
    run = new_run(client, session_id)
    loom_api.finish_job(f"{run}:0", {"model_id": run})
    saved = client.post("/api/v1/save_weights", json={"model_id": run, "seq_id": 1, "path": "s1"}).json()
    with loom_api.state.transaction() as session:
        session.add(
            Checkpoint(
                run_id=run,
                owner="alice",
                checkpoint_id="weights/s1",
                kind="training",
                tinker_path=f"tinker://{run}/weights/s1",
                storage_uri="/nowhere",
                size_bytes=1234,
                committed=True,
            )
        )
    loom_api.finish_job(saved["request_id"], {"path": f"tinker://{run}/weights/s1"})
    moved = client.put(f"/api/v1/sessions/{session_id}/project", json={"project_id": "p9"})
    assert moved.status_code == 200, moved.text
    assert moved.json()["project_id"] == "p9"
    assert moved.json()["checkpoints_count"] == 1 and moved.json()["checkpoint_storage_bytes"] == 1234
    assert search(client, project_ids=["p9"]) == [session_id]

    def runs_in(project_id: str) -> list[str]:
        listed = client.get("/api/v1/training_runs", params={"project_id": project_id}).json()
        return [r["training_run_id"] for r in listed["training_runs"]]

    assert runs_in("p9") == [run] and runs_in("default") == []  # the session's runs moved with it
    assert client.put(f"/api/v1/sessions/{session_id}/project", json={}).status_code == 400


def test_a_finished_session_takes_no_new_work_but_its_futures_resolve(loom_api: LoomApi) -> None:
    client = loom_api.client()
    session_id = new_session(client, tags=["loom:finish:not json"])  # a client's tag cannot pose as the finish
    run = new_run(client, session_id)
    sampler = new_sampler(client, session_id)
    pending_sample = sample(client, sampler, 0)

    first = finish(client, session_id, "success", "all done")
    assert first.status_code == 200
    assert first.json()["status"] == {"type": "client_finished", "reason": {"type": "success"}, "detail": "all done"}
    again = finish(client, session_id, "interrupted")  # the first reason wins
    assert again.json() == first.json()

    refused = {
        "session_heartbeat": {"session_id": session_id},
        "create_model": {"session_id": session_id, "model_seq_id": 1, "base_model": "tiny-kimi-k2"},
        "create_sampling_session": {
            "session_id": session_id,
            "sampling_session_seq_id": 1,
            "base_model": "tiny-kimi-k2",
        },
        "optim_step": {"model_id": run, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}},
        "asample": {
            "sampling_session_id": sampler,
            "seq_id": 1,
            "num_samples": 1,
            "prompt": {"chunks": [{"tokens": [1]}]},
            "sampling_params": {"max_tokens": 1},
        },
    }
    for route, body in refused.items():
        response = client.post(f"/api/v1/{route}", json=body)
        assert response.status_code == 410, (route, response.text)
        assert response.json()["error"]["code"] == "session_finished"

    loom_api.finish_job(f"{run}:0", {"model_id": run})
    loom_api.finish_job(pending_sample, {"sequences": []})
    assert client.post("/api/v1/retrieve_future", json={"request_id": f"{run}:0"}).json() == {"model_id": run}
    assert client.post("/api/v1/retrieve_future", json={"request_id": pending_sample}).json() == {"sequences": []}
    assert client.get(f"/api/v1/sessions/{session_id}").json()["status"]["type"] == "client_finished"


def test_trace_export_links_to_the_sessions_timeline(loom_api: LoomApi) -> None:
    client = loom_api.client()
    session_id = new_session(client, display_name="traced")
    run = new_run(client, session_id)
    sampler = new_sampler(client, session_id)
    loom_api.finish_job(f"{run}:0", {"model_id": run})
    failed = sample(client, sampler, 0)
    loom_api.finish_job(failed, error="prompt too long")
    queued = sample(client, sampler, 1)
    finish(client, session_id)

    export = client.get(f"/api/v1/sessions/{session_id}/trace_export").json()
    assert export["status"] == "ready"
    url = urlsplit(export["url"])
    anonymous = loom_api.client("x")
    anonymous.headers.pop("X-API-Key")
    download = anonymous.get(f"{url.path}?{url.query}")
    assert download.status_code == 200, download.text
    trace = json.loads(download.content)
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert names == {f"session {session_id} (traced)", f"training run {run}", f"sampler {sampler}"}
    begins = {e["id"]: e for e in trace["traceEvents"] if e["ph"] == "b" and e["name"] != "running"}
    assert set(begins) == {f"{run}:0", failed, queued}
    assert begins[failed]["args"]["error"] == "prompt too long" and begins[queued]["args"]["state"] == "queued"
    ran = [e["id"] for e in trace["traceEvents"] if e["ph"] == "b" and e["name"] == "running"]
    assert sorted(ran) == sorted([f"{run}:0", failed])
    assert [e["name"] for e in trace["traceEvents"] if e["ph"] == "i"][-1] == "session finished"

    query = parse_qs(url.query)
    tampered = {**{k: v[0] for k, v in query.items()}, "signature": "0" * 64}
    assert anonymous.get(url.path, params=tampered).status_code == 403
    other_session = new_session(client)
    assert anonymous.get(f"/api/v1/sessions/{other_session}/trace", params=query).status_code == 403
    with loom_api.state.reading() as session:
        key = session.get(ApiKey, query["key"][0])
        past = datetime.now(UTC) - 2 * TRACE_LINK_LIFETIME
        expired = sign(key, f"session-trace:{session_id}", TRACE_LINK_LIFETIME, now=past).query()
    assert anonymous.get(url.path, params=expired).status_code == 403
    assert client.delete("/api/v1/auth/apikey/me").status_code == 204  # revoking the key revokes its links
    assert anonymous.get(f"{url.path}?{url.query}").status_code == 403


def test_the_calling_key_can_be_read_and_revoked_and_jwts_are_refused(loom_api: LoomApi) -> None:
    client = loom_api.client()
    me = client.get("/api/v1/auth/apikey/me").json()
    key = loom_api.keys["alice"]
    assert me["tenant"] == "alice" and me["name"] == "alice's key" and key.startswith(me["prefix"])
    assert me["details"] == {"org_details": {"name": "alice"}, "user_details": {"email": "alice"}}
    assert key not in json.dumps(me)
    other = loom_api.client("bob")
    assert client.delete("/api/v1/auth/apikey/me").status_code == 204
    assert client.get("/api/v1/auth/apikey/me").status_code == 401
    assert other.get("/api/v1/auth/apikey/me").json()["tenant"] == "bob"  # only the calling key was revoked
    token = other.post("/api/v1/auth/token", json={})
    assert token.status_code == 400 and token.json()["error"]["code"] == "unsupported"
