"""The API side of the SDK 0.38 losses, in-process through the real app (`LOOM_QUEUE=external`: no model loads).

- `create_custom_loss`: a graph traced by the official SDK is stored and answered with an already-done future
  holding its `loss_id`; a replay answers the same; another graph at the same seq is a 409; a graph outside the
  allowed operations is a 400 naming the node; another tenant's session is a 404. `client/config` turns
  `custom_loss_server_side` on.
- `forward_backward` with `custom`: the stored spec travels in the job payload; an unknown or another tenant's
  `loss_id` answers the same 404; another session's loss, a numeric `loss_id` or a missing declared input is a 400.
- `gspo` takes its optional `sequence_ratio_mask`; `stable_reinforce` needs provenance naming samples recorded by
  the run's own session (`record_stability_info=True`): the payload then carries the sampled rows and the
  sampler's recorded logprobs (not the client's); a token that does not match the record, a nonzero advantage on
  a prompt row, an unrecorded sample, another session's or another tenant's sample are refused (the last three
  with the message of a missing one).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

from api.app import build_state, create_app
from api.db.keys import create_api_key
from api.db.models import Job, JobState
from api.db.types import utcnow
from contract.jobs import ForwardBackwardJob, result_json
from contract.settings import Settings
from loom.types import SampledSequence, SampleResponse

BASE = "tiny-kimi-k2"
PROMPT = [5, 6, 7]
SAMPLED = [8, 9, 10]
SAMPLER_LOGPROBS = [-0.5, -1.25, -2.0]


def neg_ll(logprobs, weights):
    loss = -(logprobs * weights).sum()
    return loss, {"custom/neg_ll:sum": loss}


def create_body(session_id: str, seq: int = 0, fn=neg_ll) -> dict:
    handle = trace_loss(fn, {"logprobs": 1, "weights": 1}, session_id)
    return {
        "session_id": session_id,
        "custom_loss_seq_id": seq,
        "name": handle.name,
        "inputs": [{"name": x.name, "rank": x.rank} for x in handle.inputs],
        "graph": encode_graph(handle).model_dump(mode="json"),
    }


class Tenant:
    def __init__(self, app, state, owner: str) -> None:
        with state.transaction() as session:
            _, key = create_api_key(session, owner, "test")
        self.http = TestClient(app, headers={"X-API-Key": key})
        self.session_id = self.http.post("/api/v1/create_session", json={}).json()["session_id"]
        created = self.http.post(
            "/api/v1/create_model",
            json={"session_id": self.session_id, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 4}},
        )
        assert created.status_code == 200, created.text
        self.model_id = f"{self.session_id}:train:0"
        self.seq = 0
        self.samplers = 0

    def forward_backward(self, loss_fn: str, data: list[dict], config: dict | None = None):
        self.seq += 1
        body = {"model_id": self.model_id, "seq_id": self.seq, "data": data, "loss_fn": loss_fn}
        if config is not None:
            body["loss_fn_config"] = config
        return self.http.post("/api/v1/forward_backward", json=body)

    def result(self, request_id: str) -> dict:
        return self.http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()


@pytest.fixture
def door(tmp_path: Path):
    state = build_state(Settings(data_dir=tmp_path, base_models=[BASE], queue="external", long_poll_seconds=0.1))
    app = create_app(state=state)
    return state, Tenant(app, state, "alice"), Tenant(app, state, "bob")


def datum(inputs: dict, spans: tuple[list, list] | None = None) -> dict:
    d = {"model_input": {"chunks": [{"tokens": PROMPT + SAMPLED[:-1]}]}, "loss_fn_inputs": inputs}
    if spans is not None:
        d["model_input_spans"], d["loss_fn_input_spans"] = spans
    return d


def targets() -> dict:
    return {"data": PROMPT[1:] + SAMPLED, "dtype": "int64", "shape": [5]}


def floats(values: list[float]) -> dict:
    return {"data": values, "dtype": "float32", "shape": [len(values)]}


def payload_of(state, request_id: str) -> ForwardBackwardJob:
    with state.reading() as session:
        return ForwardBackwardJob.model_validate(session.get(Job, request_id).payload)


def error(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---------------------------------------------------------------------------------------------- custom losses


def test_client_config_turns_server_side_custom_losses_on(door):
    _, alice, _ = door
    assert alice.http.post("/api/v1/client/config", json={}).json()["custom_loss_server_side"] is True


def test_create_custom_loss_answers_a_done_future_with_the_loss_id(door):
    _, alice, bob = door
    first = alice.http.post("/api/v1/create_custom_loss", json=create_body(alice.session_id))
    assert first.status_code == 200, first.text
    loss_id = alice.result(first.json()["request_id"])["loss_id"]
    replay = alice.http.post("/api/v1/create_custom_loss", json=create_body(alice.session_id))
    assert alice.result(replay.json()["request_id"])["loss_id"] == loss_id

    def other(logprobs, weights):
        return (logprobs * weights).mean(), {}

    conflict = alice.http.post("/api/v1/create_custom_loss", json=create_body(alice.session_id, fn=other))
    assert error(conflict, 409)["param"] == "custom_loss_seq_id"
    assert error(bob.http.post("/api/v1/create_custom_loss", json=create_body(alice.session_id)), 404)
    assert bob.result(first.json()["request_id"]) != alice.result(first.json()["request_id"])


def test_create_custom_loss_refuses_a_graph_outside_the_allowed_operations(door):
    _, alice, _ = door
    body = create_body(alice.session_id)
    node = next(n for n in body["graph"]["nodes"] if n["op"] == "call_function")
    node["target"] = "builtins.exec"
    err = error(alice.http.post("/api/v1/create_custom_loss", json=body))
    assert "builtins.exec" in err["message"] and err["param"].startswith("graph.nodes.")


def test_forward_backward_custom_carries_the_stored_loss(door):
    state, alice, bob = door
    created = alice.http.post("/api/v1/create_custom_loss", json=create_body(alice.session_id))
    loss_id = alice.result(created.json()["request_id"])["loss_id"]
    good = datum({"target_tokens": targets(), "weights": floats([1.0] * 5)})
    accepted = alice.forward_backward("custom", [good], {"loss_id": loss_id})
    assert accepted.status_code == 200, accepted.text
    job = payload_of(state, accepted.json()["request_id"])
    assert job.custom_loss is not None and job.custom_loss.name == "neg_ll"
    assert [x.name for x in job.custom_loss.inputs] == ["logprobs", "weights"]

    unknown = error(alice.forward_backward("custom", [good], {"loss_id": "nope:loss:0"}), 404)
    foreign = error(bob.forward_backward("custom", [good], {"loss_id": loss_id}), 404)
    assert unknown["param"] == foreign["param"] == "loss_fn_config.loss_id"
    assert foreign["message"] == unknown["message"].replace("nope:loss:0", loss_id)

    assert error(alice.forward_backward("custom", [good], {"loss_id": 3.0}))["param"] == "loss_fn_config.loss_id"
    missing = datum({"target_tokens": targets()})
    assert "weights" in error(alice.forward_backward("custom", [missing], {"loss_id": loss_id}))["message"]
    wrong_rank = datum(
        {"target_tokens": targets(), "weights": {"data": [1.0] * 5, "dtype": "float32", "shape": [5, 1]}}
    )
    assert error(alice.forward_backward("custom", [wrong_rank], {"loss_id": loss_id}))["param"].endswith("weights")

    other_session = alice.http.post("/api/v1/create_session", json={}).json()["session_id"]
    other_loss = alice.http.post("/api/v1/create_custom_loss", json=create_body(other_session))
    other_id = alice.result(other_loss.json()["request_id"])["loss_id"]
    assert "session" in error(alice.forward_backward("custom", [good], {"loss_id": other_id}))["message"]


def test_builtin_losses_refuse_text_config_values(door):
    _, alice, _ = door
    ppo = datum({"target_tokens": targets(), "logprobs": floats([-1.0] * 5), "advantages": floats([1.0] * 5)})
    err = error(alice.forward_backward("ppo", [ppo], {"clip_low_threshold": "0.8"}))
    assert err["param"] == "loss_fn_config.clip_low_threshold"


# ------------------------------------------------------------------------------------------------------ gspo


def test_gspo_accepts_its_sequence_ratio_mask(door):
    state, alice, _ = door
    inputs = {
        "target_tokens": targets(),
        "logprobs": floats([0.0, 0.0, -1.0, -1.0, -1.0]),
        "advantages": floats([0.0, 0.0, 1.0, 1.0, 1.0]),
        "sequence_ratio_mask": floats([0.0, 0.0, 1.0, 1.0, 1.0]),
    }
    accepted = alice.forward_backward("gspo", [datum(inputs)], {"clip_high_threshold": 1.01})
    assert accepted.status_code == 200, accepted.text
    assert payload_of(state, accepted.json()["request_id"]).input.loss_fn == "gspo"
    assert error(alice.forward_backward("gspo", [datum(inputs)], {"kl_coeff": 0.1}))["param"] == "loss_fn_config"


# ------------------------------------------------------------------------------------------- stable_reinforce


def recorded_sample(
    state, tenant: Tenant, record: bool = True, tokens: list[int] = SAMPLED, session_id: str | None = None
) -> str:
    """A sample of `tenant`'s session (or its `session_id`), recorded or not, finished as a worker would finish it;
    its sequence id."""
    tenant.samplers += 1
    sampler = tenant.http.post(
        "/api/v1/create_sampling_session",
        json={
            "session_id": session_id or tenant.session_id,
            "sampling_session_seq_id": tenant.samplers,
            "base_model": BASE,
        },
    ).json()["sampling_session_id"]
    sampled = tenant.http.post(
        "/api/v1/asample",
        json={
            "sampling_session_id": sampler,
            "seq_id": 1,
            "prompt": {"chunks": [{"tokens": PROMPT}]},
            "sampling_params": {"max_tokens": 3},
            "num_samples": 1,
            "record_stability_info": record,
        },
    )
    assert sampled.status_code == 200, sampled.text
    job_id = sampled.json()["request_id"]
    result = SampleResponse(sequences=[SampledSequence(stop_reason="length", tokens=tokens, logprobs=SAMPLER_LOGPROBS)])
    with state.transaction() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        job.state, job.result, job.finished_at = JobState.DONE.value, result_json(result), utcnow()
    return sampled.json()["sample_sequence_ids"][0]


def spans(sequence_id: str) -> tuple[list, list]:
    """The cookbook's provenance (rl_loop.with_sampled_provenance) for PROMPT + SAMPLED."""
    return (
        [
            {"type": "prompt_tokens", "sequence_id": sequence_id, "length": len(PROMPT)},
            {"type": "sampled_tokens", "sequence_id": sequence_id, "length": len(SAMPLED) - 1},
        ],
        [
            {"type": "prompt_tokens", "sequence_id": sequence_id, "offset": 1, "length": len(PROMPT) - 1},
            {"type": "sampled_tokens", "sequence_id": sequence_id, "length": len(SAMPLED)},
        ],
    )


def rl_inputs(advantages: list[float] | None = None) -> dict:
    return {
        "target_tokens": targets(),
        "logprobs": floats([0.0, 0.0, -9.0, -9.0, -9.0]),  # the client's copy: ignored in favour of the record
        "advantages": floats(advantages or [0.0, 0.0, 1.0, 1.0, 1.0]),
    }


def test_stable_reinforce_trains_against_the_recorded_sampler_logprobs(door):
    state, alice, _ = door
    sequence_id = recorded_sample(state, alice)
    accepted = alice.forward_backward("stable_reinforce", [datum(rl_inputs(), spans(sequence_id))], {"kl_coeff": 0.01})
    assert accepted.status_code == 200, accepted.text
    (recorded,) = payload_of(state, accepted.json()["request_id"]).recorded
    assert recorded.sampled == [False, False, True, True, True]
    assert recorded.logprobs == pytest.approx([0.0, 0.0, *SAMPLER_LOGPROBS])


def test_stable_reinforce_refuses_provenance_it_cannot_verify(door):
    state, alice, bob = door
    assert "provenance" in error(alice.forward_backward("stable_reinforce", [datum(rl_inputs())]))["message"]
    unrecorded = recorded_sample(state, alice, record=False)
    err = error(alice.forward_backward("stable_reinforce", [datum(rl_inputs(), spans(unrecorded))]))
    assert err["param"] == "data.0.model_input_spans.0" and "not a sample recorded" in err["message"]

    sequence_id = recorded_sample(state, bob)
    foreign = error(alice.forward_backward("stable_reinforce", [datum(rl_inputs(), spans(sequence_id))]))
    missing = error(alice.forward_backward("stable_reinforce", [datum(rl_inputs(), spans("nope:0"))]))
    assert foreign["message"].replace(sequence_id, "nope:0") == missing["message"]
    other_session = alice.http.post("/api/v1/create_session", json={}).json()["session_id"]
    elsewhere = recorded_sample(state, alice, session_id=other_session)
    err = error(alice.forward_backward("stable_reinforce", [datum(rl_inputs(), spans(elsewhere))]))
    assert err["message"].replace(elsewhere, "nope:0") == missing["message"]

    other = recorded_sample(state, alice, tokens=[8, 9, 11])  # the datum's last target is 10, not 11
    err = error(alice.forward_backward("stable_reinforce", [datum(rl_inputs(), spans(other))]))
    assert err["param"] == "data.0.loss_fn_input_spans.1"

    sequence_id = recorded_sample(state, alice)
    on_prompt = rl_inputs([0.5, 0.0, 1.0, 1.0, 1.0])
    err = error(alice.forward_backward("stable_reinforce", [datum(on_prompt, spans(sequence_id))]))
    assert err["param"] == "data.0.loss_fn_inputs.advantages"
    short = (spans(sequence_id)[0], spans(sequence_id)[1][:1])
    assert error(alice.forward_backward("stable_reinforce", [datum(rl_inputs(), short)]))["param"] == (
        "data.0.loss_fn_input_spans"
    )
