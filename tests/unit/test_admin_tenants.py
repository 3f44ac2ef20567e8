"""Operators manage tenants over REST (`/api/v1/admin/tenants`) and with `loom tenants`, through the real app.

- a tenant that is not an operator gets 403 on every admin route;
- an operator creates a tenant with limits (its first key works at once and is held to them), lists tenants with
  their figures, changes limits (null: back to the default) and the role, and cannot take its own role;
- bad names and limits are 400, a taken name 409, an unknown tenant 404;
- `loom tenants create --operator` prints a key that is an admin key; the embedded server's `local` is an operator.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.cli import local_api_key
from api.cli import main as loom_cli
from api.db.tenants import set_limits
from contract.settings import Settings
from tests.unit.test_checkpoint_management import BASE, Door, error, open_door


@pytest.fixture
def door(tmp_path: Path):
    for door in open_door(Settings(data_dir=tmp_path, base_models=[BASE], queue="external")):
        with door.state.transaction() as session:
            set_limits(session, "alice", {}).operator = True
        yield door


def test_only_an_operators_keys_reach_the_admin_routes(door: Door) -> None:
    for method, path in [
        ("get", "/api/v1/admin/tenants"),
        ("get", "/api/v1/admin/tenants/alice"),
        ("post", "/api/v1/admin/tenants"),
        ("patch", "/api/v1/admin/tenants/bob"),
    ]:
        response = door.bob.request(method, path, json={"name": "x"})
        assert error(response, 403)["code"] == "forbidden", path
    assert door.alice.get("/api/v1/admin/tenants").status_code == 200


def test_an_operator_creates_a_tenant_whose_first_key_is_held_to_its_limits(door: Door) -> None:
    made = door.alice.post("/api/v1/admin/tenants", json={"name": "carol", "limits": {"requests_per_minute": 2}})
    assert made.status_code == 201, made.text
    assert made.headers["location"] == "/api/v1/admin/tenants/carol"
    body = made.json()
    assert body["tenant"]["limits"] == {"requests_per_minute": 2} and body["tenant"]["live_keys"] == 1
    carol = TestClient(door.app, headers={"X-API-Key": body["api_key"]})
    assert [carol.get("/api/v1/keys").status_code for _ in range(3)] == [200, 200, 429]

    listed = {t["name"]: t for t in door.alice.get("/api/v1/admin/tenants").json()["tenants"]}
    assert sorted(listed) == ["alice", "bob", "carol"]
    assert listed["alice"]["operator"] and not listed["bob"]["operator"]
    assert listed["bob"] == {**listed["bob"], "live_keys": 1, "live_runs": 0, "stored_bytes": 0}

    assert error(door.alice.post("/api/v1/admin/tenants", json={"name": "carol"}), 409)["param"] == "name"
    assert error(door.alice.post("/api/v1/admin/tenants", json={"name": "no spaces"}), 400)["param"] == "name"
    bad_limit = door.alice.post("/api/v1/admin/tenants", json={"name": "dave", "limits": {"stored_bytes": 0}})
    assert error(bad_limit, 400)["param"] == "limits.stored_bytes"


def test_patch_changes_only_what_it_is_sent(door: Door) -> None:
    door.alice.patch("/api/v1/admin/tenants/bob", json={"tokens_per_minute": 100, "concurrent_runs": 2})
    changed = door.alice.patch("/api/v1/admin/tenants/bob", json={"tokens_per_minute": None, "operator": True})
    assert changed.status_code == 200, changed.text
    assert changed.json()["limits"] == {"concurrent_runs": 2} and changed.json()["operator"] is True
    assert door.bob.get("/api/v1/admin/tenants").status_code == 200  # bob is an operator now

    own = door.alice.patch("/api/v1/admin/tenants/alice", json={"operator": False})
    assert error(own, 400)["param"] == "operator"
    assert door.bob.patch("/api/v1/admin/tenants/alice", json={"operator": False}).json()["operator"] is False
    assert error(door.bob.get("/api/v1/admin/tenants/nobody"), 404)["code"] == "not_found"


def test_loom_tenants_create_makes_an_operator_and_serve_makes_local_one(door: Door, monkeypatch) -> None:
    monkeypatch.setenv("LOOM_DATA_DIR", str(door.state.settings.data_dir))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        loom_cli(["tenants", "create", "ops", "--operator", "--concurrent-runs", "3"])
    name, key = out.getvalue().split()
    ops = TestClient(door.app, headers={"X-API-Key": key})
    assert ops.get("/api/v1/admin/tenants/ops").json()["limits"] == {"concurrent_runs": 3}
    with pytest.raises(SystemExit, match="already exists"):
        loom_cli(["tenants", "create", "ops"])

    local = TestClient(door.app, headers={"X-API-Key": local_api_key(door.state.settings, door.state.sessions)})
    assert local.get("/api/v1/admin/tenants/local").json()["operator"] is True
