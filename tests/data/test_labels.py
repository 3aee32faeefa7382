"""DuckDB's view `labels` over an output: the margin of new and of older rows."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.config import StorageConfig
from pipeline.data.labels import connect
from pipeline.data.rows import error_table, scored_table
from pipeline.method.engine import BatchScores, ImageStates

NAMES = ["cat", "dog", "fox"]
VALUES = [[0.30, 0.52, 0.21], [0.40, 0.10, 0.39]]


def rows(prefix: str, top_k: int):
    scores = torch.tensor(VALUES, dtype=torch.float32)
    ids = [f"{prefix}{i}" for i in range(len(VALUES))]
    return scored_table(ids, ids, [1] * 2, [1] * 2, BatchScores(clip=scores, cupl=scores, states=ImageStates(full=torch.ones(len(scores), 4) / 2)), NAMES, "clip", top_k,
                        "run")


def test_margin_of_rows_written_with_and_without_the_column(tmp_path):
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True)
    pq.write_table(rows("new", 3), data / "run_a_0.parquet")
    pq.write_table(rows("old", 3).drop_columns(["margin"]), data / "run_b_0.parquet")  # an older output's file
    pq.write_table(rows("old-top1-", 1).drop_columns(["margin"]), data / "run_c_0.parquet")
    pq.write_table(error_table(["bad"], ["bad"], ["read: gone"], [0], [0], "run"), data / "run_d_0.parquet")
    con = connect(str(tmp_path / "out"), StorageConfig())
    got = dict(con.execute("SELECT id, margin FROM labels").fetchall())
    want = [float(np.float32(0.52) - np.float32(0.30)), float(np.float32(0.40) - np.float32(0.39))]
    assert [got["new0"], got["new1"]] == want
    assert [got["old0"], got["old1"]] == want  # the same number, from topk_scores
    assert got["old-top1-0"] is None and got["old-top1-1"] is None  # one top-k score: no margin to compute
    assert got["bad"] is None
    low = con.execute("SELECT id FROM labels WHERE margin < 0.05 ORDER BY id").fetchall()
    assert [r[0] for r in low] == ["new1", "old1"]
    assert con.execute("SELECT typeof(margin) FROM labels LIMIT 1").fetchone()[0] == "FLOAT"
