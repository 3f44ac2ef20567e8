"""Server-side custom loss wire types: ``POST /api/v1/create_custom_loss`` (SDK 0.38).

Role: a loss the SDK traced with ``torch.fx`` (``ServiceClient.create_custom_loss``) travels as plain data, node for
node: :class:`CustomLossGraph`. It is stored per session and named afterwards in ``forward_backward`` with
``loss_fn="custom"`` and ``loss_fn_config={"loss_id": ...}``. The answer is a future whose result is a
:class:`CreateCustomLossResponse`.

Encoded arguments (``CustomLossNode.args`` / ``kwargs``): JSON scalars and strings stand for themselves and lists
for lists; anything else is a one-key object: ``{"ref": name}`` (an earlier node), ``{"tuple": [...]}``,
``{"dict": {...}}``, ``{"slice": [start, stop, step]}``, ``{"ellipsis": true}``, ``{"float": "inf"|"-inf"|"nan"}``,
``{"dtype": "float32"}``, ``{"device": "cpu"}``, ``{"layout": "strided"}`` or ``{"memory_format": ...}``.

Limits: these types only check the shape of the JSON; which operations a graph may use, and how large it may be,
is decided by the server (``contract/custom_loss_graph.py``). Nothing here is ever executed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ._base import WireModel
from .bounded import Count64

CustomLossInputRank = Literal[0, 1, 2]
"""A custom loss input's rank: 0 is a scalar, 1 is ``[T]`` and 2 is ``[T, K]``."""

CustomLossNodeOp = Literal["placeholder", "get_attr", "call_function", "call_method", "call_module", "output"]


class CustomLossInput(WireModel):
    """One input of a custom loss: ``logprobs`` (first) or a ``loss_fn_inputs`` key, with its rank."""

    name: str
    rank: CustomLossInputRank


class CustomLossNode(WireModel):
    """One node of a traced loss, as torch.fx records it."""

    op: CustomLossNodeOp
    name: str
    target: str
    """Placeholder: the parameter; call_function: the qualified name (``torch.exp``, ``operator.mul``);
    call_method: the method; output: ``output``."""
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class CustomLossGraph(WireModel):
    """A traced custom loss as data: its nodes in execution order."""

    format: Literal[1] = 1
    nodes: list[CustomLossNode]


class CreateCustomLossRequest(WireModel):
    session_id: str
    custom_loss_seq_id: Count64
    name: str = Field(min_length=1, max_length=256)
    inputs: list[CustomLossInput]
    """``logprobs`` first, then the ``loss_fn_inputs`` keys the loss reads, in the order it takes them."""
    graph: CustomLossGraph
    type: Literal["create_custom_loss"] = "create_custom_loss"


class CreateCustomLossResponse(WireModel):
    loss_id: str
    """Names the stored loss in ``forward_backward`` requests of the same session."""
    type: Literal["create_custom_loss"] = "create_custom_loss"
