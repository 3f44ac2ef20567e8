"""Wire types of loom.types against the official tinker 0.38 SDK's JSON.

The tinker SDK is only a test dependency here: it is the reference for the
JSON shapes, and these tests check both directions (tinker JSON -> ours ->
same JSON; ours -> tinker's models validate it).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from loom import types as L

tinker = pytest.importorskip("tinker")
T = tinker.types
np = pytest.importorskip("numpy")
from tinker.types.try_again_response import TryAgainResponse as TTryAgain  # noqa: E402


def _tinker_json(obj) -> dict:
    return obj.model_dump(mode="json", exclude_none=True)


def test_types_import_without_numpy_or_torch() -> None:
    code = "import sys, loom, loom.types; assert not {'numpy','torch','transformers'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_forward_backward_input_json_matches_tinker() -> None:
    from tinker.types._pydantic_types.datum import Datum as TDatum
    from tinker.types._pydantic_types.forward_backward_input import ForwardBackwardInput as TFBI
    from tinker.types._pydantic_types.model_input import ModelInput as TMI

    inputs = {
        "target_tokens": [5, 6, 7],
        "weights": [1.0, 0.0, 1.0],
        "advantages": np.array([0.5, -1.0, 2.0], dtype=np.float32),
        "logprobs": [-0.5, -1.0, -2.0],
    }
    theirs = TFBI(
        data=[TDatum(model_input=TMI.from_ints([1, 2, 3]), loss_fn_inputs=dict(inputs))],
        loss_fn="ppo",
        loss_fn_config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    )
    ours = L.ForwardBackwardInput(
        data=[L.Datum(model_input=L.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs=dict(inputs))],
        loss_fn="ppo",
        loss_fn_config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    )
    assert ours.to_wire() == _tinker_json(theirs)
    # and the old SDK's request envelope
    request = L.ForwardBackwardRequest(forward_backward_input=ours, model_id="s:train:0", seq_id=3)
    assert request.to_wire() == {
        "forward_backward_input": _tinker_json(theirs),
        "model_id": "s:train:0",
        "seq_id": 3,
    }


def test_forward_backward_request_accepts_flat_and_forward_shapes() -> None:
    datum = {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
        "loss_fn_inputs": {"target_tokens": {"data": [2, 3], "dtype": "int64", "shape": [2]}},
    }
    flat = L.ForwardBackwardRequest.model_validate(
        {"model_id": "m", "seq_id": 4, "data": [datum], "loss_fn": "cross_entropy", "forward_only": True}
    )
    assert flat.is_forward_only and flat.forward_backward_input.loss_fn == "cross_entropy"
    old_forward = L.ForwardBackwardRequest.model_validate(
        {"model_id": "m", "seq_id": 4, "forward_input": {"data": [datum], "loss_fn": "cross_entropy"}}
    )
    assert old_forward.is_forward_only
    nested = L.ForwardBackwardRequest.model_validate(
        {"model_id": "m", "forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy"}}
    )
    assert not nested.is_forward_only and "forward_only" not in nested.to_wire()
    fwd = L.ForwardRequest.model_validate({"forward_input": {"data": [datum], "loss_fn": "dro"}, "model_id": "m"})
    assert fwd.to_forward_backward_request().is_forward_only
    with pytest.raises(ValidationError):
        L.ForwardBackwardRequest.model_validate({"model_id": "m", "data": [datum], "loss_fn": "reinforce"})


@pytest.mark.parametrize(
    "tinker_obj, ours",
    [
        (T.OptimStepRequest(optim_params=T.AdamParams(learning_rate=3e-4), model_id="m", seq_id=2), L.OptimStepRequest),
        (
            T.CreateModelRequest(
                session_id="s",
                model_seq_id=0,
                base_model="b",
                user_metadata={"k": "v"},
                lora_config=T.LoraConfig(rank=8, seed=3, train_unembed=False),
            ),
            L.CreateModelRequest,
        ),
        (T.SaveWeightsRequest(model_id="m", path="ckpt", seq_id=5, ttl_seconds=7200), L.SaveWeightsRequest),
        (
            T.SaveWeightsForSamplerRequest(model_id="m", seq_id=6, sampling_session_seq_id=1),
            L.SaveWeightsForSamplerRequest,
        ),
        (
            T.LoadWeightsRequest(model_id="m", seq_id=1, path="tinker://r/weights/x", optimizer=True),
            L.LoadWeightsRequest,
        ),
        (
            T.LoadWeightsRequest(session_id="s", model_seq_id=2, path="tinker://r/weights/x", optimizer=False),
            L.LoadWeightsRequest,
        ),
        (T.GetInfoRequest(model_id="m"), L.GetInfoRequest),
        (T.UnloadModelRequest(model_id="m"), L.UnloadModelRequest),
        (T.CreateSessionRequest(tags=["a"], user_metadata=None, sdk_version="0.38.0"), L.CreateSessionRequest),
        (T.SessionHeartbeatRequest(session_id="s"), L.SessionHeartbeatRequest),
        (
            T.CreateSamplingSessionRequest(
                session_id="s", sampling_session_seq_id=0, model_path="tinker://r/sampler_weights/x"
            ),
            L.CreateSamplingSessionRequest,
        ),
        (
            T.SampleRequest(
                sampling_session_id="ss",
                seq_id=7,
                num_samples=3,
                prompt=T.ModelInput.from_ints([1, 2, 3]),
                sampling_params=T.SamplingParams(max_tokens=9, stop=[13], seed=1, temperature=0.7),
                prompt_logprobs=True,
                topk_prompt_logprobs=2,
            ),
            L.SampleRequest,
        ),
        (
            T.SampleRequest(
                base_model="b", prompt=T.ModelInput.from_ints([1]), sampling_params=T.SamplingParams(stop="x")
            ),
            L.SampleRequest,
        ),
        (T.FutureRetrieveRequest(request_id="r", allow_metadata_only=True), L.FutureRetrieveRequest),
        (T.ClientConfigRequest(sdk_version="0.38.0"), L.ClientConfigRequest),
        (
            T.CopyWeightsRequest(source_path="tinker://r/weights/a", destination_project_id="p", ttl_seconds=3600),
            L.CopyWeightsRequest,
        ),
        (
            T.CopyWeightsRequest(source_path="tinker://r/weights/a", session_id="s", model_seq_id=2),
            L.CopyWeightsRequest,
        ),
        (
            T.GetBillingUsageRequest(starting_on="2026-07-13T00:00:00Z", ending_before="2026-07-14T00:00:00Z"),
            L.GetBillingUsageRequest,
        ),
    ],
)
def test_tinker_requests_round_trip(tinker_obj, ours) -> None:
    wire = _tinker_json(tinker_obj)
    assert ours.model_validate(wire).to_wire() == wire


def test_adam_defaults_match_tinker() -> None:
    assert L.AdamParams().to_wire() == _tinker_json(T.AdamParams())
    assert L.LoraConfig(rank=4).to_wire() == _tinker_json(T.LoraConfig(rank=4))
    assert L.SamplingParams().to_wire() == _tinker_json(T.SamplingParams())


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (L.CreateModelResponse(model_id="s:train:0"), T.CreateModelResponse),
        (L.TryAgainResponse(request_id="r", queue_state="paused_capacity"), TTryAgain),
        (L.RequestFailedResponse(error="bad", category="user"), T.RequestFailedResponse),
        (L.UntypedAPIFuture(request_id="r", model_id="m"), T.UntypedAPIFuture),
        (L.OptimStepResponse(metrics={"grad_norm:mean": 1.0}), T.OptimStepResponse),
        (L.SaveWeightsResponse(path="tinker://r/weights/a"), T.SaveWeightsResponse),
        (L.SaveWeightsForSamplerResponse(path="tinker://r/sampler_weights/a"), T.SaveWeightsForSamplerResponse),
        (L.SaveWeightsForSamplerResponse(sampling_session_id="ss"), T.SaveWeightsForSamplerResponseInternal),
        (L.LoadWeightsResponse(path="tinker://r/weights/a", model_id="m"), T.LoadWeightsResponse),
        (
            L.GetInfoResponse(model_id="m", model_data=L.ModelData(model_name="b", tokenizer_id="tok")),
            T.GetInfoResponse,
        ),
        (L.CreateSessionResponse(session_id="s"), T.CreateSessionResponse),
        (L.SessionHeartbeatResponse(), T.SessionHeartbeatResponse),
        (L.CreateSamplingSessionResponse(sampling_session_id="ss"), T.CreateSamplingSessionResponse),
        (
            L.GetServerCapabilitiesResponse(supported_models=[L.SupportedModel(model_name="m", max_context_length=8)]),
            T.GetServerCapabilitiesResponse,
        ),
        (L.HealthResponse(), T.HealthResponse),
        (L.ClientConfigResponse(), T.ClientConfigResponse),
        (L.ClientDynamicConfigResponse(), T.ClientDynamicConfigResponse),
        (L.TelemetryResponse(), T.TelemetryResponse),
        (L.WeightsInfoResponse(base_model="b", is_lora=True, lora_rank=8), T.WeightsInfoResponse),
        (L.GetSamplerResponse(sampler_id="s", base_model="b"), T.GetSamplerResponse),
        (
            L.TrainingRunsResponse(
                training_runs=[
                    L.TrainingRun(
                        training_run_id="r",
                        base_model="b",
                        model_owner="o",
                        is_lora=True,
                        last_request_time="2026-01-01T00:00:00Z",
                        last_checkpoint=L.Checkpoint(
                            checkpoint_id="weights/a",
                            checkpoint_type="training",
                            time="2026-01-01T00:00:00Z",
                            tinker_path="tinker://r/weights/a",
                        ),
                    )
                ],
                cursor=L.Cursor(offset=0, limit=20, total_count=1),
            ),
            T.TrainingRunsResponse,
        ),
        (L.CopyWeightsResponse(tinker_path="tinker://c:train:0/weights/a"), T.CopyWeightsResponse),
        (
            L.CheckpointsListResponse(
                checkpoints=[
                    L.Checkpoint(
                        checkpoint_id="weights/a",
                        checkpoint_type="training",
                        time="2026-01-01T00:00:00Z",
                        tinker_path="tinker://r/weights/a",
                        size_bytes=12,
                        public=True,
                        user_metadata={"copied_from": "tinker://s/weights/a"},
                    )
                ],
                cursor=L.Cursor(offset=0, limit=100, total_count=1),
            ),
            T.CheckpointsListResponse,
        ),
        (
            L.BillingUsageResponse(
                data=[
                    L.BillingUsageEvent(
                        bucket_start="2026-07-13T00:00:00Z",
                        bucket_end="2026-07-13T01:00:00Z",
                        base_model="b",
                        user_id="alice",
                        session_id="s",
                        project_id="p",
                        event_info=info,
                    )
                    for info in (
                        L.TrainingBillingEvent(token_count=3),
                        L.SamplingPrefillBillingEvent(cached=True, token_count=4),
                        L.SamplingSampleBillingEvent(token_count=5),
                        L.CheckpointBillingEvent(count=1),
                        L.StorageBillingEvent(gigabyte_hours=0.5),
                    )
                ],
                sessions={"s": L.BillingUsageSession(user_metadata={"a": "b"})},
            ),
            T.BillingUsageResponse,
        ),
        (
            L.CurrentCheckpointStorageUsageResponse(
                data=[
                    L.CurrentCheckpointStorageUsageItem(
                        project_id="p", org_user_urn="alice", checkpoint_count=2, size_bytes=10, size_gigabytes=1e-8
                    )
                ]
            ),
            T.CurrentCheckpointStorageUsageResponse,
        ),
    ],
)
def test_tinker_parses_our_responses(ours, theirs) -> None:
    wire = ours.to_wire()
    parsed = theirs.model_validate(wire)
    dumped = _tinker_json(parsed)
    # every field tinker knows reads back as we sent it (flags it lacks are ignored)
    common = set(wire) & set(dumped)
    assert common, "no overlap with tinker's model"
    with_datetimes = (T.TrainingRunsResponse, T.CheckpointsListResponse, T.BillingUsageResponse)
    if not isinstance(parsed, with_datetimes):  # datetimes re-serialise differently
        assert {k: dumped[k] for k in common} == {k: wire[k] for k in common}


def test_sample_response_json_parses_in_old_tinker_shape() -> None:
    body = {
        "type": "sample",
        "sequences": [{"stop_reason": "stop", "tokens": [4, 5], "logprobs": [-0.1, -0.2]}],
        "prompt_logprobs": [None, -1.5],
        "topk_prompt_logprobs": [None, [[3, -0.1], [9, -2.0]]],
    }
    response = L.SampleResponse.model_validate(body)
    assert response.sequences[0].tokens == [4, 5]
    assert response.topk_prompt_logprobs == [None, [(3, -0.1), (9, -2.0)]]
    assert response.to_wire()["topk_prompt_logprobs"] == [None, [[3, -0.1], [9, -2.0]]]


def test_tensor_data_helpers() -> None:
    td = L.TensorData.from_list([[1, 2, 3], [4, 5, 6]])
    assert td.dtype == "int64" and td.shape == [2, 3] and td.data == [1, 2, 3, 4, 5, 6]
    assert td.tolist() == [[1, 2, 3], [4, 5, 6]]
    f = L.TensorData(data=[1, 2], dtype="float32")
    assert f.data == [1.0, 2.0] and all(isinstance(v, float) for v in f.data) and f.tolist() == [1.0, 2.0]
    assert L.TensorData(data=[1.0, 2.0], dtype="int64").data == [1, 2]
    with pytest.raises(ValidationError):
        L.TensorData(data=[1.5], dtype="int64")
    with pytest.raises(ValidationError):
        L.TensorData(data=[1, 2, 3], dtype="int64", shape=[2, 2])
    with pytest.raises(ValidationError):
        L.TensorData(data=[1], dtype="bfloat16")
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    from_np = L.TensorData.from_array(arr)
    assert from_np.dtype == "float32" and from_np.shape == [2, 3]
    assert from_np.to_wire() == _tinker_json(
        __import__("tinker.types._pydantic_types.tensor_data", fromlist=["TensorData"]).TensorData.from_numpy(arr)
    )
    assert (from_np.to_numpy() == arr).all()
    sparse = L.TensorData(
        data=[7, 8], dtype="int64", shape=[2, 3], sparse_crow_indices=[0, 1, 2], sparse_col_indices=[2, 0]
    )
    assert sparse.tolist() == [[0, 0, 7], [8, 0, 0]]
    assert sparse.tolist(pad_value=-1) == [[-1, -1, 7], [8, -1, -1]]


def test_model_input_chunks() -> None:
    mi = L.ModelInput.model_validate(
        {"chunks": [{"tokens": [1, 2]}, {"type": "image", "data": "aGk=", "format": "png", "expected_tokens": 4}]}
    )
    assert isinstance(mi.chunks[0], L.EncodedTextChunk)
    assert isinstance(mi.chunks[1], L.ImageChunk) and mi.chunks[1].data == b"hi"
    assert mi.length == 6
    assert mi.to_wire()["chunks"][1]["data"] == "aGk="
    with pytest.raises(ValueError):
        mi.to_ints()
    assert L.ModelInput.from_ints([1]).append_int(2).to_ints() == [1, 2]
    # tinker's own image chunk JSON is accepted
    wire = _tinker_json(T.ModelInput(chunks=[T.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=3)]))
    assert L.ModelInput.model_validate(wire).to_wire() == wire


def test_checkpoint_path_parsing() -> None:
    p = L.ParsedCheckpointTinkerPath.from_tinker_path("tinker://abc:train:0/weights/step-10")
    assert (p.training_run_id, p.checkpoint_type, p.checkpoint_id) == ("abc:train:0", "training", "weights/step-10")
    for bad in ("s3://x/weights/a", "tinker://abc/other/a", "tinker://abc/weights"):
        with pytest.raises(ValueError):
            L.ParsedCheckpointTinkerPath.from_tinker_path(bad)


def test_unknown_fields_are_ignored() -> None:
    req = L.CreateSessionRequest.model_validate({"tags": [], "sdk_version": "9", "brand_new_field": 1})
    assert "brand_new_field" not in req.to_wire()
    with pytest.raises(ValidationError):
        L.OptimStepRequest.model_validate({"adam_params": {"learning_rate": "fast"}, "model_id": "m"})
