"""What a server-side custom loss may be: the one list of allowed operations, and the check a graph must pass.

A custom loss arrives as data (`loom.types.CustomLossGraph`, torch.fx's nodes as JSON) and stays data: the API
checks it here when it is created (`check_custom_loss`), and the worker rebuilds it from the same lists
(`worker/custom_loss.py`), resolving only the names allowed below. No code, pickle or import path from the client
is ever executed: a function is called only if its qualified name is in `ALLOWED_FUNCTIONS`, a method only if it is
a `torch.Tensor` method named in `ALLOWED_METHODS` and called on a tensor, and `getattr` reads only the attributes
in `ALLOWED_ATTRIBUTES`. Graphs are bounded: `MAX_CUSTOM_LOSS_NODES` nodes, and each node's arguments at most
`MAX_ARGUMENT_VALUES` encoded values nested at most `MAX_ARGUMENT_DEPTH` deep. No allowed operation takes a size
to create a tensor from; values that outgrow the datum through broadcasting or concatenation are stopped by the
worker as the graph runs (`worker/custom_loss.py`, `MAX_GROWTH`).

Limits: the lists are what per-token RL/SL losses need (elementwise math, reductions, comparisons, masking,
indexing, softmax-family functions); in-place operations, tensor factories that take sizes, `torch.nn` modules,
captured tensors (`get_attr`), devices and anything that leaves torch (`item`, `tolist`, `numpy`) are refused. A
graph that passes may still fail when it runs (shapes that do not broadcast, a non-scalar loss): that fails its
request as a user error, never the worker.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from loom.types import CustomLossGraph, CustomLossInput, CustomLossNode
from loom.types.limits import INT64_MAX, MAX_CUSTOM_LOSS_INPUTS, MAX_CUSTOM_LOSS_NODES

_OPERATORS = ("add sub mul truediv floordiv mod pow neg pos abs lt le gt ge eq ne and_ or_ xor invert getitem").split()
_TORCH = (
    "exp log log1p expm1 sqrt rsqrt square abs neg sign sigmoid tanh relu clamp clip minimum maximum where add sub "
    "mul div pow lt le gt ge eq ne logical_and logical_or logical_not isfinite nan_to_num detach ones_like "
    "zeros_like full_like sum mean amax amin max min logsumexp cumsum count_nonzero var std softmax log_softmax "
    "stack cat gather flatten squeeze unsqueeze reshape"
).split()
_FUNCTIONAL = "logsigmoid softplus relu softmax log_softmax mse_loss smooth_l1_loss".split()

GETATTR = "getattr"
"""How the SDK names Python's `getattr` (torch.fx records `tensor.shape` as a call to it)."""

ALLOWED_FUNCTIONS: frozenset[str] = frozenset(
    [f"operator.{name}" for name in _OPERATORS]
    + [f"torch.{name}" for name in _TORCH]
    + [f"torch.nn.functional.{name}" for name in _FUNCTIONAL]
    # The C functions behind torch.nn.functional.logsigmoid / softplus, as torch.fx names them.
    + ["torch._C._nn.log_sigmoid", "torch._C._nn.softplus", GETATTR]
)
"""Qualified names a `call_function` node may call."""

ALLOWED_METHODS: frozenset[str] = frozenset(
    (
        "sum mean exp log log1p expm1 sqrt rsqrt square abs neg sign sigmoid tanh relu clamp clip clamp_min "
        "clamp_max minimum maximum pow add sub mul div lt le gt ge eq ne logical_and logical_or logical_not "
        "isfinite nan_to_num where masked_fill detach float double bool long type_as clone contiguous max min amax "
        "amin logsumexp softmax log_softmax cumsum count_nonzero var std gather reshape view flatten squeeze "
        "unsqueeze t transpose size dim numel"
    ).split()
)
"""`torch.Tensor` methods a `call_method` node may call (none in place)."""

ALLOWED_ATTRIBUTES = frozenset({"shape", "ndim", "dtype"})
"""Attributes `getattr` may read, and only from a tensor."""

ALLOWED_DTYPES = frozenset({"float32", "float64", "float16", "bfloat16", "int64", "int32", "bool"})
ALLOWED_LAYOUTS = frozenset({"strided"})
ALLOWED_MEMORY_FORMATS = frozenset({"contiguous_format", "preserve_format"})
NON_FINITE_FLOATS = frozenset({"inf", "-inf", "nan"})

MAX_ARGUMENT_VALUES = 4096
"""The most encoded values (scalars, references, containers) one node's arguments may hold."""
MAX_ARGUMENT_DEPTH = 8
"""How deeply one node's arguments may nest containers."""
MAX_STRING_LENGTH = 64

METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
"""A metric's name: `custom/<name>:sum` or `custom/<name>:mean`, the suffix saying how it combines over datums."""
INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class InvalidCustomLoss(ValueError):
    """A custom loss the server refuses; `param` names the offending field of the request."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_custom_loss(inputs: list[CustomLossInput], graph: CustomLossGraph) -> None:
    """Raise `InvalidCustomLoss` unless `graph` is a loss of `inputs` built only from allowed operations."""
    _check_inputs(inputs)
    nodes = graph.nodes
    if not 1 <= len(nodes) <= MAX_CUSTOM_LOSS_NODES:
        raise InvalidCustomLoss(f"a graph has 1 to {MAX_CUSTOM_LOSS_NODES} nodes, not {len(nodes)}", "graph.nodes")
    defined: set[str] = set()
    for i, node in enumerate(nodes):
        where = f"graph.nodes.{i}"
        if not NODE_NAME.fullmatch(node.name) or node.name in defined:
            raise InvalidCustomLoss(f"node name {node.name!r} is not a fresh identifier", f"{where}.name")
        if i < len(inputs):
            _check_placeholder(node, inputs[i], where)
        elif i == len(nodes) - 1:
            _check_output(node, defined, where)
        else:
            _check_call(node, defined, where)
        defined.add(node.name)
    if len(nodes) <= len(inputs):
        raise InvalidCustomLoss("the graph ends before its output node", "graph.nodes")


def _check_inputs(inputs: list[CustomLossInput]) -> None:
    if not 1 <= len(inputs) <= MAX_CUSTOM_LOSS_INPUTS:
        raise InvalidCustomLoss(f"a custom loss takes 1 to {MAX_CUSTOM_LOSS_INPUTS} inputs", "inputs")
    if inputs[0].name != "logprobs" or inputs[0].rank == 0:
        raise InvalidCustomLoss("the first input is logprobs, of rank 1 ([T]) or 2 ([T, K])", "inputs.0")
    names = [item.name for item in inputs]
    for i, name in enumerate(names):
        if not INPUT_NAME.fullmatch(name) or name in names[:i]:
            raise InvalidCustomLoss(f"input {name!r} is not a fresh lowercase identifier", f"inputs.{i}.name")


def _check_placeholder(node: CustomLossNode, expected: CustomLossInput, where: str) -> None:
    if node.op != "placeholder" or node.target != expected.name or node.args or node.kwargs:
        raise InvalidCustomLoss(
            f"node {node.name!r} must be the placeholder of input {expected.name!r} (inputs come first, in order)",
            where,
        )


def _check_call(node: CustomLossNode, defined: set[str], where: str) -> None:
    if node.op == "call_function":
        if node.target not in ALLOWED_FUNCTIONS:
            raise InvalidCustomLoss(f"function {node.target!r} is not allowed in a custom loss", f"{where}.target")
        if node.target == GETATTR:
            _check_getattr(node, defined, where)
    elif node.op == "call_method":
        if node.target not in ALLOWED_METHODS:
            raise InvalidCustomLoss(f"method {node.target!r} is not allowed in a custom loss", f"{where}.target")
        if not node.args or not _is_ref(node.args[0]):
            raise InvalidCustomLoss(f"method {node.target!r} must be called on a node", f"{where}.args")
    else:
        raise InvalidCustomLoss(
            f"{node.op} nodes are not allowed: a custom loss calls functions and tensor methods only", f"{where}.op"
        )
    budget = [MAX_ARGUMENT_VALUES]
    for k, value in enumerate(node.args):
        _check_value(value, defined, 0, budget, f"{where}.args.{k}")
    for key, value in node.kwargs.items():
        _check_string(key, f"{where}.kwargs")
        _check_value(value, defined, 0, budget, f"{where}.kwargs.{key}")


def _check_getattr(node: CustomLossNode, defined: set[str], where: str) -> None:
    args = node.args
    if len(args) != 2 or node.kwargs or not _is_ref(args[0]) or args[1] not in ALLOWED_ATTRIBUTES:
        raise InvalidCustomLoss(f"getattr may only read {sorted(ALLOWED_ATTRIBUTES)} of a node", f"{where}.args")


def _check_output(node: CustomLossNode, defined: set[str], where: str) -> None:
    if node.op != "output" or len(node.args) != 1 or node.kwargs:
        raise InvalidCustomLoss("the last node must be the output, returning (loss, metrics)", where)
    pair = node.args[0]
    items = pair.get("tuple") if isinstance(pair, dict) and len(pair) == 1 else pair
    if not (isinstance(items, list) and len(items) == 2):
        raise InvalidCustomLoss("the loss must return (loss, metrics)", f"{where}.args")
    loss, metrics = items
    if not _is_ref(loss) or loss["ref"] not in defined:
        raise InvalidCustomLoss("the returned loss must be a tensor computed by the graph", f"{where}.args")
    table = metrics.get("dict") if isinstance(metrics, dict) and len(metrics) == 1 else None
    if not isinstance(table, dict):
        raise InvalidCustomLoss("the returned metrics must be a dict", f"{where}.args")
    for key, value in table.items():
        if not METRIC_KEY.fullmatch(key):
            raise InvalidCustomLoss(
                f"metric {key!r} must be named custom/<name>:sum or custom/<name>:mean in lowercase", f"{where}.args"
            )
        if not _is_ref(value) or value["ref"] not in defined:
            raise InvalidCustomLoss(f"metric {key!r} must be a tensor computed by the graph", f"{where}.args")


def _is_ref(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"ref"} and isinstance(value["ref"], str)


def _check_string(value: str, where: str) -> None:
    if len(value) > MAX_STRING_LENGTH:
        raise InvalidCustomLoss(f"strings in a graph are at most {MAX_STRING_LENGTH} characters", where)


def _check_value(value: Any, defined: set[str], depth: int, budget: list[int], where: str) -> None:
    """One encoded argument (see `loom.types.custom_loss`), counted against `budget` (one shared counter)."""
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_ARGUMENT_DEPTH:
        raise InvalidCustomLoss(
            f"a node's arguments hold at most {MAX_ARGUMENT_VALUES} values nested {MAX_ARGUMENT_DEPTH} deep", where
        )
    if value is None or isinstance(value, (bool, float)):
        return
    if isinstance(value, int):
        if abs(value) > INT64_MAX:
            raise InvalidCustomLoss("integers in a graph are 64-bit", where)
        return
    if isinstance(value, str):
        _check_string(value, where)
        return
    if isinstance(value, list):
        _check_values(value, defined, depth, budget, where)
        return
    if not (isinstance(value, dict) and len(value) == 1):
        raise InvalidCustomLoss("an encoded argument is a scalar, a string, a list or a one-key object", where)
    ((kind, inner),) = value.items()
    if kind == "ref":
        if inner not in defined:
            raise InvalidCustomLoss(f"reference to {inner!r}, which no earlier node defines", where)
    elif kind == "tuple" and isinstance(inner, list):
        _check_values(inner, defined, depth, budget, where)
    elif kind == "dict" and isinstance(inner, dict):
        for key in inner:
            _check_string(key, where)
        _check_values(inner.values(), defined, depth, budget, where)
    elif kind == "slice" and isinstance(inner, list) and len(inner) == 3:
        for part in inner:
            if not (part is None or (isinstance(part, int) and not isinstance(part, bool)) or _is_ref(part)):
                raise InvalidCustomLoss("slice bounds are integers, nodes or null", where)
        _check_values(inner, defined, depth, budget, where)
    elif not _is_constant(kind, inner):
        raise InvalidCustomLoss(f"argument {value!r} is not allowed in a custom loss", where)


def _check_values(values: Iterable[Any], defined: set[str], depth: int, budget: list[int], where: str) -> None:
    for k, item in enumerate(values):
        _check_value(item, defined, depth + 1, budget, f"{where}.{k}")


def _is_constant(kind: str, inner: Any) -> bool:
    """An allowed non-JSON constant: `{"ellipsis": true}`, a non-finite float, a dtype, layout or memory format.
    Devices are never allowed: a loss runs wherever its worker puts it."""
    allowed = {
        "ellipsis": {True},
        "float": NON_FINITE_FLOATS,
        "dtype": ALLOWED_DTYPES,
        "layout": ALLOWED_LAYOUTS,
        "memory_format": ALLOWED_MEMORY_FORMATS,
    }.get(kind, frozenset())
    return isinstance(inner, (str, bool)) and inner in allowed
