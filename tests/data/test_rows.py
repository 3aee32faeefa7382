"""The rows' tables: the margin column of scored rows (other columns: tests/distributed, tests/commands)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.rows import SCHEMA, error_table, scored_table
from pipeline.method.engine import BatchScores, ImageStates

NAMES = ["cat", "dog", "fox"]


def clip_scores(values: list[list[float]]) -> BatchScores:
    scores = torch.tensor(values, dtype=torch.float32)
    return BatchScores(clip=scores, cupl=scores * torch.tensor([1.0, 0.5, 1.0]),
                       states=ImageStates(full=torch.ones(len(scores), 4) / 2))  # cupl: dog halved


def test_margin_is_top1_minus_top2_of_the_method_in_float32():
    values = [[0.30, 0.52, 0.21], [0.25, 0.25, 0.10], [0.11, 0.12, 0.31]]
    table = scored_table(["a", "b", "c"], ["a", "b", "c"], [1] * 3, [1] * 3, clip_scores(values), NAMES, "clip",
                         3, "run")
    assert table.schema == SCHEMA and table.schema.field("margin").type == pa.float32()
    want = [np.float32(0.52) - np.float32(0.30), np.float32(0.0), np.float32(0.31) - np.float32(0.12)]
    assert table["margin"].to_pylist() == [float(w) for w in want]  # bit for bit
    scores = table["topk_scores"].to_pylist()
    assert table["margin"].to_pylist() == [float(np.float32(s[0]) - np.float32(s[1])) for s in scores]
    assert table["label"].to_pylist() == ["dog", "cat", "fox"]
    cupl = scored_table(["a"], ["a"], [1], [1], clip_scores(values[:1]), NAMES, "cupl", 3, "run")
    cupl_top2 = np.float32(0.30), np.float32(0.52) * np.float32(0.5)
    assert cupl["margin"].to_pylist() == [float(cupl_top2[0] - cupl_top2[1])]  # of the method asked


def test_margin_needs_two_classes_not_two_topk_scores():
    values = [[0.30, 0.52, 0.21]]
    top1 = scored_table(["a"], ["a"], [1], [1], clip_scores(values), NAMES, "clip", 1, "run")
    assert top1["topk_scores"].to_pylist() == [[np.float32(0.52)]]
    assert top1["margin"].to_pylist() == [float(np.float32(0.52) - np.float32(0.30))]
    one_class = scored_table(["a"], ["a"], [1], [1], clip_scores([[0.4]]), ["cat"], "clip", 3, "run")
    assert one_class["margin"].to_pylist() == [None] and one_class["label"].to_pylist() == ["cat"]


def test_error_rows_have_no_margin():
    table = error_table(["x"], ["x"], ["decode: broken"], [0], [0], "run")
    assert table.schema == SCHEMA and table["margin"].to_pylist() == [None]
