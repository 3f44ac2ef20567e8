"""A tenant's own API keys over `/api/v1/keys` and `loom keys`.

Alice creates a named key (the plaintext comes back once, `tml-` + 43 characters, and its first 12 characters are
the listed prefix), lists her keys (oldest first, no plaintext or hash anywhere in the listing), authenticates with
the new key, revokes it, and the very next request with it is a 401 while her first key still works; the listing
then shows it revoked and a second revoke is a 404. Bob sees none of Alice's keys and revoking one of them answers
exactly what an unknown id does (404, same body shape). An empty or over-long name is a 400/422 naming the field.
Creating and revoking appear in Alice's audit log with her as actor. `loom keys list` prints the same keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api import cli
from contract.settings import Settings
from tests.unit.test_checkpoint_management import BASE, Door, open_door


@pytest.fixture
def door(tmp_path: Path) -> Iterator[Door]:
    yield from open_door(Settings(data_dir=tmp_path, base_models=[BASE], queue="external"))


def test_a_tenant_creates_lists_and_revokes_its_own_keys(door: Door) -> None:
    made = door.alice.post("/api/v1/keys", json={"name": "laptop"})
    assert made.status_code == 200, made.text
    plaintext, info = made.json()["api_key"], made.json()["key"]
    assert plaintext.startswith("tml-") and len(plaintext) == 47 and info["prefix"] == plaintext[:12]
    assert info["name"] == "laptop" and "revoked_at" not in info

    listing = door.alice.get("/api/v1/keys")
    assert listing.status_code == 200
    keys = listing.json()["keys"]
    assert [k["name"] for k in keys] == ["test", "laptop"] and keys[1]["id"] == info["id"]
    assert plaintext not in listing.text and plaintext[12:] not in listing.text

    with TestClient(door.app, headers={"X-API-Key": plaintext}) as laptop:
        assert laptop.get("/api/v1/auth/apikey/me").json()["tenant"] == "alice"
        assert door.alice.delete(f"/api/v1/keys/{info['id']}").status_code == 204
        refused = laptop.get("/api/v1/keys")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthenticated"
    assert door.alice.get("/api/v1/keys").status_code == 200  # her other key still works
    after = {k["id"]: k for k in door.alice.get("/api/v1/keys").json()["keys"]}
    assert after[info["id"]]["revoked_at"]
    again = door.alice.delete(f"/api/v1/keys/{info['id']}")
    assert again.status_code == 404

    events = [e["event"] for e in door.alice.get("/api/v1/audit").json()["entries"]]
    assert events[-2:] == ["apikey_create", "apikey_revoke"]


def test_another_tenants_key_is_answered_like_a_missing_one(door: Door) -> None:
    alices = door.alice.post("/api/v1/keys", json={"name": "ci"}).json()["key"]["id"]
    assert [k["name"] for k in door.bob.get("/api/v1/keys").json()["keys"]] == ["test"]
    theirs = door.bob.delete(f"/api/v1/keys/{alices}")
    unknown = door.bob.delete("/api/v1/keys/0000000000")
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"]["code"] == unknown.json()["error"]["code"] == "not_found"
    assert door.alice.get("/api/v1/keys").json()["keys"][-1].get("revoked_at") is None


@pytest.mark.parametrize("name", ["", "x" * 65])
def test_a_key_name_must_be_1_to_64_characters(door: Door, name: str) -> None:
    response = door.alice.post("/api/v1/keys", json={"name": name})
    assert response.status_code in (400, 422) and "name" in response.text


def test_loom_keys_list_prints_the_tenants_keys(door: Door, capsys) -> None:
    made = door.alice.post("/api/v1/keys", json={"name": "laptop"}).json()["key"]
    door.alice.delete(f"/api/v1/keys/{made['id']}")
    cli.cmd_keys(cli._parser().parse_args(["keys", "list", "--owner", "alice"]), door.state.settings)
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [(line[2], line[4].split()[0]) for line in lines] == [("test", "live"), ("laptop", "revoked")]
    assert lines[1][:2] == [made["id"], made["prefix"]]
