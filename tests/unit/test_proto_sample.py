"""SampleResponse bytes from our encoder decode correctly in the official SDK."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from api.proto import codec

pytest.importorskip("tinker")
from tinker.proto import tinker_public_pb2 as sdk_pb  # noqa: E402
from tinker.proto.response_conv import (  # noqa: E402
    deserialize_proto_response,
    deserialize_sample_response,
)
from tinker.types.sample_response import SampleResponse  # noqa: E402
from tinker.types.tensor_data import TensorData  # noqa: E402


def _f32(x: float) -> float:
    return float(np.float32(x))


def _response() -> dict[str, Any]:
    return {
        "type": "sample",
        "sequences": [
            {
                "stop_reason": "stop",
                "tokens": [11, 12, 13, 2],
                "logprobs": [-0.5, -1.25, -0.0625, -3.0],
                "sequence_id": "seq-a",
            },
            {
                "stop_reason": "length",
                "tokens": [2**31 - 1, 0, 7],
                "logprobs": None,
                "sequence_id": "seq-b",
            },
        ],
        # first prompt position has no logprob
        "prompt_logprobs": [None, -2.5, -0.75, _f32(-0.1)],
        "topk_prompt_logprobs": [
            None,
            [(5, -0.5), (6, -1.5), (7, -2.5)],
            [(8, -0.25)],  # shorter row: padded on the wire, trimmed by the SDK
            [(0, -1.0), (9, -2.0)],  # token 0 is a real token when its logprob is real
        ],
        "prompt_cache_hit_tokens": 2,
    }


def _tensor_dict(td: TensorData) -> dict[str, Any]:
    return {"data": td.data, "dtype": td.dtype, "shape": td.shape}


def _assert_sdk_equal(sdk: SampleResponse, want: dict[str, Any]) -> None:
    assert len(sdk.sequences) == len(want["sequences"])
    for got, exp in zip(sdk.sequences, want["sequences"], strict=True):
        assert got.stop_reason == exp["stop_reason"]
        assert got.tokens == exp["tokens"]
        assert got.tokens_np.dtype == np.int32
        assert got.logprobs == exp["logprobs"]
        assert got.sequence_id is None  # stamped by the client from sample_sequence_ids
        assert got.topk_logprobs == exp.get("topk_logprobs")
    assert sdk.prompt_logprobs == want["prompt_logprobs"]
    assert sdk.topk_prompt_logprobs == want["topk_prompt_logprobs"]
    assert sdk.prompt_cache_hit_tokens == want.get("prompt_cache_hit_tokens", 0)


def test_sdk_decodes_our_sample_response() -> None:
    resp = _response()
    body = codec.encode_sample_response(resp)
    sdk = deserialize_proto_response(body, SampleResponse)
    _assert_sdk_equal(sdk, resp)
    assert math.isnan(sdk.prompt_logprobs_np[0])  # None travels as NaN
    assert sdk.topk_prompt_logprobs_np.token_ids.shape == (4, 3)


def test_no_prompt_logprobs_means_absent_fields() -> None:
    resp = {
        "sequences": [{"stop_reason": "length", "tokens": [1], "logprobs": [-0.5]}],
        "prompt_logprobs": None,
        "topk_prompt_logprobs": None,
    }
    body = codec.encode_sample_response(resp)
    msg = sdk_pb.SampleResponse.FromString(body)
    assert not msg.HasField("prompt_logprobs") and not msg.HasField("topk_prompt_logprobs")
    sdk = deserialize_sample_response(body)
    assert sdk.prompt_logprobs is None and sdk.topk_prompt_logprobs is None
    assert sdk.sequences[0].logprobs == [-0.5]


def test_all_none_topk_rows_stay_rows() -> None:
    resp = {
        "sequences": [],
        "prompt_logprobs": [None, None],
        "topk_prompt_logprobs": [None, None],
    }
    sdk = deserialize_sample_response(codec.encode_sample_response(resp))
    assert sdk.prompt_logprobs == [None, None]
    assert sdk.topk_prompt_logprobs == [None, None]
    assert sdk.sequences == []


def test_sampled_topk_and_extra_prompt_outputs() -> None:
    resp = {
        "sequences": [
            {
                "stop_reason": "stop",
                "tokens": [4, 5],
                "logprobs": [-0.5, -0.25],
                "topk_logprobs": [[(4, -0.5), (9, -1.0)], [(5, -0.25)]],
            }
        ],
        "prompt_logprobs": None,
        "topk_prompt_logprobs": None,
        "target_prompt_logprobs": {
            "data": [0.0, -1.5, -0.5, 0.0],
            "dtype": "float32",
            "shape": [2, 2],
        },
        "prompt_alt_tokens": {
            "tokens": {"data": [3, 4], "dtype": "int64", "shape": [1, 2]},
            "logprobs": {"data": [-0.5, -2.0], "dtype": "float32", "shape": [1, 2]},
        },
    }
    body = codec.encode_sample_response(resp)
    sdk = deserialize_sample_response(body)
    assert sdk.sequences[0].topk_logprobs == resp["sequences"][0]["topk_logprobs"]
    assert _tensor_dict(sdk.target_prompt_logprobs) == resp["target_prompt_logprobs"]
    assert _tensor_dict(sdk.prompt_alt_tokens.tokens) == resp["prompt_alt_tokens"]["tokens"]
    assert _tensor_dict(sdk.prompt_alt_tokens.logprobs) == resp["prompt_alt_tokens"]["logprobs"]
    assert sdk.prompt_alt_tokens.logprobs.to_numpy().tolist() == [[-0.5, -2.0]]


def test_bad_sample_dicts_raise_value_error() -> None:
    with pytest.raises(ValueError, match="stop_reason"):
        codec.encode_sample_response({"sequences": [{"stop_reason": "eos", "tokens": []}]})
    with pytest.raises(ValueError, match="int32"):
        codec.encode_sample_response({"sequences": [{"stop_reason": "stop", "tokens": [2**31]}]})
    with pytest.raises(ValueError, match="prompt_logprobs"):
        codec.encode_sample_response({"sequences": [], "prompt_logprobs": ["x"]})
