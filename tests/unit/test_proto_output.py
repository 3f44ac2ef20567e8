"""ForwardBackwardOutput bytes from our encoder decode correctly in the official SDK."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from api.proto import codec

pytest.importorskip("tinker")
from tinker.proto import tinker_public_pb2 as sdk_pb  # noqa: E402
from tinker.proto.response_conv import (  # noqa: E402
    deserialize_forward_backward_output,
    deserialize_proto_response,
)
from tinker.types.forward_backward_output import ForwardBackwardOutput  # noqa: E402


def _t(values: Any, dtype: str, shape: list[int] | None = None) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float32 if dtype == "float32" else np.int64)
    return {
        "data": arr.reshape(-1).tolist(),
        "dtype": dtype,
        "shape": list(arr.shape) if shape is None else shape,
    }


def _assert_sdk_equal(sdk_out: ForwardBackwardOutput, expected: dict[str, Any]) -> None:
    assert sdk_out.loss_fn_output_type == expected["loss_fn_output_type"]
    assert sdk_out.metrics == expected["metrics"]
    assert len(sdk_out.loss_fn_outputs) == len(expected["loss_fn_outputs"])
    for got, want in zip(sdk_out.loss_fn_outputs, expected["loss_fn_outputs"], strict=True):
        assert set(got) == set(want)
        for name, td in got.items():
            assert td.dtype == want[name]["dtype"], name
            assert td.shape == want[name]["shape"], name
            assert td.data == want[name]["data"], name
            want_np = np.asarray(want[name]["data"]).reshape(want[name]["shape"])
            np.testing.assert_array_equal(td.to_numpy(), want_np)


def _cross_entropy_output() -> dict[str, Any]:
    lengths = [5, 1, 3, 8]
    rng = np.random.default_rng(1)
    outputs = []
    for n in lengths:
        logprobs = -rng.random(n, dtype=np.float32) * 4
        outputs.append(
            {
                "logprobs": _t(logprobs, "float32"),
                "elementwise_loss": _t(-logprobs, "float32"),
            }
        )
    return {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": outputs,
        "metrics": {"loss:sum": 12.5, "num_tokens:sum": 17.0, "clip_frac:mean": 0.1},
    }


def test_sdk_decodes_our_forward_backward_output() -> None:
    out = _cross_entropy_output()
    body = codec.encode_forward_backward_output(out)
    _assert_sdk_equal(deserialize_forward_backward_output(body), out)
    # the dispatch the futures poller uses for Content-Type: application/x-protobuf
    sdk_out = deserialize_proto_response(body, ForwardBackwardOutput)
    assert [td.data for td in (d["logprobs"] for d in sdk_out.loss_fn_outputs)] == [
        d["logprobs"]["data"] for d in out["loss_fn_outputs"]
    ]
    # one batched record with byte offsets
    msg = sdk_pb.ForwardBackwardOutput.FromString(body)
    assert len(msg.loss_fn_outputs) == 1
    rec = msg.loss_fn_outputs[0]
    assert rec.num_datums == 4
    offsets = np.frombuffer(rec.fields["logprobs"].offsets, dtype="<i8").tolist()
    assert offsets == [0, 20, 24, 36, 68]
    assert rec.fields["logprobs"].dtype == sdk_pb.DTYPE_FLOAT32
    assert list(rec.fields["logprobs"].trailing_shape) == []


def test_mixed_dtypes_and_2d_and_ragged_trailing_shapes() -> None:
    out = {
        "loss_fn_output_type": "TorchLossReturn",
        "loss_fn_outputs": [
            {
                "topk_ids": _t([[1, 2, 3], [4, 5, 6]], "int64"),
                "topk_logprobs": _t([[-0.5, -1.0, -2.0], [-0.25, -1.5, -3.0]], "float32"),
            },
            {
                "topk_ids": _t([[7, 8, 9]], "int64"),
                "topk_logprobs": _t([[-0.125, -0.5, -4.0]], "float32"),
            },
            # different K: must go to a second ArrayRecord
            {
                "topk_ids": _t([[1, 2], [3, 4], [5, 6]], "int64"),
                "topk_logprobs": _t([[-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0]], "float32"),
            },
            # zero-length datum with the same K as the previous one
            {
                "topk_ids": {"data": [], "dtype": "int64", "shape": [0, 2]},
                "topk_logprobs": {"data": [], "dtype": "float32", "shape": [0, 2]},
            },
        ],
        "metrics": {},
    }
    body = codec.encode_forward_backward_output(out)
    msg = sdk_pb.ForwardBackwardOutput.FromString(body)
    assert [r.num_datums for r in msg.loss_fn_outputs] == [2, 2]
    assert [list(r.fields["topk_ids"].trailing_shape) for r in msg.loss_fn_outputs] == [[3], [2]]
    _assert_sdk_equal(deserialize_forward_backward_output(body), out)


def test_numpy_data_and_module_qualified_type() -> None:
    logprobs = np.array([-1.0, -2.0], dtype=np.float32)
    out = {
        "loss_fn_output_type": "tinker_train.losses:ArrayRecord",
        "loss_fn_outputs": [{"logprobs": {"data": logprobs, "dtype": "float32", "shape": [2]}}],
        "metrics": {"loss:sum": 3},
    }
    sdk_out = deserialize_forward_backward_output(codec.encode_forward_backward_output(out))
    assert sdk_out.loss_fn_output_type == "ArrayRecord"  # class name only, like JSON
    assert sdk_out.loss_fn_outputs[0]["logprobs"].data == [-1.0, -2.0]
    assert sdk_out.metrics == {"loss:sum": 3.0}


def test_empty_outputs_and_fieldless_datums() -> None:
    empty = {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [],
        "metrics": {"loss:sum": 0.0},
    }
    _assert_sdk_equal(deserialize_forward_backward_output(codec.encode_forward_backward_output(empty)), empty)

    fieldless = {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [{}, {}, {}],
        "metrics": {},
    }
    _assert_sdk_equal(deserialize_forward_backward_output(codec.encode_forward_backward_output(fieldless)), fieldless)


def test_inconsistent_fields_are_rejected() -> None:
    out = {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [{"logprobs": _t([-1.0], "float32")}, {"other": _t([-1.0], "float32")}],
        "metrics": {},
    }
    with pytest.raises(ValueError, match="same fields"):
        codec.encode_forward_backward_output(out)
    bad = {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [{"logprobs": {"data": [1.0, 2.0], "dtype": "float32", "shape": [3]}}],
        "metrics": {},
    }
    with pytest.raises(ValueError, match="do not match shape"):
        codec.encode_forward_backward_output(bad)
    with pytest.raises(ValueError, match="dtype"):
        codec.encode_forward_backward_output({"loss_fn_outputs": [{"x": {"data": [1], "dtype": "int8", "shape": [1]}}]})
