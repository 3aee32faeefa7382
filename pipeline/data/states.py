"""Image states in an output: the two binary columns of ``lgca label``'s rows, and reading them back.

``state_full`` holds ``k_0`` (D little-endian values) and ``state_steps`` ``p_0 .. p_{S-1}``
(S*D values: S = T+1 for lgca runs, 1 for wca runs; null for clip/cupl runs), in the run's
state dtype (float16 or float32), as :class:`~pipeline.method.engine.ImageStates` holds them.
Binary columns keep every Parquet reader (DuckDB included) happy and decode with
``numpy.frombuffer``; whole columns are built and read as one buffer, never row by row.
The output's manifest records the :class:`StateSpec` (docs/output-schema.md).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # read/decode workers import this module (through rows): they need no torch
    import torch

    from pipeline.method.engine import ImageStates

STATE_COLUMNS = ("state_full", "state_steps")
STATE_DTYPES = {"float16": "<f2", "float32": "<f4"}


@dataclass(frozen=True)
class StateSpec:
    """What an output's states hold: ``dtype`` (float16/float32), ``dim`` (D) and ``steps``
    (S, the pooled vectors per image: T+1 for lgca, 1 for wca, 0 for clip/cupl)."""

    dtype: str
    dim: int
    steps: int

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> StateSpec:
        return cls(dtype=str(value["dtype"]), dim=int(value["dim"]), steps=int(value["steps"]))

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "dim": self.dim, "steps": self.steps}

    def values(self, column: str) -> int:
        """Values per row of ``column``: D for ``state_full``, S*D for ``state_steps``."""
        return self.dim if column == "state_full" else self.steps * self.dim

    def row_bytes(self, column: str) -> int:
        return self.values(column) * np.dtype(STATE_DTYPES[self.dtype]).itemsize


def steps_for(method: str, steps: int) -> int:
    """S, the pooled vectors a run of ``method`` with T = ``steps`` stores per image."""
    return {"lgca": steps + 1, "wca": 1}.get(method, 0)


def binary_rows(values: np.ndarray, dtype: str) -> pa.Array:
    """``values`` ``[B, n]`` as B binary values of n ``dtype`` numbers each (one buffer, no copy per row)."""
    data = np.ascontiguousarray(values, dtype=STATE_DTYPES[dtype])
    width = data.shape[1] * data.itemsize
    offsets = np.arange(len(data) + 1, dtype=np.int32) * width
    return pa.BinaryArray.from_buffers(pa.binary(), len(data), [None, pa.py_buffer(offsets),
                                                                 pa.py_buffer(data.reshape(-1).view(np.uint8))])


def state_columns(states: ImageStates, dtype: str) -> dict[str, pa.Array]:
    """The ``state_full`` and ``state_steps`` columns of B images' states (on the CPU)."""
    count = len(states.full)
    steps = (pa.nulls(count, pa.binary()) if states.pooled is None else
             binary_rows(states.pooled.permute(1, 0, 2).reshape(count, -1).numpy(), dtype))
    return {"state_full": binary_rows(states.full.numpy(), dtype), "state_steps": steps}


@dataclass(frozen=True)
class DecodedColumn:
    """A state column read back: ``values`` ``[n, m]`` (the stored dtype, read-only) of the
    rows ``rows`` (indices into the column) that hold a value of the right length; ``wrong``
    lists the rows whose value has another length, ``missing`` the null rows."""

    values: np.ndarray
    rows: np.ndarray
    wrong: np.ndarray
    missing: np.ndarray


def decode_column(column: pa.Array | pa.ChunkedArray, values: int, dtype: str) -> DecodedColumn:
    """Decode a binary column of ``values`` numbers of ``dtype`` a row (see :class:`DecodedColumn`).
    The values of the good rows are read in place when they lie back to back (as written), else
    gathered."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.type == pa.null():
        column = pa.nulls(len(column), pa.binary())
    kind = np.dtype(STATE_DTYPES[dtype])
    width = values * kind.itemsize
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    if len(column) == 0 or not valid.any():
        return DecodedColumn(np.zeros((0, values), kind), np.zeros(0, np.int64), np.zeros(0, np.int64),
                             np.flatnonzero(~valid))
    wide = pa.types.is_large_binary(column.type)  # Ray widens a file's column past 2 GiB of bytes
    offsets = np.frombuffer(column.buffers()[1], np.int64 if wide else np.int32)[
        column.offset:column.offset + len(column) + 1]
    good = valid & (np.diff(offsets) == width)
    rows = np.flatnonzero(good)
    data = np.frombuffer(column.buffers()[2], np.uint8) if column.buffers()[2] is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1][rows].astype(np.int64)
    if not len(rows) or starts[-1] - starts[0] == (len(rows) - 1) * width:
        raw = data[starts[0] if len(rows) else 0:][:len(rows) * width]
    else:
        raw = data[(starts[:, None] + np.arange(width)).reshape(-1)]
    return DecodedColumn(raw.view(kind).reshape(len(rows), values), rows, np.flatnonzero(valid & ~good),
                         np.flatnonzero(~valid))


def as_float32(values: np.ndarray) -> torch.Tensor:
    """A float32 tensor of stored values (float16 is converted by torch: numpy's conversion is
    several times slower). The tensor is only read: float32 values are used in place."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(values)
    return tensor.float() if tensor.dtype != torch.float32 else tensor
