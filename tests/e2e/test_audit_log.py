"""The audit log with the official `tinker` SDK (0.38) against a real server: a save the worker commits, publishing,
and another tenant's reads (a sampling client, an OpenAI completion naming the checkpoint) show up in the owner's
`AdminClient.get_audit_log`, under the reader's name, and not in the reader's own log.
"""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest
import tinker
from tinker import types

from tests.e2e.server import LoomServer
from tests.e2e.test_checkpoint_management import TOKENS, tenant, trained

pytestmark = pytest.mark.e2e


def test_the_owner_sees_its_checkpoints_life_and_another_tenants_reads(tinker_env: LoomServer) -> None:
    server = tinker_env
    alice, mallory = tenant(server, "alice"), tenant(server, "mallory")
    weights = trained(tinker.ServiceClient(api_key=alice), 5).save_weights_for_sampler("audited").result().path
    tinker.RestClient(api_key=alice).publish_checkpoint_from_tinker_path(weights).result()

    sampler = tinker.ServiceClient(api_key=mallory).create_sampling_client(model_path=weights).result()
    prompt, params = types.ModelInput.from_ints(TOKENS[:4]), types.SamplingParams(max_tokens=2, temperature=0.0)
    sampler.sample(prompt, 1, params).result()
    completion = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": weights, "prompt": TOKENS[:4], "max_tokens": 2},
        headers={"Authorization": f"Bearer {mallory}"},
        timeout=120,
    )
    assert completion.status_code == 200, completion.text

    today = datetime.now(UTC).date()
    log = tinker.AdminClient(api_key=alice).get_audit_log("checkpoints", today).result()
    owner = log.entries[0].event_details["actor"]
    assert [(e.event, e.event_details["actor"], e.tinker_path, e.purpose) for e in log.entries] == [
        ("checkpoint_create", owner, weights, None),
        ("checkpoint_publish", owner, weights, None),
        ("checkpoint_read", log.entries[2].event_details["actor"], weights, "sampling"),
        ("checkpoint_read", log.entries[2].event_details["actor"], weights, "sampling"),
    ]
    reader = log.entries[2].event_details["actor"]
    assert reader != owner and log.entries[0].event_details["checkpoint_type"] == "sampler"
    assert log.entries[0].model_id == weights.removeprefix("tinker://").split("/")[0]
    assert [e.timestamp for e in log.entries] == sorted(e.timestamp for e in log.entries)
    assert tinker.AdminClient(api_key=mallory).get_audit_log().result().entries == []
    assert tinker.AdminClient(api_key=alice).get_audit_log("projects").result().entries == []
