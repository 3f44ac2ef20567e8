"""Tensors on the wire: :class:`TensorData`.

Role: the JSON form tinker uses for every per-token tensor, in
``Datum.loss_fn_inputs`` and ``ForwardBackwardOutput.loss_fn_outputs``::

    {"data": [flat values...], "dtype": "int64" | "float32", "shape": [d0, d1, ...]}

plus, optionally, a CSR sparse form (``sparse_crow_indices`` /
``sparse_col_indices``; ``shape`` is then required and ``data`` holds only the
listed values).

Limits:
- Only ``int64`` and ``float32`` exist on the wire (tinker widens bf16 to f32).
- No numpy/torch import here. ``from_array`` duck-types anything with
  ``.tolist()``, ``.shape`` and ``.dtype`` (numpy arrays, torch tensors); use
  ``to_numpy``/``to_torch`` only where those libraries are installed (imported
  lazily).
- Values are normalised to the declared dtype on validation (ints for int64,
  floats for float32), so the JSON matches what the SDK sends.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Union

from pydantic import model_validator

from ._base import WireModel

TensorDtype = Literal["int64", "float32"]
"""The two element types tinker puts on the wire."""

Number = Union[int, float]


def _flatten(values: Any) -> tuple[list[Any], list[int]]:
    """Flatten a rectangular nested list; return (flat values, shape)."""
    if not isinstance(values, (list, tuple)):
        return [values], []
    if len(values) == 0:
        return [], [0]
    if not isinstance(values[0], (list, tuple)):
        for v in values:
            if isinstance(v, (list, tuple)):
                raise ValueError("ragged nested list: not a rectangular array")
        return list(values), [len(values)]
    flat: list[Any] = []
    inner_shape: list[int] | None = None
    for row in values:
        if not isinstance(row, (list, tuple)):
            raise ValueError("ragged nested list: not a rectangular array")
        row_flat, row_shape = _flatten(row)
        if inner_shape is None:
            inner_shape = row_shape
        elif row_shape != inner_shape:
            raise ValueError("ragged nested list: not a rectangular array")
        flat.extend(row_flat)
    return flat, [len(values)] + (inner_shape or [])


def _reshape(flat: list[Any], shape: list[int]) -> Any:
    if len(shape) <= 1:
        return list(flat)
    step = math.prod(shape[1:])
    return [_reshape(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def _infer_dtype(flat: list[Any]) -> TensorDtype:
    return "float32" if any(isinstance(v, float) for v in flat) else "int64"


class TensorData(WireModel):
    """A flat list of numbers with a dtype and an optional shape."""

    data: list[Number]
    """Flattened values (row-major). For CSR tensors: only the listed values."""
    dtype: TensorDtype
    shape: list[int] | None = None
    """Dense shape; ``None`` means a 1-D tensor of ``len(data)``."""
    sparse_crow_indices: list[int] | None = None
    """CSR row pointers (``nrows + 1`` entries); set together with col indices."""
    sparse_col_indices: list[int] | None = None
    """CSR column index of each listed value."""

    @model_validator(mode="after")
    def _normalise(self) -> "TensorData":
        if self.dtype == "int64":
            out: list[Number] = []
            for v in self.data:
                if isinstance(v, bool):
                    v = int(v)
                if isinstance(v, float):
                    if not v.is_integer():
                        raise ValueError(f"int64 tensor holds a non-integer value {v!r}")
                    v = int(v)
                out.append(v)
            self.data = out
        else:
            self.data = [float(v) for v in self.data]
        sparse = self.sparse_crow_indices is not None or self.sparse_col_indices is not None
        if sparse:
            if self.sparse_crow_indices is None or self.sparse_col_indices is None:
                raise ValueError("sparse_crow_indices and sparse_col_indices must be set together")
            if self.shape is None or len(self.shape) != 2:
                raise ValueError("a sparse CSR tensor needs a 2-D shape")
            if len(self.sparse_col_indices) != len(self.data):
                raise ValueError("sparse_col_indices must have one entry per listed value")
            if len(self.sparse_crow_indices) != self.shape[0] + 1:
                raise ValueError("sparse_crow_indices must have nrows + 1 entries")
        elif self.shape is not None:
            if any(d < 0 for d in self.shape):
                raise ValueError(f"negative dimension in shape {self.shape}")
            if math.prod(self.shape) != len(self.data):
                raise ValueError(f"shape {self.shape} holds {math.prod(self.shape)} values, data has {len(self.data)}")
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def is_sparse(self) -> bool:
        return self.sparse_crow_indices is not None

    @property
    def dense_shape(self) -> list[int]:
        """The shape, with ``None`` resolved to ``[len(data)]``."""
        return list(self.shape) if self.shape is not None else [len(self.data)]

    @property
    def numel(self) -> int:
        return math.prod(self.dense_shape)

    def dense_data(self, pad_value: Number = 0) -> list[Number]:
        """Flat row-major values, densifying a CSR tensor with ``pad_value``."""
        if not self.is_sparse:
            return list(self.data)
        assert self.shape is not None and self.sparse_crow_indices is not None
        assert self.sparse_col_indices is not None
        nrows, ncols = self.shape
        pad: Number = int(pad_value) if self.dtype == "int64" else float(pad_value)
        out: list[Number] = [pad] * (nrows * ncols)
        crow = self.sparse_crow_indices
        for r in range(nrows):
            for k in range(crow[r], crow[r + 1]):
                out[r * ncols + self.sparse_col_indices[k]] = self.data[k]
        return out

    def tolist(self, pad_value: Number = 0) -> Any:
        """Nested Python list with the tensor's shape (dense)."""
        return _reshape(self.dense_data(pad_value), self.dense_shape)

    @classmethod
    def from_list(cls, values: Any, dtype: TensorDtype | None = None) -> "TensorData":
        """Build from a (possibly nested, rectangular) list of numbers.

        ``dtype`` defaults to ``float32`` if any value is a float, else ``int64``.
        """
        flat, shape = _flatten(values)
        return cls(data=flat, dtype=dtype or _infer_dtype(flat), shape=shape)

    @classmethod
    def from_array(cls, array: Any, dtype: TensorDtype | None = None) -> "TensorData":
        """Build from a numpy array or torch tensor (duck-typed, no import)."""
        if dtype is None:
            kind = getattr(getattr(array, "dtype", None), "kind", None)  # numpy
            is_float = getattr(getattr(array, "dtype", None), "is_floating_point", None)  # torch
            if kind is not None:
                dtype = "float32" if kind == "f" else "int64"
            elif is_float is not None:
                dtype = "float32" if is_float else "int64"
        if hasattr(array, "detach"):
            array = array.detach().cpu()
            if dtype == "float32" and str(array.dtype) == "torch.bfloat16":
                array = array.float()
        nested = array.tolist()
        flat, shape = _flatten(nested)
        shape = [int(d) for d in getattr(array, "shape", shape)]
        return cls(data=flat, dtype=dtype or _infer_dtype(flat), shape=shape)

    from_numpy = from_array
    from_torch = from_array

    def to_numpy(self, pad_value: Number = 0) -> Any:
        """Dense numpy array (imports numpy lazily)."""
        import numpy as np

        np_dtype = np.int64 if self.dtype == "int64" else np.float32
        return np.asarray(self.dense_data(pad_value), dtype=np_dtype).reshape(self.dense_shape)

    def to_torch(self, pad_value: Number = 0) -> Any:
        """Dense torch tensor (imports torch lazily)."""
        import torch

        t_dtype = torch.int64 if self.dtype == "int64" else torch.float32
        return torch.tensor(self.dense_data(pad_value), dtype=t_dtype).reshape(self.dense_shape)


def coerce_tensor(value: Any, dtype: TensorDtype | None = None) -> Any:
    """Turn lists / numpy arrays / torch tensors into :class:`TensorData`.

    Dicts and ``TensorData`` pass through untouched (pydantic validates them).
    """
    if isinstance(value, (TensorData, dict)):
        return value
    if isinstance(value, (list, tuple)):
        return TensorData.from_list(list(value), dtype=dtype)
    if hasattr(value, "tolist") and hasattr(value, "shape"):
        return TensorData.from_array(value, dtype=dtype)
    return value
