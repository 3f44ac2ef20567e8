"""forward_backward request bodies written by the official tinker SDK decode correctly.

Bytes come from the SDK itself: its ``request_conv.forward_backward_request_to_proto``
and, end to end, its HTTP resource ``AsyncTinker.training.forward_backward``
captured by an httpx mock transport (uncompressed, as the server's client config
asks; a compressed body is refused at the API's door). The
decoded dicts read back into the SDK's request types and re-encode to the
same message, so decoding loses nothing.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import numpy as np
import pytest

from api.proto import codec
from api.proto import tinker_wire_pb2 as pb

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker._client import AsyncTinker  # noqa: E402
from tinker.proto import tinker_public_pb2 as sdk_pb  # noqa: E402
from tinker.types.client_config_response import ClientConfigResponse  # noqa: E402
from tinker.types.forward_backward_input import ForwardBackwardInput  # noqa: E402
from tinker.types.forward_backward_request import ForwardBackwardRequest  # noqa: E402

from tests.proto_wire import sdk_bytes, sdk_request  # noqa: E402

RNG = np.random.default_rng(0)


def _datums() -> list[Any]:
    """Datums of different lengths and loss inputs, as cookbook loops build them."""
    # SL: int64 targets (from a plain list), float32 weights.
    sl = types.Datum(
        model_input=types.ModelInput.from_ints([101, 7, 8, 9, 2**31 - 1]),
        loss_fn_inputs={
            "target_tokens": [7, 8, 9, 2**31 - 1, 3],
            "weights": [0.0, 1.0, 1.0, 0.5, 1.0],
        },
    )
    # RL: numpy int64 targets, float32 logprobs/advantages; two text chunks.
    rl = types.Datum(
        model_input=types.ModelInput(
            chunks=[
                types.EncodedTextChunk(tokens=[1, 2, 3]),
                types.EncodedTextChunk(tokens=[4, 5]),
            ]
        ),
        loss_fn_inputs={
            "target_tokens": np.array([2, 3, 4, 5, 6], dtype=np.int64),
            "logprobs": np.array([-0.5, -1.25, -2.0, -0.125, -3.5], dtype=np.float32),
            "advantages": np.array([1.5, 1.5, -0.25, -0.25, 0.0], dtype=np.float32),
        },
    )
    # Distillation-style 2-D float32 soft target [T, V] plus 1-D weights; T = 3.
    soft = RNG.random((3, 11), dtype=np.float32)
    soft /= soft.sum(axis=1, keepdims=True)
    distill = types.Datum(
        model_input=types.ModelInput.from_ints([10, 11, 12]),
        loss_fn_inputs={
            "target_distribution": types.TensorData.from_numpy(soft),
            "weights": types.TensorData(data=[1.0, 1.0, 1.0], dtype="float32", shape=[3]),
        },
    )
    # Single token, float target given without shape (shape=None on the wire).
    tiny = types.Datum(
        model_input=types.ModelInput.from_ints([42]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=[43], dtype="int64"),
            "weights": types.TensorData(data=[0.25], dtype="float32"),
        },
    )
    return [sl, rl, distill, tiny]


def _sdk_request(loss_fn_config: dict[str, Any] | None = None, seq_id: int = 7) -> ForwardBackwardRequest:
    return ForwardBackwardRequest(
        forward_backward_input=ForwardBackwardInput(
            data=_datums(), loss_fn="importance_sampling", loss_fn_config=loss_fn_config
        ),
        model_id="sess-1:train:0",
        seq_id=seq_id,
    )


def _expected_tensor(td: Any) -> dict[str, Any]:
    arr = td.to_numpy()
    return {"data": arr.reshape(-1).tolist(), "dtype": td.dtype, "shape": list(arr.shape)}


def _assert_matches_sdk(decoded: dict[str, Any], req: ForwardBackwardRequest, forward_only: bool) -> None:
    assert decoded["model_id"] == req.model_id
    assert decoded["seq_id"] == req.seq_id
    assert decoded["forward_only"] is forward_only
    fbi = decoded["forward_backward_input"]
    assert fbi["loss_fn"] == req.forward_backward_input.loss_fn
    expected_cfg = req.forward_backward_input.loss_fn_config
    assert fbi["loss_fn_config"] == (dict(expected_cfg) if expected_cfg else None)
    assert len(fbi["data"]) == len(req.forward_backward_input.data)
    for got, datum in zip(fbi["data"], req.forward_backward_input.data, strict=True):
        assert got["model_input"]["chunks"] == [
            {"type": "encoded_text", "tokens": list(c.tokens)} for c in datum.model_input.chunks
        ]
        assert set(got["loss_fn_inputs"]) == set(datum.loss_fn_inputs)
        for name, td in datum.loss_fn_inputs.items():
            assert got["loss_fn_inputs"][name] == _expected_tensor(td), name
        assert "model_input_spans" not in got


@pytest.mark.parametrize("forward_only", [False, True])
def test_decode_sdk_request(forward_only: bool) -> None:
    req = _sdk_request(loss_fn_config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
    decoded = codec.decode_forward_backward_request(sdk_bytes(req, forward_only))
    _assert_matches_sdk(decoded, req, forward_only)
    fbi = decoded["forward_backward_input"]
    # dtypes and shapes spelled out for the cases that matter
    assert fbi["data"][0]["loss_fn_inputs"]["target_tokens"]["dtype"] == "int64"
    assert fbi["data"][0]["loss_fn_inputs"]["target_tokens"]["data"][3] == 2**31 - 1
    assert fbi["data"][0]["loss_fn_inputs"]["weights"]["dtype"] == "float32"
    assert fbi["data"][1]["loss_fn_inputs"]["advantages"]["data"] == [1.5, 1.5, -0.25, -0.25, 0.0]
    soft = fbi["data"][2]["loss_fn_inputs"]["target_distribution"]
    assert soft["dtype"] == "float32" and soft["shape"] == [3, 11] and len(soft["data"]) == 33
    assert fbi["data"][3]["loss_fn_inputs"]["target_tokens"] == {
        "data": [43],
        "dtype": "int64",
        "shape": [1],
    }


def test_decode_sdk_request_string_and_missing_config() -> None:
    req = _sdk_request(loss_fn_config={"kl_coeff": 0.1, "variant": "dapo"}, seq_id=1)
    decoded = codec.decode_forward_backward_request(sdk_bytes(req))
    config = decoded["forward_backward_input"]["loss_fn_config"]
    assert config == {"kl_coeff": 0.1, "variant": "dapo"}
    req = _sdk_request(loss_fn_config=None)
    decoded = codec.decode_forward_backward_request(sdk_bytes(req))
    assert decoded["forward_backward_input"]["loss_fn_config"] is None


def test_arrays_mode_returns_numpy() -> None:
    req = _sdk_request()
    decoded = codec.decode_forward_backward_request(sdk_bytes(req), arrays=True)
    soft = decoded["forward_backward_input"]["data"][2]["loss_fn_inputs"]["target_distribution"]
    assert isinstance(soft["data"], np.ndarray) and soft["data"].dtype == np.float32
    expected = req.forward_backward_input.data[2].loss_fn_inputs["target_distribution"].to_numpy()
    np.testing.assert_array_equal(soft["data"].reshape(soft["shape"]), expected)
    soft["data"][0] = 5.0  # a private, writeable copy


def test_sparse_csr_tensor_from_sdk() -> None:
    torch = pytest.importorskip("torch")
    dense = torch.zeros((4, 6), dtype=torch.float32)
    dense[0, 1] = 1.0
    dense[2, 5] = 0.5
    td = types.TensorData.from_torch_sparse(dense)
    assert td.sparse_crow_indices is not None
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={"weights": td, "target_tokens": [2, 3, 4, 5]},
    )
    req = ForwardBackwardRequest(
        forward_backward_input=ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
        model_id="m",
        seq_id=3,
    )
    got = codec.decode_forward_backward_request(sdk_bytes(req))
    w = got["forward_backward_input"]["data"][0]["loss_fn_inputs"]["weights"]
    assert w == {
        "data": [1.0, 0.5],
        "dtype": "float32",
        "shape": [4, 6],
        "sparse_crow_indices": [0, 1, 1, 2, 2],
        "sparse_col_indices": [1, 5],
    }
    # and the SDK re-encodes what we decoded to the same message
    assert _same_message(sdk_bytes(sdk_request(got)), sdk_bytes(req))


def _same_message(a: bytes, b: bytes) -> bool:
    """Equal as ForwardBackwardRequest messages (map entries may serialise in any order)."""
    ours, theirs = pb.ForwardBackwardRequest(), pb.ForwardBackwardRequest()
    ours.ParseFromString(a)
    theirs.ParseFromString(b)
    return ours == theirs


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def test_image_dmel_chunks_and_provenance() -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    datum = types.Datum(
        model_input=types.ModelInput(
            chunks=[
                types.EncodedTextChunk(tokens=[1, 2]),
                types.ImageChunk(data=png, format="png", expected_tokens=4),
                types.ImageChunk(data=b"jpg", format="jpeg", expected_tokens=3),
            ]
        ),
        loss_fn_inputs={"target_tokens": [1, 2, 3], "weights": [1.0, 1.0, 1.0]},
    ).with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id="s-1", length=2),
            types.SampledProvenanceSpan(sequence_id="s-1", offset=1, length=7),
        ],
        loss_fn_inputs=[types.SampledProvenanceSpan(sequence_id="s-1", length=3)],
    )
    req = ForwardBackwardRequest(
        forward_backward_input=ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
        model_id="m",
        seq_id=2,
    )
    body = sdk_bytes(req)
    got = codec.decode_forward_backward_request(body)["forward_backward_input"]["data"][0]
    assert got["model_input"]["chunks"] == [
        {"type": "encoded_text", "tokens": [1, 2]},
        {"type": "image", "data": _b64(png), "format": "png", "expected_tokens": 4},
        {"type": "image", "data": _b64(b"jpg"), "format": "jpeg", "expected_tokens": 3},
    ]
    # the JSON ImageChunk validator accepts the base64 string we produce
    assert types.ImageChunk.model_validate(got["model_input"]["chunks"][1]).data == png
    assert got["model_input_spans"] == [
        {"type": "prompt_tokens", "sequence_id": "s-1", "offset": 0, "length": 2},
        {"type": "sampled_tokens", "sequence_id": "s-1", "offset": 1, "length": 7},
    ]
    assert got["loss_fn_input_spans"] == [{"type": "sampled_tokens", "sequence_id": "s-1", "offset": 0, "length": 3}]
    full = codec.decode_forward_backward_request(body)
    assert _same_message(sdk_bytes(sdk_request(full)), body)


def test_image_without_expected_tokens() -> None:
    datum = types.Datum(
        model_input=types.ModelInput(chunks=[types.ImageChunk(data=b"jpg", format="jpeg")]),
        loss_fn_inputs={},
    )
    req = ForwardBackwardRequest(
        forward_backward_input=ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
        model_id="m",
        seq_id=2,
    )
    got = codec.decode_forward_backward_request(sdk_bytes(req))["forward_backward_input"]
    assert got["data"] == [
        {
            "model_input": {"chunks": [{"type": "image", "data": "anBn", "format": "jpeg", "expected_tokens": None}]},
            "loss_fn_inputs": {},
        }
    ]


def test_dmel_chunk() -> None:
    msg = sdk_pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    msg.data.add().model_input.add().dmel.dmel = b"\x00\x01\x02"
    got = codec.decode_forward_backward_request(msg.SerializeToString())
    chunk = got["forward_backward_input"]["data"][0]["model_input"]["chunks"][0]
    assert chunk == {"type": "dmel", "dmel": base64.b64encode(b"\x00\x01\x02").decode()}


def test_decoded_request_reencodes_to_sdk_bytes() -> None:
    """The SDK's encoder, fed what we decoded from its bytes, reproduces those bytes."""
    req = _sdk_request(loss_fn_config={"clip_low_threshold": 0.8, "variant": "x"})
    body = sdk_bytes(req, forward_only=True)
    decoded = codec.decode_forward_backward_request(body)
    ours = sdk_bytes(sdk_request(decoded), forward_only=decoded["forward_only"])
    assert codec.decode_forward_backward_request(ours) == decoded
    # Byte for byte, except that the decoded dict always carries a shape where
    # the SDK sent shape=None (the last datum): the wire reads both as 1-D.
    theirs_msg = sdk_pb.ForwardBackwardRequest.FromString(body)
    ours_msg = sdk_pb.ForwardBackwardRequest.FromString(ours)
    for t in ours_msg.data[3].loss_fn_inputs.values():
        t.ClearField("shape")
    assert ours_msg == theirs_msg


def test_bf16_and_int32_inputs_are_widened() -> None:
    msg = sdk_pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.array([5, 6], dtype="<i4").tobytes()
    t = d.loss_fn_inputs["target_tokens"]
    t.dtype = sdk_pb.DTYPE_INT32
    t.dense = np.array([6, 7], dtype="<i4").tobytes()
    w = d.loss_fn_inputs["weights"]
    w.dtype = sdk_pb.DTYPE_BFLOAT16
    w.shape.extend([2])
    bf16 = np.array([1.0, -2.5], dtype=np.float32).view(np.uint32) >> 16
    w.dense = bf16.astype("<u2").tobytes()
    got = codec.decode_forward_backward_request(msg.SerializeToString())
    inputs = got["forward_backward_input"]["data"][0]["loss_fn_inputs"]
    assert inputs["target_tokens"] == {"data": [6, 7], "dtype": "int64", "shape": [2]}
    assert inputs["weights"] == {"data": [1.0, -2.5], "dtype": "float32", "shape": [2]}


# ---------------------------------------------------------------- through the SDK's HTTP client


def _capture_http(forward_only: bool) -> tuple[httpx.Request, ForwardBackwardRequest]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return httpx.Response(200, json={"request_id": "req-1", "model_id": "sess-1:train:0"})

    req = _sdk_request(loss_fn_config={"clip_low_threshold": 0.8})

    async def go() -> None:
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        client = AsyncTinker(
            api_key="tml-test-key",
            base_url="http://loom.test",
            http_client=http,
            max_retries=0,
            _client_config=ClientConfigResponse(proto_compress_fwdbwd=False, use_pyqwest_transport=False),
        )
        future = await client.training.forward_backward(request=req, forward_only=forward_only)
        assert future.request_id == "req-1"
        await http.aclose()

    asyncio.run(go())
    assert len(seen) == 1
    return seen[0], req


@pytest.mark.parametrize("forward_only", [False, True])
def test_decode_body_sent_by_sdk_http_client(forward_only: bool) -> None:
    """With the server's client config (compression off) the SDK sends a plain protobuf body, no Content-Encoding."""
    request, req = _capture_http(forward_only=forward_only)
    assert request.method == "POST"
    assert request.url.path == "/api/v1/forward_backward"
    assert request.headers["content-type"] == "application/x-protobuf"
    assert "content-encoding" not in request.headers
    decoded = codec.decode_forward_backward_request(request.content)
    _assert_matches_sdk(decoded, req, forward_only=forward_only)
