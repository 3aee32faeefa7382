"""The output's rows: the explicit Parquet schema, and tables of scored and error rows.

docs/output-schema.md documents every column.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa

from pipeline.data.states import STATE_COLUMNS, state_columns
from pipeline.storage import redact

if TYPE_CHECKING:  # read/decode workers import this module: they need no torch
    import torch

    from pipeline.method.engine import BatchScores


STEP_TYPE = pa.struct([
    ("step", pa.int32()),
    ("topk_labels", pa.list_(pa.string())),
    ("topk_scores", pa.list_(pa.float32())),
    ("expanded_boxes", pa.list_(pa.list_(pa.float32(), 4))),
])


SCHEMA = pa.schema([
    ("id", pa.string()),
    ("uri", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("label", pa.string()),
    ("score", pa.float32()),
    ("margin", pa.float32()),
    ("topk_labels", pa.list_(pa.string())),
    ("topk_scores", pa.list_(pa.float32())),
    ("clip_label", pa.string()),
    ("cupl_label", pa.string()),
    ("wca_label", pa.string()),
    ("steps", pa.list_(STEP_TYPE)),
    ("run_id", pa.string()),
    ("state_full", pa.binary()),  # k_0 in the run's state dtype (pipeline.data.states); null: not kept
    ("state_steps", pa.binary()),  # p_0..p_S-1, likewise; also null for clip/cupl runs
])


def _leaf_paths(name: str, kind: pa.DataType) -> list[str]:
    """The Parquet column paths of one Arrow field (``steps.list.element.step`` ...)."""
    if pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind):
        return _leaf_paths(f"{name}.list.element", kind.value_type)
    if pa.types.is_struct(kind):
        return [path for field in kind for path in _leaf_paths(f"{name}.{field.name}", field.type)]
    return [name]


def parquet_options() -> dict[str, Any]:
    """pyarrow Parquet writer options for the output's files: the state columns plain and
    uncompressed (float16 bytes neither repeat nor compress: dictionary and snappy would only
    cost time, and reading them back takes twice as long), every other column dictionary
    encoded and snappy compressed, as pyarrow's defaults."""
    leaves = [path for field in SCHEMA for path in _leaf_paths(field.name, field.type)]
    return {"use_dictionary": [path for path in leaves if path not in STATE_COLUMNS],
            "compression": {path: "none" if path in STATE_COLUMNS else "snappy" for path in leaves}}


def error_table(ids: Sequence[str], uris: Sequence[str], errors: Sequence[str],
                widths: Sequence[int], heights: Sequence[int], run_id: str) -> pa.Table:
    """Rows with ``status='error'`` for images that could not be scored. A library's message
    that quotes a secret of the environment keeps it out (:func:`~pipeline.storage.redact`)."""
    count = len(ids)
    columns = {name: pa.nulls(count, SCHEMA.field(name).type) for name in SCHEMA.names}
    columns.update(id=pa.array(list(ids), pa.string()), uri=pa.array(list(uris), pa.string()),
                   status=pa.array(["error"] * count, pa.string()),
                   error=pa.array([redact(error) for error in errors], pa.string()),
                   width=pa.array(list(widths), pa.int32()), height=pa.array(list(heights), pa.int32()),
                   run_id=pa.array([run_id] * count, pa.string()))
    return pa.table(columns, schema=SCHEMA)


def _lists(values: pa.Array, per_row: int, rows: int, kind: pa.DataType) -> pa.Array:
    """``rows`` lists of ``per_row`` consecutive ``values`` each."""
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * per_row)
    return pa.ListArray.from_arrays(offsets, values, type=kind)


def _labels(names: pa.Array, index: torch.Tensor) -> pa.Array:
    """The class names of an index tensor, flattened."""
    return names.take(pa.array(index.reshape(-1).numpy()))


def _argmax_labels(names: pa.Array, scores: torch.Tensor | None, count: int) -> pa.Array:
    if scores is None:
        return pa.nulls(count, pa.string())
    return _labels(names, scores.max(dim=1).indices)  # the first maximum, as argmax; 3x faster on CPUs


def _steps_column(names: pa.Array, scores: BatchScores, top_k: int) -> pa.Array:
    """Per image: for each LGCA step t, top-k labels/scores of S_t and the boxes expanded at t.
    Built as whole columns (a struct per image and step, in image-major order), not row by row."""
    if scores.steps is None:
        return pa.nulls(len(scores.clip), pa.list_(STEP_TYPE))
    step_scores, step_index = scores.steps.topk(top_k, dim=2)  # [T+1, B, k]
    steps, count = scores.steps.shape[0], scores.steps.shape[1]
    entries = steps * count
    grown = scores.states.grown[:steps - 1].permute(1, 0, 2, 3).numpy().astype(np.float32)  # [B, T, K, 4]
    per_step = np.tile(np.r_[0, np.full(steps - 1, grown.shape[2])], count).astype(np.int32)
    boxes = pa.ListArray.from_arrays(
        pa.array(np.r_[0, np.cumsum(per_step)].astype(np.int32)),
        pa.FixedSizeListArray.from_arrays(pa.array(grown.reshape(-1)), 4), type=STEP_TYPE.field("expanded_boxes").type)
    columns = [pa.array(np.tile(np.arange(steps, dtype=np.int32), count)),
               _lists(_labels(names, step_index.transpose(0, 1)), top_k, entries, pa.list_(pa.string())),
               _lists(pa.array(step_scores.transpose(0, 1).reshape(-1).numpy()), top_k, entries,
                      pa.list_(pa.float32())), boxes]
    return _lists(pa.StructArray.from_arrays(columns, fields=list(STEP_TYPE)), steps, count, pa.list_(STEP_TYPE))


def _margins(scores: torch.Tensor) -> pa.Array:
    """Top-1 minus top-2 score of each row of ``scores`` ``[B, C]`` (in its float32 arithmetic,
    as DuckDB's MARGIN_SQL fallback computes it); null where there is only one class."""
    if scores.shape[1] < 2:
        return pa.nulls(scores.shape[0], pa.float32())
    top2 = scores.float().topk(2, dim=1).values
    return pa.array((top2[:, 0] - top2[:, 1]).numpy(), pa.float32())


def scored_table(ids: Sequence[str], uris: Sequence[str], widths: Sequence[int], heights: Sequence[int],
                 scores: BatchScores, names: Sequence[str], method: str, top_k: int,
                 run_id: str, state_dtype: str = "") -> pa.Table:
    """Rows with ``status='ok'`` for a scored batch, label and top-k from ``method``; with a
    ``state_dtype`` (float16, float32) the batch's image states too (:mod:`pipeline.data.states`)."""
    count = len(ids)
    k = min(top_k, len(names))
    labels = pa.array(list(names), pa.string())
    top_scores, top_index = scores.method(method).topk(k, dim=1)
    columns = {
        "id": pa.array(list(ids), pa.string()), "uri": pa.array(list(uris), pa.string()),
        "status": pa.array(["ok"] * count, pa.string()), "error": pa.nulls(count, pa.string()),
        "width": pa.array(list(widths), pa.int32()), "height": pa.array(list(heights), pa.int32()),
        "label": _labels(labels, top_index[:, 0]),
        "score": pa.array(top_scores[:, 0].numpy(), pa.float32()),
        "margin": _margins(scores.method(method)),
        "topk_labels": _lists(_labels(labels, top_index), k, count, pa.list_(pa.string())),
        "topk_scores": _lists(pa.array(top_scores.reshape(-1).numpy()), k, count, pa.list_(pa.float32())),
        "clip_label": _argmax_labels(labels, scores.clip, count),
        "cupl_label": _argmax_labels(labels, scores.cupl, count),
        "wca_label": _argmax_labels(labels, scores.wca, count),
        "steps": _steps_column(labels, scores, k),
        "run_id": pa.array([run_id] * count, pa.string()),
    }
    if state_dtype:
        columns.update(state_columns(scores.states, state_dtype))
    else:
        columns.update({name: pa.nulls(count, pa.binary()) for name in STATE_COLUMNS})
    return pa.table(columns, schema=SCHEMA)


# The stages an error row can name (the text of `error` before the first ':'); docs/output-schema.md
ERROR_STAGES = ("read", "empty file", "missing bytes", "decode", "too large", "tar", "parquet", "score")


def error_reason(message: str | None) -> str:
    """The reason an error row gives: its stage, the text of ``error`` before the first ':'
    (``read``, ``decode``, ``tar`` ...; see docs/output-schema.md)."""
    return (message or "").split(":", 1)[0] or "(no message)"


# error_reason of the `error` column, in DuckDB's SQL
ERROR_REASON_SQL = "coalesce(nullif(split_part(error, ':', 1), ''), '(no message)')"
