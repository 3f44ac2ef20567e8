"""Protobuf <-> JSON-shaped dict conversion for the Tinker wire protocol.

Role
----
Since tinker SDK 0.25 three payloads travel as protobuf (schema:
``api/proto/tinker_wire.proto``, wire-compatible with the SDK's
``tinker_public`` schema):

* the body of ``POST /api/v1/forward_backward`` (``ForwardBackwardRequest``,
  ``Content-Type: application/x-protobuf``; never compressed, since the
  server's ``/client/config`` leaves ``proto_compress_fwdbwd`` off and the
  API refuses any ``Content-Encoding`` before reading a body);
* forward/backward results and sample results returned by
  ``retrieve_future`` when the client sends ``Accept: application/x-protobuf``
  (``ForwardBackwardOutput``, ``SampleResponse``; the server must answer with
  a ``Content-Type`` containing ``application/x-protobuf``).

The server only ever reads requests and writes results, so this module does
exactly that: it decodes ``ForwardBackwardRequest`` bodies into the plain
dicts the JSON protocol uses (one set of pydantic types then validates both
encodings) and encodes results from those dicts. The other directions are the
client's: tests use the official SDK's ``tinker.proto.request_conv`` and
``response_conv``. The functions are pure: no I/O, no HTTP, no pydantic.

Tensor dicts look like ``{"data": [...], "dtype": "float32"|"int64",
"shape": [...]}`` (sparse CSR tensors add ``sparse_crow_indices`` and
``sparse_col_indices``), exactly as JSON ``TensorData``. Byte fields on the
wire are raw little-endian numpy buffers: tokens int32, tensor data in their
dtype, CSR indices and BatchedTensor offsets int64.

Limits (by design of the wire format, not of this module)
---------------------------------------------------------
* An empty ``Tensor.shape`` decodes as 1-D ``[len(data)]``; the wire cannot
  tell ``shape=None`` from ``shape=[]`` (a scalar).
* ``ForwardBackwardOutput`` stores each datum as ``[leading, *trailing]``, so a
  0-d output comes back 1-D; datums in one ``ArrayRecord`` share field names,
  dtypes and trailing shapes (the encoder starts a new record when they change).
* ``SampleResponse``: empty ``prompt_logprobs`` / sequence ``logprobs`` decode
  as ``None`` in the SDK; prompt positions without a logprob are NaN on the
  wire; top-k rows are padded to a common ``k`` with ``(0, -99999.0)``, and
  the SDK reads a row whose first slot is padding as ``None`` (so a genuine
  ``(0, -99999.0)`` entry is lost, an empty row reads as ``None``, and a
  top-k list for zero prompt positions reads back as ``None``).
  ``sequence_id`` is not on the wire: the SDK takes it from the
  ``sample_sequence_ids`` of the asample submission response.
* Request-side ``int32``/``bfloat16`` tensors (the SDK never sends them) are
  widened to ``int64``/``float32``, as the SDK does for results.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from api.proto import tinker_wire_pb2 as pb

__all__ = [
    "ProtoDecodeError",
    "decode_forward_backward_request",
    "encode_forward_backward_output",
    "encode_sample_response",
]

#: Filler for empty top-k slots (tinker ``types/topk_logprobs.MASK_LOGPROB``).
TOPK_MASK_LOGPROB = -99999.0

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


class ProtoDecodeError(ValueError):
    """The bytes are not a valid payload of the expected message."""


# ---------------------------------------------------------------- dtypes

# wire DType -> (numpy dtype of the bytes, public dtype name)
_WIRE_DTYPES: dict[int, tuple[np.dtype, str]] = {
    pb.DTYPE_FLOAT32: (np.dtype("<f4"), "float32"),
    pb.DTYPE_INT64: (np.dtype("<i8"), "int64"),
    pb.DTYPE_INT32: (np.dtype("<i4"), "int64"),
    pb.DTYPE_BFLOAT16: (np.dtype("<u2"), "float32"),
}
# public dtype name -> (wire DType, numpy dtype written)
_PUBLIC_DTYPES: dict[str, tuple[int, np.dtype]] = {
    "float32": (pb.DTYPE_FLOAT32, np.dtype("<f4")),
    "int64": (pb.DTYPE_INT64, np.dtype("<i8")),
}
_STOP_REASONS = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


def _widen(arr: np.ndarray, wire_dtype: int) -> np.ndarray:
    """Public-dtype, native-endian, writeable copy of a wire buffer view."""
    if wire_dtype == pb.DTYPE_BFLOAT16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if wire_dtype == pb.DTYPE_INT32:
        return arr.astype(np.int64)
    return arr.astype(arr.dtype.newbyteorder("="))


def _frombuffer(buf: bytes, dtype: np.dtype, what: str) -> np.ndarray:
    if len(buf) % dtype.itemsize:
        raise ProtoDecodeError(f"{what}: {len(buf)} bytes is not a multiple of the {dtype.itemsize}-byte element size")
    return np.frombuffer(buf, dtype=dtype)


def _as_output(arr: np.ndarray, arrays: bool) -> Any:
    return arr if arrays else arr.tolist()


def _unknown_field_numbers(msg: Any) -> list[int]:
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet

        return sorted({f.field_number for f in UnknownFieldSet(msg)})
    except Exception:  # pragma: no cover - depends on the protobuf runtime
        return []


def _parse(message_cls: Any, body: bytes) -> Any:
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise ProtoDecodeError(f"expected bytes, got {type(body).__name__}")
    msg = message_cls()
    try:
        msg.ParseFromString(bytes(body))
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ProtoDecodeError(f"malformed {message_cls.DESCRIPTOR.name} protobuf ({len(body)} bytes): {exc}") from exc
    return msg


# ---------------------------------------------------------------- tensors


def _decode_tensor(t: Any, what: str, arrays: bool) -> dict[str, Any]:
    spec = _WIRE_DTYPES.get(t.dtype)
    if spec is None:
        raise ProtoDecodeError(f"{what}: unknown or unspecified dtype enum value {t.dtype}")
    np_dtype, dtype_name = spec
    shape = [int(s) for s in t.shape]
    if any(s < 0 for s in shape):
        raise ProtoDecodeError(f"{what}: negative dimension in shape {shape}")
    encoding = t.WhichOneof("encoding")
    if encoding == "sparse_csr":
        csr = t.sparse_csr
        values = _widen(_frombuffer(csr.values, np_dtype, f"{what} sparse values"), t.dtype)
        crow = _frombuffer(csr.crow_indices, np.dtype("<i8"), f"{what} crow_indices")
        col = _frombuffer(csr.col_indices, np.dtype("<i8"), f"{what} col_indices")
        if len(shape) != 2:
            raise ProtoDecodeError(f"{what}: sparse CSR tensor needs a 2-D shape, got {shape}")
        if len(crow) != shape[0] + 1:
            raise ProtoDecodeError(f"{what}: {len(crow)} crow_indices for {shape[0]} rows (expected {shape[0] + 1})")
        if len(col) != len(values):
            raise ProtoDecodeError(f"{what}: {len(col)} col_indices for {len(values)} sparse values")
        if crow[0] != 0 or crow[-1] != len(values) or np.any(np.diff(crow) < 0):
            raise ProtoDecodeError(f"{what}: crow_indices are not a valid CSR row pointer")
        if len(col) and (col.min() < 0 or col.max() >= shape[1]):
            raise ProtoDecodeError(f"{what}: col_indices out of range for shape {shape}")
        return {
            "data": _as_output(values, arrays),
            "dtype": dtype_name,
            "shape": shape,
            "sparse_crow_indices": crow.tolist(),
            "sparse_col_indices": col.tolist(),
        }
    arr = _widen(_frombuffer(t.dense, np_dtype, f"{what} data"), t.dtype)
    if not shape:
        shape = [int(arr.size)]
    elif math.prod(shape) != arr.size:
        raise ProtoDecodeError(f"{what}: {arr.size} elements do not match shape {shape} ({math.prod(shape)} elements)")
    return {"data": _as_output(arr, arrays), "dtype": dtype_name, "shape": shape}


def _tensor_array(td: Mapping[str, Any], what: str) -> tuple[np.ndarray, list[int], int]:
    """Validate a tensor dict; returns (flat little-endian array, shape, wire dtype)."""
    dtype_name = td.get("dtype")
    if dtype_name not in _PUBLIC_DTYPES:
        raise ValueError(f"{what}: dtype must be 'float32' or 'int64', got {dtype_name!r}")
    wire_dtype, np_dtype = _PUBLIC_DTYPES[dtype_name]
    data = td.get("data")
    if data is None:
        data = []
    arr = np.asarray(data)
    if arr.dtype == object:
        raise ValueError(f"{what}: data must be a flat list of numbers")
    arr = arr.astype(np_dtype, copy=False).reshape(-1)
    shape = td.get("shape")
    shape = [int(arr.size)] if shape is None else [int(s) for s in shape]
    if td.get("sparse_crow_indices") is None and math.prod(shape) != arr.size:
        raise ValueError(f"{what}: {arr.size} elements do not match shape {shape}")
    return arr, shape, wire_dtype


def _encode_tensor(td: Mapping[str, Any], out: Any, what: str) -> None:
    arr, shape, wire_dtype = _tensor_array(td, what)
    out.dtype = wire_dtype
    out.shape.extend(shape)
    crow, col = td.get("sparse_crow_indices"), td.get("sparse_col_indices")
    if crow is not None:
        if col is None:
            raise ValueError(f"{what}: sparse_col_indices required with sparse_crow_indices")
        out.sparse_csr.values = arr.tobytes()
        out.sparse_csr.crow_indices = np.asarray(crow, dtype="<i8").tobytes()
        out.sparse_csr.col_indices = np.asarray(col, dtype="<i8").tobytes()
    else:
        out.dense = arr.tobytes()


# ---------------------------------------------------------------- forward_backward request


def _decode_chunk(chunk: Any, what: str) -> dict[str, Any]:
    kind = chunk.WhichOneof("chunk")
    if kind == "encoded_text":
        tokens = _frombuffer(chunk.encoded_text.tokens, np.dtype("<i4"), f"{what} tokens")
        return {"type": "encoded_text", "tokens": tokens.tolist()}
    if kind == "image":
        img = chunk.image
        out: dict[str, Any] = {
            "type": "image",
            "data": base64.b64encode(img.data).decode("ascii"),
            "format": img.format,
            "expected_tokens": img.expected_tokens if img.HasField("expected_tokens") else None,
        }
        if img.HasField("override_dimensions"):
            dims = img.override_dimensions
            out["override_dimensions"] = {"width": dims.width, "height": dims.height}
        return out
    if kind == "dmel":
        return {"type": "dmel", "dmel": base64.b64encode(chunk.dmel.dmel).decode("ascii")}
    unknown = _unknown_field_numbers(chunk)
    if unknown:
        raise ProtoDecodeError(f"{what}: unsupported model input chunk (unknown Chunk field number(s) {unknown})")
    raise ProtoDecodeError(f"{what}: empty model input chunk (none of encoded_text/image/dmel)")


def _decode_spans(spans: Sequence[Any], what: str) -> list[dict[str, Any]]:
    out = []
    for k, span in enumerate(spans):
        kind = span.WhichOneof("span")
        if kind is None:
            raise ProtoDecodeError(f"{what}[{k}]: empty provenance span")
        s = getattr(span, kind)
        out.append({"type": kind, "sequence_id": s.sequence_id, "offset": s.offset, "length": s.length})
    return out


def decode_forward_backward_request(body: bytes, *, arrays: bool = False) -> dict[str, Any]:
    """Decode a ``/api/v1/forward_backward`` protobuf body to the JSON request shape.

    Returns ``{"model_id", "seq_id", "forward_backward_input": {"data": [datum...],
    "loss_fn", "loss_fn_config"}, "forward_only"}``; each datum is
    ``{"model_input": {"chunks": [...]}, "loss_fn_inputs": {name: tensor dict}}``
    plus ``model_input_spans``/``loss_fn_input_spans`` when the client sent
    provenance. ``loss_fn_config`` merges the legacy number map with the v2 map
    (v2 wins) and is ``None`` when both are empty. With ``arrays=True`` tensor
    ``data`` is a 1-D numpy array instead of a list (no per-element boxing).

    Raises ``ProtoDecodeError`` for malformed protobuf, unknown
    dtypes, byte lengths that are not whole elements, data/shape mismatches,
    invalid CSR layouts and empty or unknown chunk kinds.
    """
    msg = _parse(pb.ForwardBackwardRequest, body)

    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        which = value.WhichOneof("value")
        if which is None:
            raise ProtoDecodeError(f"loss_fn_config_v2[{key!r}]: neither number nor text set")
        config[key] = float(value.number) if which == "number" else value.text

    data = []
    for i, datum in enumerate(msg.data):
        chunks = [_decode_chunk(c, f"datum {i} chunk {j}") for j, c in enumerate(datum.model_input)]
        inputs = {
            name: _decode_tensor(t, f"datum {i} loss_fn_inputs[{name!r}]", arrays)
            for name, t in sorted(datum.loss_fn_inputs.items())
        }
        d: dict[str, Any] = {"model_input": {"chunks": chunks}, "loss_fn_inputs": inputs}
        if datum.model_input_spans or datum.loss_fn_input_spans:
            d["model_input_spans"] = _decode_spans(datum.model_input_spans, f"datum {i} model_input_spans")
            d["loss_fn_input_spans"] = _decode_spans(datum.loss_fn_input_spans, f"datum {i} loss_fn_input_spans")
        data.append(d)

    return {
        "model_id": msg.model_id,
        "seq_id": msg.seq_id,
        "forward_backward_input": {
            "data": data,
            "loss_fn": msg.loss_fn,
            "loss_fn_config": config or None,
        },
        "forward_only": msg.forward_only,
    }


# ---------------------------------------------------------------- forward_backward output


def encode_forward_backward_output(output: Mapping[str, Any]) -> bytes:
    """Encode a forward/backward result as ``ForwardBackwardOutput`` bytes.

    ``output`` is ``{"loss_fn_output_type": str, "loss_fn_outputs": [{name:
    tensor dict}, ...], "metrics": {str: float}}``; tensor ``data`` may be a
    list or a numpy array. Every datum must carry the same field names. Runs
    of datums whose fields agree on dtype and trailing shape (``shape[1:]``)
    share one ``ArrayRecord`` of ``BatchedTensor`` columns (per-datum byte
    offsets, int64); a change starts a new record, which the SDK concatenates.
    """
    out_type = output.get("loss_fn_output_type") or "ArrayRecord"
    msg = pb.ForwardBackwardOutput()
    msg.loss_fn_output_type = out_type
    for key, value in (output.get("metrics") or {}).items():
        msg.metrics[key] = float(value)

    datums = list(output.get("loss_fn_outputs") or [])
    if not datums:
        return msg.SerializeToString()
    names = sorted(datums[0])
    # Per datum: {name: (array, trailing shape, wire dtype)}
    prepared: list[dict[str, tuple[np.ndarray, tuple[int, ...], int]]] = []
    for i, datum in enumerate(datums):
        if sorted(datum) != names:
            raise ValueError(
                f"loss_fn_outputs[{i}] has fields {sorted(datum)}, datum 0 has {names}; "
                "all datums of one result must carry the same fields"
            )
        fields = {}
        for name in names:
            arr, shape, wire_dtype = _tensor_array(datum[name], f"loss_fn_outputs[{i}][{name!r}]")
            if datum[name].get("sparse_crow_indices") is not None:
                raise ValueError(f"loss_fn_outputs[{i}][{name!r}]: sparse outputs not supported")
            fields[name] = (arr, tuple(shape[1:]), wire_dtype)
        prepared.append(fields)

    def signature(fields: Mapping[str, tuple[np.ndarray, tuple[int, ...], int]]) -> tuple:
        return tuple((n, fields[n][1], fields[n][2]) for n in names)

    start = 0
    while start < len(prepared):
        sig = signature(prepared[start])
        end = start + 1
        while end < len(prepared) and signature(prepared[end]) == sig:
            end += 1
        record = msg.loss_fn_outputs.add()
        record.type_tag = out_type
        record.num_datums = end - start
        for name in names:
            parts = [prepared[k][name][0] for k in range(start, end)]
            _, trailing, wire_dtype = prepared[start][name]
            sizes = np.fromiter((p.nbytes for p in parts), dtype=np.int64, count=len(parts))
            offsets = np.zeros(len(parts) + 1, dtype="<i8")
            np.cumsum(sizes, out=offsets[1:])
            bt = record.fields[name]
            bt.data = b"".join(p.tobytes() for p in parts)
            bt.offsets = offsets.tobytes()
            bt.dtype = wire_dtype
            bt.trailing_shape.extend(trailing)
        start = end
    return msg.SerializeToString()


# ---------------------------------------------------------------- sample response


def _encode_topk(rows: Sequence[Sequence[Sequence[float]] | None], out: Any, what: str) -> None:
    n = len(rows)
    k = max((len(row) for row in rows if row), default=0)
    if n and not k:
        k = 1  # every row is None: one padding column keeps the rows (k=0 would read as None)
    token_ids = np.zeros((n, k), dtype="<i4")
    logprobs = np.full((n, k), TOPK_MASK_LOGPROB, dtype="<f4")
    for i, row in enumerate(rows):
        for j, pair in enumerate(row or ()):
            tok, lp = pair
            if not _INT32_MIN <= int(tok) <= _INT32_MAX:
                raise ValueError(f"{what}[{i}][{j}]: token id {tok} out of int32 range")
            token_ids[i, j] = int(tok)
            logprobs[i, j] = float(lp)
    out.token_ids = token_ids.tobytes()
    out.logprobs = logprobs.tobytes()
    out.k = k
    out.length = n


def _float32_bytes(values: Sequence[float | None], what: str) -> bytes:
    try:
        arr = np.array([math.nan if v is None else v for v in values], dtype="<f4")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: expected a list of numbers (or None): {exc}") from exc
    return arr.reshape(-1).tobytes()


def encode_sample_response(resp: Mapping[str, Any]) -> bytes:
    """Encode a sample result as ``SampleResponse`` bytes.

    ``resp`` is ``{"sequences": [{"stop_reason": "stop"|"length", "tokens": [...],
    "logprobs": [...]|None, "topk_logprobs"?: [[(id, lp), ...]|None, ...]|None,
    "sequence_id"?: ignored}], "prompt_logprobs": [float|None, ...]|None,
    "topk_prompt_logprobs": [[(id, lp), ...]|None, ...]|None,
    "prompt_cache_hit_tokens"?: int, "target_prompt_logprobs"?: tensor dict,
    "prompt_alt_tokens"?: {"tokens": tensor dict, "logprobs": tensor dict}}``.
    ``None`` prompt logprobs (the first prompt position) travel as NaN.
    """
    msg = pb.SampleResponse()
    for i, seq in enumerate(resp.get("sequences") or []):
        s = msg.sequences.add()
        reason = seq.get("stop_reason")
        if reason not in _STOP_REASONS:
            raise ValueError(f"sequences[{i}].stop_reason must be 'stop' or 'length', got {reason!r}")
        s.stop_reason = _STOP_REASONS[reason]
        tokens = np.asarray(list(seq.get("tokens") or []), dtype=np.int64)
        if tokens.size and (tokens.min() < _INT32_MIN or tokens.max() > _INT32_MAX):
            raise ValueError(f"sequences[{i}].tokens: token id out of int32 range")
        s.tokens = tokens.astype("<i4").tobytes()
        if seq.get("logprobs") is not None:
            s.logprobs = _float32_bytes(seq["logprobs"], f"sequences[{i}].logprobs")
        if seq.get("topk_logprobs") is not None:
            _encode_topk(seq["topk_logprobs"], s.topk_sampled_logprobs, f"sequences[{i}].topk_logprobs")
    if resp.get("prompt_logprobs") is not None:
        msg.prompt_logprobs = _float32_bytes(resp["prompt_logprobs"], "prompt_logprobs")
    if resp.get("topk_prompt_logprobs") is not None:
        _encode_topk(resp["topk_prompt_logprobs"], msg.topk_prompt_logprobs, "topk_prompt_logprobs")
    msg.prompt_cache_hit_tokens = int(resp.get("prompt_cache_hit_tokens") or 0)
    if resp.get("target_prompt_logprobs") is not None:
        _encode_tensor(resp["target_prompt_logprobs"], msg.target_prompt_logprobs, "target_prompt_logprobs")
    alt = resp.get("prompt_alt_tokens")
    if alt is not None:
        alt_msg = msg.prompt_alt_tokens
        _encode_tensor(alt["tokens"], alt_msg.tokens, "prompt_alt_tokens.tokens")
        _encode_tensor(alt["logprobs"], alt_msg.logprobs, "prompt_alt_tokens.logprobs")
    return msg.SerializeToString()
