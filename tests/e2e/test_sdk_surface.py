"""Contract test: every public method of the installed official `tinker` SDK's clients (`ServiceClient`,
`TrainingClient`, `SamplingClient`, `RestClient`, `AdminClient`) works against a live `loom serve`.

The methods are enumerated by introspection, so a method a newer SDK adds fails the test until it is called here
(or listed in NOT_CALLED with a reason). Each is called with realistic arguments on a run trained a step, its
checkpoints and samplers, and its answer is checked for what Tinker documents (a checkpoint lands in the listings,
a published one reads as public, a TTL shows as `expires_at`, ...). Every loss in `LossFnType` is run through
`forward_backward`. The one failure allowed is a deliberate refusal listed in REFUSED (tiny, each with its reason);
a 404, a 5xx or any other error fails, and the failure message lists every method that failed with its status and
route. The deprecated `_async` twins only await their sync method's future, so they share its call.
"""

from __future__ import annotations

import inspect
import json
import math
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import huggingface_hub.constants
import pytest
import tinker
from tinker import types
from tinker.lib.api_future_impl import QueueState
from transformers import AutoTokenizer

from contract.catalogue import SMOLLM2
from examples.sl_loop import make_datum
from tests.e2e.hub_tokenizers import fill_hub_cache
from tests.e2e.server import LoomServer
from tests.e2e.surface import Ledger, Refusal, need

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

SMOL = SMOLLM2.name
RANK = 4
CLIENTS: dict[str, type] = {
    "ServiceClient": tinker.ServiceClient,
    "TrainingClient": tinker.TrainingClient,
    "SamplingClient": tinker.SamplingClient,
    "RestClient": tinker.RestClient,
    "AdminClient": tinker.AdminClient,
}

REFUSED: dict[str, Refusal] = {
    # Loom authenticates with API keys only (no JWT exchange: the server leaves `pjwt_auth_enabled` off), and the
    # SDK's whoami reads the caller's identity from a JWT's claims, so it refuses locally without a request.
    "RestClient.whoami": Refusal(
        "identity comes only from JWT claims, and Loom issues API keys",
        lambda error: isinstance(error, RuntimeError) and "requires JWT auth" in str(error),
    ),
}

NOT_CALLED: dict[str, str] = {}
"""Public methods with no sensible call, each with the reason (none today: even local helpers are called)."""

LOSS_CONFIGS: dict[str, dict[str, float]] = {"dro": {"beta": 0.05}}
"""`loss_fn_config` a loss needs (DRO's quadratic penalty has no default); the others run on their defaults."""


def public_methods() -> set[str]:
    """`Client.method` for every public method and property of the SDK's client classes."""
    return {
        f"{client}.{name}"
        for client, cls in CLIENTS.items()
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and (callable(member) or isinstance(member, property))
    }


def sync_twin(name: str) -> str | None:
    """The sync method a deprecated `_async` twin awaits, if `name` is one."""
    base = name.removesuffix("_async")
    return base if base != name and base in public_methods() else None


def finite(value: float) -> float:
    assert math.isfinite(value), value
    return value


def paths(listing: types.CheckpointsListResponse) -> set[str]:
    return {checkpoint.tinker_path for checkpoint in listing.checkpoints}


def checkpoint_of(rest: tinker.RestClient, run_id: str, path: str) -> types.Checkpoint:
    (match,) = [c for c in rest.list_checkpoints(run_id).result().checkpoints if c.tinker_path == path]
    return match


def rl_datum(prompt: list[int], sequence: types.SampledSequence, advantage: float) -> types.Datum:
    """A policy-gradient datum built as the cookbook builds one from a sample, with the provenance spans
    (`stable_reinforce` needs them) naming the sequence the sampler recorded."""
    assert sequence.sequence_id is not None and sequence.logprobs is not None
    tokens = prompt + list(sequence.tokens)
    n_prompt, n_sampled = len(prompt), len(sequence.tokens)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": [0.0] * (n_prompt - 1) + list(sequence.logprobs),
            "advantages": [0.0] * (n_prompt - 1) + [advantage] * n_sampled,
        },
    )
    seq = sequence.sequence_id
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=seq, offset=0, length=n_prompt),
            *([types.SampledProvenanceSpan(sequence_id=seq, length=n_sampled - 1)] if n_sampled > 1 else []),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=seq, offset=1, length=n_prompt - 1),
            types.SampledProvenanceSpan(sequence_id=seq, length=n_sampled),
        ],
    )


def surface_nll(logprobs, weights):
    """A server-side custom loss: the weighted negative log-likelihood (what `cross_entropy` computes)."""
    loss = -(logprobs * weights).sum()
    return loss, {"custom/surface_nll:sum": loss}


def client_side_nll(data, logprobs_list):
    """The same loss as a client-side `CustomLossFnV1`."""
    loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs_list))
    return loss, {"client_nll": loss.detach().item()}


@pytest.fixture
def offline_tokenizers(server: LoomServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The hub cache, filled from the server's `/hf` routes with its SmolLM2 tokenizer, offline (the SDK's
    `get_tokenizer()` loads by public model id); returns that id."""
    fill_hub_cache(server.url, SMOLLM2.name, tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return SMOLLM2.name


def test_allow_lists_name_real_methods() -> None:
    """A stale entry (a method the SDK no longer has) fails here rather than hiding a gap."""
    assert set(REFUSED) | set(NOT_CALLED) <= public_methods()
    assert set(LOSS_CONFIGS) <= set(typing.get_args(types.LossFnType))


def test_every_public_method_answers(server: LoomServer, offline_tokenizers: str) -> None:
    ledger = Ledger(REFUSED)
    exercise(ledger, server, AutoTokenizer.from_pretrained(offline_tokenizers))
    missed = {
        name
        for name in public_methods()
        if sync_twin(name) is None and name not in NOT_CALLED and name not in ledger.outcomes
    }
    assert not missed, f"public SDK methods this test never called: {sorted(missed)}"
    failures = ledger.lines("failed")
    assert not failures, ledger.report()


def exercise(ledger: Ledger, server: LoomServer, tokenizer) -> None:
    """Call every public method once or more, in the order a user would, checking each answer. A step that needs
    what a failed step should have made is recorded as failed too (`need`), so every method gets an outcome."""
    call = ledger.call
    credentials = {"base_url": server.url, "api_key": server.api_key}
    service = tinker.ServiceClient(
        user_metadata={"suite": "sdk-surface"}, project_id="surface", display_name="sdk surface", **credentials
    )
    rest = tinker.RestClient(**credentials)
    admin = tinker.AdminClient(**credentials)
    window_start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)

    # -- ServiceClient: a session and a training run -------------------------------------------------------------
    call("ServiceClient.get_console_url", lambda: service.get_console_url())
    call("ServiceClient.get_server_capabilities", lambda: check_models(service.get_server_capabilities()))
    training = call(
        "ServiceClient.create_lora_training_client",
        lambda: service.create_lora_training_client(SMOL, rank=RANK, seed=0).result(),
    )
    if training is None:
        pytest.fail(f"no training client, so nothing else can be called\n{ledger.report()}")
    session_id = call("ServiceClient.holder", lambda: service.holder.get_session_id())
    call("ServiceClient.get_telemetry", lambda: service.get_telemetry())
    run_id = training.model_id

    # -- TrainingClient ------------------------------------------------------------------------------------------
    call("TrainingClient.get_console_url", lambda: training.get_console_url())
    call("TrainingClient.get_telemetry", lambda: training.get_telemetry())
    call("TrainingClient.get_info", lambda: check_info(training.get_info()))
    call("TrainingClient.get_tokenizer", lambda: check_tokenizer(training.get_tokenizer(), tokenizer))
    batch = [make_datum(tokenizer, "Capital of France?", "Paris."), make_datum(tokenizer, "Capital of Peru?", "Lima.")]
    call(
        "TrainingClient.forward", lambda: finite(training.forward(batch, "cross_entropy").result().metrics["loss:sum"])
    )
    call("TrainingClient.forward_backward", lambda: training.forward_backward(batch, "cross_entropy").result())
    call("TrainingClient.optim_step", lambda: training.optim_step(types.AdamParams(learning_rate=1e-3)).result())
    state = call("TrainingClient.save_state", lambda: saved(training.save_state("surface-state"), "/weights/"))
    sampler_path = call(
        "TrainingClient.save_weights_for_sampler",
        lambda: saved(training.save_weights_for_sampler("surface-sampler"), "/sampler_weights/"),
    )
    made_state, made_sampler = "TrainingClient.save_state", "TrainingClient.save_weights_for_sampler"
    call("TrainingClient.load_state", lambda: training.load_state(need(state, made_state)).result())
    call(
        "TrainingClient.load_state_with_optimizer",
        lambda: training.load_state_with_optimizer(need(state, made_state)).result(),
    )
    sampling = call(
        "TrainingClient.save_weights_and_get_sampling_client",
        lambda: training.save_weights_and_get_sampling_client(record_stability_info=True).result(),
    )
    call(
        "TrainingClient.create_sampling_client",
        lambda: sampled(training.create_sampling_client(need(sampler_path, made_sampler))),
    )

    # -- SamplingClient ------------------------------------------------------------------------------------------
    made_sampling = "TrainingClient.save_weights_and_get_sampling_client"
    prompt_tokens = tokenizer.encode("Q: What is 2 + 2?\nA:")
    prompt = types.ModelInput.from_ints(prompt_tokens)
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=7)
    sample = call(
        "SamplingClient.sample",
        lambda: check_sample(need(sampling, made_sampling).sample(prompt, 2, params).result(), 2),
    )
    call(
        "SamplingClient.compute_logprobs",
        lambda: check_logprobs(need(sampling, made_sampling).compute_logprobs(prompt).result(), prompt),
    )
    call("SamplingClient.get_base_model", lambda: expect(need(sampling, made_sampling).get_base_model(), SMOL))
    call(
        "SamplingClient.get_tokenizer",
        lambda: check_tokenizer(need(sampling, made_sampling).get_tokenizer(), tokenizer),
    )
    call("SamplingClient.get_telemetry", lambda: need(sampling, made_sampling).get_telemetry())
    call(
        "SamplingClient.on_queue_state_change",
        lambda: need(sampling, made_sampling).on_queue_state_change(QueueState.ACTIVE, None),
    )
    sampler_handle = call(
        "SamplingClient.get_sampler_handle", lambda: need(sampling, made_sampling).get_sampler_handle()
    )
    call(
        "SamplingClient.from_sampler_handle",
        lambda: check_sample(
            tinker.SamplingClient.from_sampler_handle(
                need(sampler_handle, "SamplingClient.get_sampler_handle"), api_key=server.api_key
            )
            .sample(prompt, 1, params)
            .result(),
            1,
        ),
    )
    call(
        "SamplingClient.create",
        lambda: sampled(tinker.SamplingClient.create(service.holder, model_path=need(sampler_path, made_sampler))),
    )
    call(
        "RestClient.get_sampler",
        lambda: expect(rest.get_sampler(need(sampling, made_sampling)._sampling_session_id).result().base_model, SMOL),
    )

    # -- Every built-in loss, then custom losses -----------------------------------------------------------------
    for loss_fn in typing.get_args(types.LossFnType):
        if loss_fn == "custom":
            continue  # what forward_backward_custom sends for a server-side LossHandle (below)

        def losses(loss_fn: str = loss_fn) -> None:
            if loss_fn == "cross_entropy":
                data = batch
            else:
                sequences = need(sample, "SamplingClient.sample").sequences
                data = [rl_datum(prompt_tokens, s, a) for s, a in zip(sequences, (1.0, -1.0))]
            output = training.forward_backward(data, loss_fn, LOSS_CONFIGS.get(loss_fn)).result()
            check_loss(output, len(data))

        call("TrainingClient.forward_backward", losses, variant=loss_fn)
    reference = training.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    loss_handle = call(
        "ServiceClient.create_custom_loss",
        lambda: service.create_custom_loss(surface_nll, {"logprobs": 1, "weights": 1}).result(),
    )
    call(
        "TrainingClient.forward_backward_custom",
        lambda: close_to(
            training.forward_backward_custom(batch, need(loss_handle, "ServiceClient.create_custom_loss")).result(),
            "custom/surface_nll:sum",
            reference,
        ),
        variant="LossHandle",
    )
    call(
        "TrainingClient.forward_backward_custom",
        lambda: close_to(training.forward_backward_custom(batch, client_side_nll).result(), "client_nll", reference),
        variant="client-side callable",
    )
    call("TrainingClient.optim_step", lambda: training.optim_step(types.AdamParams(learning_rate=1e-3)).result())
    # Last of this run's ordered ops: a server without the route never sees its seq_id, and later ops would wait
    # for it forever.
    external = call(
        "TrainingClient.save_weights_external",
        lambda: saved(training.save_weights_external("surface-external"), "/external_weights/"),
    )
    made_external = "TrainingClient.save_weights_external"

    # -- More ServiceClient: clients from checkpoints, copies ------------------------------------------------------
    call("ServiceClient.create_sampling_client", lambda: sampled(service.create_sampling_client(base_model=SMOL)))
    call(
        "ServiceClient.create_sampling_client",
        lambda: sampled(service.create_sampling_client(model_path=need(sampler_path, made_sampler))),
        variant="model_path",
    )
    call(
        "ServiceClient.create_rest_client",
        lambda: check_models(service.create_rest_client().get_server_capabilities().result()),
    )
    for name in (
        "ServiceClient.create_training_client_from_state",
        "ServiceClient.create_training_client_from_state_with_optimizer",
    ):
        create = getattr(service, name.split(".")[1])
        call(
            name,
            lambda create=create: check_loss(
                create(need(state, made_state)).result().forward(batch, "cross_entropy").result(), 2
            ),
        )
    call("ServiceClient.copy_weights", lambda: copied(service.copy_weights(need(state, made_state)).result(), state))
    call(
        "RestClient.copy_weights",
        lambda: copied(rest.copy_weights(need(state, made_state), "surface-archive").result(), state),
    )

    # -- RestClient: runs, checkpoints, sessions -------------------------------------------------------------------
    call("RestClient.get_server_capabilities", lambda: check_models(rest.get_server_capabilities().result()))
    call("RestClient.get_telemetry", lambda: rest.get_telemetry())
    call("RestClient.get_training_run", lambda: check_run(rest.get_training_run(run_id).result(), run_id))
    call(
        "RestClient.list_training_runs",
        lambda: includes({r.training_run_id for r in rest.list_training_runs().result().training_runs}, run_id),
    )
    call(
        "RestClient.get_training_run_by_tinker_path",
        lambda: check_run(rest.get_training_run_by_tinker_path(need(state, made_state)).result(), run_id),
    )
    call(
        "RestClient.get_weights_info_by_tinker_path",
        lambda: check_weights_info(rest.get_weights_info_by_tinker_path(need(state, made_state)).result()),
    )
    call(
        "RestClient.list_checkpoints",
        lambda: includes(paths(rest.list_checkpoints(run_id).result()), need(state, made_state)),
    )
    call(
        "RestClient.list_user_checkpoints",
        lambda: includes(paths(rest.list_user_checkpoints().result()), need(state, made_state)),
    )
    call(
        "RestClient.publish_checkpoint_from_tinker_path",
        lambda: check_public(rest, run_id, need(state, made_state), True),
    )
    call(
        "RestClient.unpublish_checkpoint_from_tinker_path",
        lambda: check_public(rest, run_id, need(state, made_state), False),
    )
    for ttl_seconds in (86_400, None):
        call(
            "RestClient.set_checkpoint_ttl_from_tinker_path",
            lambda ttl_seconds=ttl_seconds: check_ttl(rest, run_id, need(state, made_state), ttl_seconds),
            variant=f"ttl_seconds={ttl_seconds}",
        )
    call(
        "RestClient.get_external_weights_urls",
        lambda: check_external_files(rest.get_external_weights_urls(need(external, made_external)).result()),
    )
    made_session = "ServiceClient.holder"
    call(
        "RestClient.get_session",
        lambda: includes(rest.get_session(need(session_id, made_session)).result().training_run_ids, run_id),
    )
    call("RestClient.list_sessions", lambda: includes(rest.list_sessions().result().sessions, session_id))
    call(
        "RestClient.search_sessions",
        lambda: includes(
            {
                summary.session_id
                for summary in rest.search_sessions(
                    types.SessionSearchRequest(session_id=need(session_id, made_session))
                )
                .result()
                .sessions
            },
            session_id,
        ),
    )
    call(
        "RestClient.assign_session_project",
        lambda: rest.assign_session_project(need(session_id, made_session), "surface-archive").result(),
    )
    call(
        "RestClient.export_session_trace",
        lambda: downloaded(rest.export_session_trace(need(session_id, made_session)).result()),
    )
    call("RestClient.whoami", lambda: rest.whoami().result())

    # -- Usage: the work above, as billing and storage figures ----------------------------------------------------
    window = (window_start - timedelta(hours=1), window_start + timedelta(hours=1))
    for client_name, client in (("AdminClient", admin), ("RestClient", rest)):
        call(
            f"{client_name}.get_billing_usage",
            lambda client=client: trained_in(client.get_billing_usage(*window).result(), session_id),
        )
        call(
            f"{client_name}.get_current_checkpoint_storage_usage",
            lambda client=client: stores_bytes(client.get_current_checkpoint_storage_usage().result()),
        )
        call(
            f"{client_name}.get_audit_log",
            lambda client=client: audited(client.get_audit_log().result(), need(state, made_state)),
        )
    call("AdminClient.get_telemetry", lambda: admin.get_telemetry())

    # -- Deletions, then finishing the session ---------------------------------------------------------------------
    call(
        "RestClient.delete_checkpoint",
        lambda: check_deleted(
            rest,
            run_id,
            need(sampler_path, made_sampler),
            lambda path: rest.delete_checkpoint(
                run_id, types.ParsedCheckpointTinkerPath.from_tinker_path(path).checkpoint_id
            ),
        ),
    )
    call(
        "RestClient.delete_checkpoint_from_tinker_path",
        lambda: check_deleted(rest, run_id, need(external, made_external), rest.delete_checkpoint_from_tinker_path),
    )
    call("ServiceClient.close", lambda: service.close("success", detail="sdk surface test done").result())


# -- checks: each raises AssertionError with what it saw ------------------------------------------------------------


def expect(value, wanted):
    assert value == wanted, (value, wanted)
    return value


def includes(collection, item):
    assert item in collection, (item, collection)
    return collection


def excludes(collection, item):
    assert item not in collection, (item, collection)
    return collection


def check_models(capabilities: types.GetServerCapabilitiesResponse) -> None:
    includes({m.model_name for m in capabilities.supported_models}, SMOL)


def check_info(info: types.GetInfoResponse) -> None:
    expect(info.model_data.model_name, SMOL)
    expect(info.lora_rank, RANK)


def check_tokenizer(theirs, ours) -> None:
    text = "Loom speaks the Tinker protocol."
    expect(theirs.encode(text), ours.encode(text))


def saved(future, kind: str) -> str:
    path = future.result().path
    assert path.startswith("tinker://") and kind in path, path
    return path


def copied(path: str, source: str) -> str:
    assert path.startswith("tinker://") and path != source, (path, source)
    return path


def sampled(client_future) -> None:
    check_sample(
        client_future.result()
        .sample(types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=2))
        .result(),
        1,
    )


def check_sample(response: types.SampleResponse, count: int) -> types.SampleResponse:
    expect(len(response.sequences), count)
    for sequence in response.sequences:
        assert sequence.tokens and sequence.logprobs is not None and len(sequence.logprobs) == len(sequence.tokens)
    return response


def check_logprobs(logprobs: list[float | None], prompt: types.ModelInput) -> None:
    expect(len(logprobs), prompt.length)
    assert logprobs[0] is None and all(lp is not None and finite(lp) <= 0 for lp in logprobs[1:]), logprobs


def check_loss(output: types.ForwardBackwardOutput, count: int) -> None:
    finite(output.metrics["loss:sum"])
    expect(len(output.loss_fn_outputs), count)


def close_to(output: types.ForwardBackwardOutput, metric: str, reference: float) -> None:
    assert math.isclose(output.metrics[metric], reference, rel_tol=1e-4), (output.metrics, reference)


def check_run(run: types.TrainingRun, run_id: str) -> None:
    expect(run.training_run_id, run_id)
    expect(run.base_model, SMOL)
    expect(run.lora_rank, RANK)


def check_weights_info(info: types.WeightsInfoResponse) -> None:
    expect(info.base_model, SMOL)
    expect(info.lora_rank, RANK)


def check_public(rest: tinker.RestClient, run_id: str, path: str, public: bool) -> None:
    publish = rest.publish_checkpoint_from_tinker_path if public else rest.unpublish_checkpoint_from_tinker_path
    publish(path).result()
    expect(checkpoint_of(rest, run_id, path).public, public)


def check_deleted(rest: tinker.RestClient, run_id: str, path: str, delete) -> None:
    delete(path).result()
    excludes(paths(rest.list_checkpoints(run_id).result()), path)


def check_ttl(rest: tinker.RestClient, run_id: str, path: str, ttl_seconds: int | None) -> None:
    rest.set_checkpoint_ttl_from_tinker_path(path, ttl_seconds).result()
    expires_at = checkpoint_of(rest, run_id, path).expires_at
    assert (expires_at is None) == (ttl_seconds is None), expires_at


def check_external_files(response: types.ExternalWeightsUrlsResponse) -> None:
    """The signed URLs download (no API key) a PEFT adapter of the run's rank."""
    includes(set(response.urls), "adapter_model.safetensors")
    for name, url in response.urls.items():
        body = httpx.get(url, timeout=60).raise_for_status().content
        assert body, name
        if name == "adapter_config.json":
            expect(json.loads(body)["r"], RANK)


def downloaded(url: str) -> None:
    assert httpx.get(url, timeout=60).raise_for_status().content, url


def audited(log: types.AuditLogResponse, path: str) -> None:
    """Today's log holds the checkpoint's save, its weights_info read, and its publishing and unpublishing, in that
    order, all by the caller."""
    mine = [entry for entry in log.entries if entry.tinker_path == path]
    seen = [(entry.event, entry.purpose) for entry in mine]
    wanted = [("checkpoint_create", None), ("checkpoint_publish", None), ("checkpoint_unpublish", None)]
    assert [event for event in seen if event in wanted] == wanted, seen
    includes(seen, ("checkpoint_read", "weights_info"))
    expect(len({entry.event_details["actor"] for entry in mine}), 1)


def trained_in(usage: types.BillingUsageResponse, session_id: str | None) -> None:
    """The window holds this session's training tokens."""
    tokens = sum(
        event.event_info.token_count
        for event in usage.data
        if event.session_id == session_id and event.event_info.type == "training"
    )
    assert tokens > 0, usage


def stores_bytes(usage: types.CurrentCheckpointStorageUsageResponse) -> None:
    assert sum(item.size_bytes for item in usage.data) > 0, usage
