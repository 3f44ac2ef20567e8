"""Run a stored custom loss (`create_custom_loss`) on one datum's tensors, with autograd.

`CustomLoss(spec)` checks the graph again against the one list of allowed operations
(`contract/custom_loss_graph.py`; a payload is data from the database, never trusted as code) and rebuilds it: each
`call_function` target is looked up by its allowed qualified name (`torch.exp` is `torch`'s attribute `exp`), each
`call_method` is the `torch.Tensor` method of that name applied to a tensor, and `getattr` reads only the allowed
tensor attributes. Calling it on a datum's target logprobs and inputs walks the nodes in order and returns the
scalar loss and the metrics, whose gradients reach the LoRA weights through the logprobs.

Memory: broadcasting, concatenation and advanced indexing can make a value far larger than the datum (an outer
product of two [T] vectors is [T, T]; a chain of them grows without bound). So each step's output shape is worked
out first on "meta" tensors (shapes only, no memory), and a step whose output would hold more than `MAX_GROWTH`
times the datum's largest input is refused before it runs; a step whose shape depends on the data (boolean masks
select, never grow) is checked on its real result.

Limits: any failure while it runs (shapes that do not broadcast, a value too large, a non-scalar or non-finite loss
or metric) raises; the trainer reports that as the request's own error (`LossError`), so other requests of the tick
are unaffected.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from contract.custom_loss_graph import ALLOWED_ATTRIBUTES, GETATTR, check_custom_loss
from contract.jobs import CustomLossSpec

Metrics = dict[str, float]

MAX_GROWTH = 64
"""How many times the datum's largest input any value of a custom loss may hold (room for [T] -> [T, K], K ≤ 64)."""


def _read_attribute(value: Any, name: str) -> Any:
    if not isinstance(value, torch.Tensor) or name not in ALLOWED_ATTRIBUTES:
        raise TypeError(f"getattr may only read {sorted(ALLOWED_ATTRIBUTES)} of a tensor")
    return getattr(value, name)


def _function(target: str) -> Callable[..., Any]:
    """The allowed function `target` names: walk its dotted path from the top-level module."""
    if target == GETATTR:
        return _read_attribute
    head, *path = target.split(".")
    found: Any = importlib.import_module(head)
    for part in path:
        found = getattr(found, part)
    return found


def _method(name: str) -> Callable[..., Any]:
    method = getattr(torch.Tensor, name)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self, torch.Tensor):
            raise TypeError(f"method {name!r} called on a {type(self).__name__}, not a tensor")
        return method(self, *args, **kwargs)

    return call


_CONSTANTS: dict[str, Callable[[Any], Any]] = {
    "ellipsis": lambda _: Ellipsis,
    "float": float,
    "dtype": lambda name: getattr(torch, name),
    "layout": lambda name: getattr(torch, name),
    "memory_format": lambda name: getattr(torch, name),
}


def _decode(value: Any, env: Mapping[str, Any]) -> Any:
    """An encoded argument (see `loom.types.custom_loss`) as a Python value, node references taken from `env`."""
    if isinstance(value, list):
        return [_decode(item, env) for item in value]
    if not isinstance(value, dict):
        return value
    ((kind, inner),) = value.items()
    if kind == "ref":
        return env[inner]
    if kind == "tuple":
        return tuple(_decode(item, env) for item in inner)
    if kind == "dict":
        return {key: _decode(item, env) for key, item in inner.items()}
    if kind == "slice":
        return slice(*(_decode(item, env) for item in inner))
    return _CONSTANTS[kind](inner)


@dataclass(frozen=True)
class _Step:
    name: str
    call: Callable[..., Any]
    args: list[Any]
    kwargs: dict[str, Any]


class CustomLoss:
    """A stored custom loss, rebuilt from data, callable per datum."""

    def __init__(self, spec: CustomLossSpec) -> None:
        check_custom_loss(spec.inputs, spec.graph)
        self.name = spec.name
        self.input_names = [item.name for item in spec.inputs]
        nodes = spec.graph.nodes
        self.steps = [
            _Step(
                node.name,
                _function(node.target) if node.op == "call_function" else _method(node.target),
                node.args,
                node.kwargs,
            )
            for node in nodes[len(spec.inputs) : -1]
        ]
        self.output = nodes[-1].args[0]

    def __call__(self, logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        """The loss of one datum and its metrics (as floats); raises if it cannot be computed."""
        env: dict[str, Any] = {"logprobs": logprobs}
        env.update({name: inputs[name] for name in self.input_names[1:]})
        limit = MAX_GROWTH * max(_numel(value) for value in env.values())
        for step in self.steps:
            args = _decode(step.args, env)
            kwargs = {key: _decode(value, env) for key, value in step.kwargs.items()}
            try:
                predicted = step.call(*_to_meta(args), **_to_meta(kwargs))
            except Exception:  # a data-dependent shape (or a step that will fail for real anyway)
                predicted = None
            _check_size(step.name, predicted, limit)
            env[step.name] = step.call(*args, **kwargs)
            _check_size(step.name, env[step.name], limit)
        loss, metrics = _decode(self.output, env)
        loss = _finite_scalar(loss, "its loss")
        return loss, {key: float(_finite_scalar(value, f"metric {key!r}").detach()) for key, value in metrics.items()}


def _to_meta(value: Any) -> Any:
    """`value` with every tensor replaced by a meta tensor of its shape and dtype (no memory)."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)([_to_meta(item) for item in value])
    if isinstance(value, dict):
        return {key: _to_meta(item) for key, item in value.items()}
    return value


def _numel(value: Any) -> int:
    """Elements held by the tensors in `value` (nested in lists, tuples and dicts)."""
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum(_numel(item) for item in value)
    if isinstance(value, dict):
        return sum(_numel(item) for item in value.values())
    return 0


def _check_size(name: str, value: Any, limit: int) -> None:
    if _numel(value) > limit:
        raise ValueError(
            f"node {name!r} would hold {_numel(value)} elements, more than {MAX_GROWTH}x the datum's largest input"
        )


def _finite_scalar(value: Any, what: str) -> torch.Tensor:
    if not (isinstance(value, torch.Tensor) and value.ndim == 0 and value.is_floating_point()):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{what} must be a floating-point scalar tensor, got {shape}")
    if not torch.isfinite(value.detach()):
        raise ValueError(f"{what} is not finite ({float(value.detach())})")
    return value


def reduce_metrics(per_datum: list[Metrics]) -> Metrics:
    """A request's metrics: each `:sum` metric summed over its datums, each `:mean` one averaged."""
    totals: Metrics = {}
    for metrics in per_datum:
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value
    return {key: value / len(per_datum) if key.endswith(":mean") else value for key, value in totals.items()}
