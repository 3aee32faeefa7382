"""State columns: whole columns of bytes, read back in place, with bad rows named."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.data.states import StateSpec, as_float32, binary_rows, decode_column, state_columns, steps_for
from pipeline.method.engine import ImageStates

SPEC = StateSpec("float16", dim=3, steps=2)


def test_rows_of_values_become_one_binary_value_each_in_little_endian_order():
    values = np.array([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]], np.float32)
    column = binary_rows(values, "float16")
    assert column.type == pa.binary() and len(column) == 2 and column.null_count == 0
    assert column[1].as_py() == np.array([3.0, 0.25, -1.0], "<f2").tobytes()
    assert column[0].as_py() == b"\x00\x3c\x00\xc0\x00\x38"  # 1.0, -2.0, 0.5 as IEEE half, little-endian


def test_state_columns_hold_k0_and_the_pooled_vectors_in_step_order():
    full = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    pooled = torch.arange(12, dtype=torch.float32).reshape(2, 2, 3)  # [S, B, D]
    columns = state_columns(ImageStates(full=full, pooled=pooled), "float32")
    back = decode_column(columns["state_steps"], 6, "float32")
    np.testing.assert_array_equal(back.values, [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]])  # image 0: p_0, p_1
    clip_only = state_columns(ImageStates(full=full), "float16")
    assert clip_only["state_steps"].null_count == 2 and clip_only["state_full"].null_count == 0


def test_decoding_names_null_rows_and_rows_of_another_length():
    good = np.array([1.0, 2.0, 3.0], "<f2").tobytes()
    column = pa.array([good, None, good[:4], good.replace(b"\x00", b"\x00"), b""], pa.binary())
    decoded = decode_column(column, 3, "float16")
    assert decoded.rows.tolist() == [0, 3] and decoded.missing.tolist() == [1] and decoded.wrong.tolist() == [2, 4]
    np.testing.assert_array_equal(decoded.values, [[1, 2, 3], [1, 2, 3]])
    assert decoded.values.dtype == np.float16


@pytest.mark.parametrize("kind", [pa.binary(), pa.large_binary()])
def test_decoding_reads_slices_chunks_and_large_offsets(kind):
    rows = [np.array([i, i + 0.5, -i], "<f2").tobytes() for i in range(6)]
    column = pa.chunked_array([pa.array(rows[:2], kind), pa.array(rows[2:], kind).slice(1)])
    decoded = decode_column(column, 3, "float16")
    np.testing.assert_array_equal(decoded.values[:, 0], [0, 1, 3, 4, 5])
    assert decoded.rows.tolist() == [0, 1, 2, 3, 4]
    assert decode_column(pa.nulls(3), 3, "float16").missing.tolist() == [0, 1, 2]


def test_float16_values_become_float32_tensors():
    values = np.array([[0.1, -0.2]], "<f2")
    tensor = as_float32(values)
    assert tensor.dtype == torch.float32 and tensor.tolist() == values.astype(np.float32).tolist()


def test_the_stored_steps_follow_the_method():
    assert [steps_for(m, 3) for m in ("lgca", "wca", "clip", "cupl")] == [4, 1, 0, 0]
    assert SPEC.row_bytes("state_steps") == 2 * 3 * 2 and SPEC.values("state_full") == 3
