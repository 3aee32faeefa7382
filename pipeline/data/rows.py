"""The output's rows: the explicit Parquet schema, and tables of scored and error rows.

docs/output-schema.md documents every column.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa

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
])


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


def _labels(names: Sequence[str], index: torch.Tensor) -> list:
    """Class names for an index tensor of any shape, as nested lists."""
    return np.asarray(names, dtype=object)[index.numpy()].tolist()


def _argmax_labels(names: Sequence[str], scores: torch.Tensor | None, count: int) -> pa.Array:
    if scores is None:
        return pa.nulls(count, pa.string())
    return pa.array(_labels(names, scores.argmax(dim=1)), pa.string())


def _steps_column(names: Sequence[str], scores: BatchScores, top_k: int) -> pa.Array:
    """Per image: for each LGCA step t, top-k labels/scores of S_t and the boxes expanded at t."""
    if scores.steps is None:
        return pa.nulls(len(scores.clip), pa.list_(STEP_TYPE))
    step_scores, step_index = scores.steps.topk(top_k, dim=2)  # [T+1, B, k]
    expanded = [None] + [scores.expanded_boxes(t).tolist() for t in range(1, scores.steps.shape[0])]
    rows = []
    for b in range(scores.steps.shape[1]):
        steps = []
        for t in range(scores.steps.shape[0]):
            boxes = expanded[t][b] if t > 0 else []
            steps.append({"step": t, "topk_labels": _labels(names, step_index[t, b]),
                          "topk_scores": step_scores[t, b].tolist(), "expanded_boxes": boxes})
        rows.append(steps)
    return pa.array(rows, pa.list_(STEP_TYPE))


def _margins(scores: torch.Tensor) -> pa.Array:
    """Top-1 minus top-2 score of each row of ``scores`` ``[B, C]`` (in its float32 arithmetic,
    as DuckDB's MARGIN_SQL fallback computes it); null where there is only one class."""
    if scores.shape[1] < 2:
        return pa.nulls(scores.shape[0], pa.float32())
    top2 = scores.float().topk(2, dim=1).values
    return pa.array((top2[:, 0] - top2[:, 1]).numpy(), pa.float32())


def scored_table(ids: Sequence[str], uris: Sequence[str], widths: Sequence[int], heights: Sequence[int],
                 scores: BatchScores, names: Sequence[str], method: str, top_k: int,
                 run_id: str) -> pa.Table:
    """Rows with ``status='ok'`` for a scored batch, label and top-k from ``method``."""
    count = len(ids)
    k = min(top_k, len(names))
    top_scores, top_index = scores.method(method).topk(k, dim=1)
    columns = {
        "id": pa.array(list(ids), pa.string()), "uri": pa.array(list(uris), pa.string()),
        "status": pa.array(["ok"] * count, pa.string()), "error": pa.nulls(count, pa.string()),
        "width": pa.array(list(widths), pa.int32()), "height": pa.array(list(heights), pa.int32()),
        "label": pa.array(_labels(names, top_index[:, 0]), pa.string()),
        "score": pa.array(top_scores[:, 0].numpy(), pa.float32()),
        "margin": _margins(scores.method(method)),
        "topk_labels": pa.array(_labels(names, top_index), pa.list_(pa.string())),
        "topk_scores": pa.array(top_scores.tolist(), pa.list_(pa.float32())),
        "clip_label": _argmax_labels(names, scores.clip, count),
        "cupl_label": _argmax_labels(names, scores.cupl, count),
        "wca_label": _argmax_labels(names, scores.wca, count),
        "steps": _steps_column(names, scores, k),
        "run_id": pa.array([run_id] * count, pa.string()),
    }
    return pa.table(columns, schema=SCHEMA)


# The stages an error row can name (the text of `error` before the first ':'); docs/output-schema.md
ERROR_STAGES = ("read", "empty file", "missing bytes", "decode", "too large", "tar", "parquet", "score")


def error_reason(message: str | None) -> str:
    """The reason an error row gives: its stage, the text of ``error`` before the first ':'
    (``read``, ``decode``, ``tar`` ...; see docs/output-schema.md)."""
    return (message or "").split(":", 1)[0] or "(no message)"


# error_reason of the `error` column, in DuckDB's SQL
ERROR_REASON_SQL = "coalesce(nullif(split_part(error, ':', 1), ''), '(no message)')"
