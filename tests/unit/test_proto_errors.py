"""Malformed protobuf payloads raise ProtoDecodeError (a ValueError) with a clear message."""

from __future__ import annotations

import numpy as np
import pytest

from api.proto import codec
from api.proto import tinker_wire_pb2 as pb
from api.proto.codec import ProtoDecodeError


def _request(**tensor_kw) -> pb.ForwardBackwardRequest:
    msg = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.array([1, 2, 3], dtype="<i4").tobytes()
    t = d.loss_fn_inputs["weights"]
    t.dtype = tensor_kw.get("dtype", pb.DTYPE_FLOAT32)
    t.shape.extend(tensor_kw.get("shape", [3]))
    t.dense = tensor_kw.get("dense", np.ones(3, dtype="<f4").tobytes())
    return msg


def _decode(msg_or_bytes) -> dict:
    body = msg_or_bytes if isinstance(msg_or_bytes, bytes) else msg_or_bytes.SerializeToString()
    return codec.decode_forward_backward_request(body)


def test_error_type_is_value_error() -> None:
    assert issubclass(ProtoDecodeError, ValueError)
    assert _decode(_request())["forward_backward_input"]["data"][0]["loss_fn_inputs"]["weights"]["data"] == [
        1.0,
        1.0,
        1.0,
    ]


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xff\xff\xff",
        b'{"model_id": "m", "seq_id": 1}',  # JSON sent to the protobuf endpoint
        _request().SerializeToString()[:-5],  # truncated
        b"\x0a\x02\xc3\x28",  # model_id with invalid UTF-8
    ],
    ids=["garbage", "json", "truncated", "bad-utf8"],
)
def test_malformed_bytes(body: bytes) -> None:
    with pytest.raises(ProtoDecodeError, match="malformed ForwardBackwardRequest"):
        _decode(body)


def test_not_bytes() -> None:
    with pytest.raises(ProtoDecodeError, match="expected bytes"):
        codec.decode_forward_backward_request("hello")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"dtype": pb.DTYPE_UNSPECIFIED}, "unknown or unspecified dtype enum value 0"),
        ({"dtype": 9}, "unknown or unspecified dtype enum value 9"),
        ({"dense": b"\x00" * 5}, "not a multiple of the 4-byte element size"),
        ({"shape": [2, 2]}, r"3 elements do not match shape \[2, 2\]"),
        ({"shape": [-3]}, "negative dimension"),
        ({"dtype": pb.DTYPE_INT64}, "not a multiple of the 8-byte element size"),
    ],
)
def test_bad_tensors(kw: dict, message: str) -> None:
    with pytest.raises(ProtoDecodeError, match=message) as info:
        _decode(_request(**kw))
    assert "datum 0 loss_fn_inputs['weights']" in str(info.value)


def test_bad_tokens_and_chunks() -> None:
    msg = _request()
    msg.data[0].model_input[0].encoded_text.tokens = b"\x01\x00\x00"
    with pytest.raises(ProtoDecodeError, match="datum 0 chunk 0 tokens: 3 bytes"):
        _decode(msg)

    msg = _request()
    msg.data[0].model_input.add()  # empty Chunk
    with pytest.raises(ProtoDecodeError, match="datum 0 chunk 1: empty model input chunk"):
        _decode(msg)

    # A chunk kind from a future schema (field 9) arrives as an unknown field.
    body = _request().SerializeToString()
    datum_bytes = pb.ForwardBackwardRequest.FromString(body).data[0].SerializeToString()
    datum_bytes += b"\x0a\x02\x4a\x00"  # model_input += Chunk{9: b""}
    msg = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    msg.data.add().MergeFromString(datum_bytes)
    with pytest.raises(ProtoDecodeError, match=r"unsupported model input chunk .*\[9\]"):
        _decode(msg)


def test_bad_sparse_tensor() -> None:
    msg = _request()
    t = msg.data[0].loss_fn_inputs["weights"]
    t.ClearField("shape")
    t.shape.extend([2, 3])
    t.sparse_csr.values = np.ones(2, dtype="<f4").tobytes()
    t.sparse_csr.col_indices = np.array([0, 5], dtype="<i8").tobytes()
    t.sparse_csr.crow_indices = np.array([0, 1], dtype="<i8").tobytes()
    with pytest.raises(ProtoDecodeError, match="2 crow_indices for 2 rows"):
        _decode(msg)
    t.sparse_csr.crow_indices = np.array([0, 1, 2], dtype="<i8").tobytes()
    with pytest.raises(ProtoDecodeError, match="col_indices out of range"):
        _decode(msg)
    t.sparse_csr.crow_indices = np.array([0, 2, 1], dtype="<i8").tobytes()
    with pytest.raises(ProtoDecodeError, match="row pointer"):
        _decode(msg)


def test_bad_loss_fn_config_v2() -> None:
    msg = _request()
    msg.loss_fn_config_v2["clip"].SetInParent()
    with pytest.raises(ProtoDecodeError, match="loss_fn_config_v2\\['clip'\\]"):
        _decode(msg)
