"""An output's rows as one lazily read table: a pyarrow dataset, and DuckDB's views ``labels``
(every column but the image states) and ``labels_with_states`` (every column).

The Parquet files under ``OUTPUT/data`` are opened through fsspec (the filesystem the
pipeline writes with, so local folders and ``s3://`` work alike) and registered with DuckDB,
which scans them lazily, with column projection and filter pushdown. DuckDB's own S3 support
(the ``httpfs`` extension) is not used: it is downloaded from the internet on first use,
which offline clusters cannot do. Every command that reads labels (query, summary, report,
export, relabel, search) goes through here.
"""
from __future__ import annotations

import duckdb
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from pipeline.config import QueryError, StorageConfig
from pipeline.data.output import Output
from pipeline.data.retry import readable_files
from pipeline.data.rows import SCHEMA
from pipeline.data.states import STATE_COLUMNS
from pipeline.storage import filesystem

LABELS_VIEW = "labels"
ROWS_TABLE = "lgca_rows"  # the registered dataset; `labels` is a view over it
# The one definition of an ok row's margin (top-1 minus top-2 score of the run's method): the
# `margin` column, or for rows written before it existed (read back as null), the same float32
# difference of the first two top-k scores (null where there is only one).
MARGIN_SQL = "coalesce(margin, CAST(topk_scores[1] - topk_scores[2] AS FLOAT))"
STATES_VIEW = "labels_with_states"


def labels_dataset(output: str, storage: StorageConfig) -> ds.Dataset:
    """Every data file of ``output`` as one lazily read pyarrow dataset with the output SCHEMA."""
    where = Output(output, storage)
    fs, _ = filesystem(where.data, storage)
    try:
        paths = readable_files(where)  # without the files a --retry-errors run is replacing
    except OSError as exc:  # s3fs reports missing buckets and refused credentials as OSError
        raise QueryError(f"cannot list {where.data}: {type(exc).__name__}: {exc}") from None
    if not paths:
        raise QueryError(f"no labels under {where.data}; run lgca label first")
    return ds.dataset(paths, schema=SCHEMA, format="parquet",
                      filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)))


def connect(output: str, storage: StorageConfig) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the output's rows as the views ``labels_with_states``
    and ``labels`` (the same without the image states: ``SELECT *`` stays readable and light).
    ``margin`` is MARGIN_SQL in both (so outputs written without the column have one too), and an
    output written before states were kept reads them as null."""
    con = duckdb.connect()
    con.register(ROWS_TABLE, labels_dataset(output, storage))
    con.execute(f"CREATE VIEW {STATES_VIEW} AS SELECT * REPLACE ({MARGIN_SQL} AS margin) FROM {ROWS_TABLE}")
    con.execute(f"CREATE VIEW {LABELS_VIEW} AS SELECT * EXCLUDE ({', '.join(STATE_COLUMNS)}) FROM {STATES_VIEW}")
    return con


def run_sql(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation:
    """The relation of ``sql`` (the last statement when there are several); DuckDB errors -> QueryError."""
    try:
        relation = con.sql(sql)
    except duckdb.Error as exc:
        raise QueryError(str(exc)) from None
    if relation is None:
        raise QueryError("the SQL returns no rows; give a query such as SELECT label, count(*) FROM labels "
                         "GROUP BY label")
    return relation
