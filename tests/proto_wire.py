"""forward_backward protobuf bodies written by the official tinker SDK's own encoder.

Tests describe requests as plain dicts in the JSON wire shape (what
``api.proto.codec.decode_forward_backward_request`` returns). ``sdk_request``
turns such a dict into the SDK's request types and ``sdk_bytes`` encodes one
with ``tinker.proto.request_conv``, so the bytes are exactly what a real client
sends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.types.forward_backward_input import ForwardBackwardInput
from tinker.types.forward_backward_request import ForwardBackwardRequest

_SPANS = {"prompt_tokens": types.PromptProvenanceSpan, "sampled_tokens": types.SampledProvenanceSpan}


def _spans(spans: Sequence[Mapping[str, Any]] | None) -> list[Any] | None:
    if spans is None:
        return None
    return [
        _SPANS[s["type"]](sequence_id=s["sequence_id"], offset=s.get("offset", 0), length=s["length"]) for s in spans
    ]


def _datum(datum: Mapping[str, Any]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.model_validate(datum["model_input"]),
        loss_fn_inputs={name: types.TensorData(**td) for name, td in datum.get("loss_fn_inputs", {}).items()},
        model_input_spans=_spans(datum.get("model_input_spans")),
        loss_fn_input_spans=_spans(datum.get("loss_fn_input_spans")),
    )


def sdk_request(body: Mapping[str, Any]) -> ForwardBackwardRequest:
    """The SDK's request object for a JSON-shaped ``/forward_backward`` body."""
    fbi = body["forward_backward_input"]
    return ForwardBackwardRequest(
        forward_backward_input=ForwardBackwardInput(
            data=[_datum(d) for d in fbi["data"]],
            loss_fn=fbi["loss_fn"],
            loss_fn_config=fbi.get("loss_fn_config"),
        ),
        model_id=body["model_id"],
        seq_id=body.get("seq_id"),
    )


def sdk_bytes(req: ForwardBackwardRequest, forward_only: bool = False) -> bytes:
    """The protobuf body the SDK's HTTP client posts for ``req``."""
    msg = forward_backward_request_to_proto(req)
    msg.forward_only = forward_only  # what AsyncTrainingResource.forward_backward does
    return msg.SerializeToString()
