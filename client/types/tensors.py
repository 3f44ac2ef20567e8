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
  floats for float32), so the JSON matches what the SDK sends; a value the
  dtype cannot hold (an int64 outside 64 bits, a finite float beyond float32)
  fails validation.
- Every tensor is consistent and bounded when it validates: dimensions are
  non-negative, the dense element count is at most ``MAX_TENSOR_ELEMENTS``
  (for a CSR tensor too, so a few bytes cannot describe a huge dense row), and
  a CSR tensor's row pointers start at 0, never decrease and end at
  ``len(data)``, with every column index inside ``[0, ncols)``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Union

from pydantic import model_validator

from ._base import WireModel
from .bounded import INT64_MIN, Count64
from .limits import INT64_MAX, MAX_TENSOR_ELEMENTS

TensorDtype = Literal["int64", "float32"]
"""The two element types tinker puts on the wire."""

Number = Union[int, float]

FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32."""


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


def _int64_values(values: list[Number]) -> list[Number]:
    out: list[Number] = []
    for v in values:
        if isinstance(v, float):
            if not v.is_integer():
                raise ValueError(f"int64 tensor holds a non-integer value {v!r}")
            v = int(v)
        if not INT64_MIN <= v <= INT64_MAX:
            raise ValueError(f"int64 tensor holds {v}, outside the 64-bit range")
        out.append(int(v))
    return out


def _float32_values(values: list[Number]) -> list[Number]:
    out: list[Number] = []
    for v in values:
        if isinstance(v, int) and abs(v) > FLOAT32_MAX:
            raise ValueError(f"float32 tensor holds {v}, beyond the float32 range")
        f = float(v)
        if math.isfinite(f) and abs(f) > FLOAT32_MAX:
            raise ValueError(f"float32 tensor holds {f!r}, beyond the float32 range")
        out.append(f)
    return out


def _check_csr(t: "TensorData") -> None:
    """A CSR tensor's layout: 2-D shape, row pointers from 0 to len(data) that never decrease, columns in range."""
    crow, col = t.sparse_crow_indices, t.sparse_col_indices
    if crow is None or col is None:
        raise ValueError("sparse_crow_indices and sparse_col_indices must be set together")
    if t.shape is None or len(t.shape) != 2:
        raise ValueError("a sparse CSR tensor needs a 2-D shape")
    nrows, ncols = t.shape
    if len(col) != len(t.data):
        raise ValueError("sparse_col_indices must have one entry per listed value")
    if len(crow) != nrows + 1:
        raise ValueError("sparse_crow_indices must have nrows + 1 entries")
    if crow[0] != 0 or crow[-1] != len(t.data) or any(a > b for a, b in zip(crow, crow[1:])):
        raise ValueError("sparse_crow_indices must start at 0, never decrease and end at len(data)")
    if any(c >= ncols for c in col):
        raise ValueError(f"sparse_col_indices must be in [0, {ncols})")


class TensorData(WireModel):
    """A flat list of numbers with a dtype and an optional shape."""

    data: list[Number]
    """Flattened values (row-major). For CSR tensors: only the listed values."""
    dtype: TensorDtype
    shape: list[Count64] | None = None
    """Dense shape; ``None`` means a 1-D tensor of ``len(data)``."""
    sparse_crow_indices: list[Count64] | None = None
    """CSR row pointers (``nrows + 1`` entries); set together with col indices."""
    sparse_col_indices: list[Count64] | None = None
    """CSR column index of each listed value."""

    @model_validator(mode="after")
    def _normalise(self) -> "TensorData":
        self.data = _int64_values(self.data) if self.dtype == "int64" else _float32_values(self.data)
        if self.shape is not None and math.prod(self.shape) > MAX_TENSOR_ELEMENTS:
            raise ValueError(f"shape {self.shape} holds more than {MAX_TENSOR_ELEMENTS} elements")
        if self.sparse_crow_indices is not None or self.sparse_col_indices is not None:
            _check_csr(self)
        elif self.shape is not None and math.prod(self.shape) != len(self.data):
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
