"""An output's stored image states read back, file by file: the rows ``lgca relabel`` scores,
and the exact top N of ``lgca search``.

Ray-free (pyarrow, numpy; torch only to convert and multiply the vectors): a relabel's read
tasks call :func:`read_source_file` on each data file of the source; ``lgca search`` streams
the files through :func:`search_files`. Every row of a file comes out once: an ok row with its states, or an
error row saying why it cannot be scored (the source's own error, no states kept, states of
the wrong length, a row group whose states cannot be read). Only a file whose ids cannot be
read at all raises (its rows are unknown: it is read again by the next run).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.output import IdSet
from pipeline.data.states import STATE_COLUMNS, StateSpec, binary_rows, decode_column
from pipeline.storage import parquet_file, read_ahead

ROW_COLUMNS = ("id", "uri", "status", "error", "width", "height")
BOXES_PATH = "steps.list.element.expanded_boxes"
# The rows a read task hands to the scoring tasks: the state columns as stored; `grown` holds
# the boxes expanded at steps 1..T' of each row (T'*K*4 float32), for lgca relabels.
SOURCE_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("width", pa.int32()),
                           ("height", pa.int32()), ("error", pa.string()), ("state_full", pa.binary()),
                           ("state_steps", pa.binary()), ("grown", pa.binary())])
NO_STATES = ("states: none kept for this image in the source (labelled before lgca label kept states); "
             "label it again (lgca label into a new output) to relabel it")


@dataclass(frozen=True)
class SourceRead:
    """What a relabel needs of each source row: the states of ``spec``, ``pooled`` of its pooled
    vectors (0: clip/cupl, 1: wca, T'+1: lgca) and, for lgca, the boxes of steps 1..``steps``
    (T' <= the source's T = ``spec.steps - 1``) of ``expand_top`` (K) boxes each."""

    spec: StateSpec
    pooled: int
    steps: int = 0
    expand_top: int = 0


def read_source_file(fs: Any, path: str, read: SourceRead, done: IdSet | None = None) -> Iterator[pa.Table]:
    """The rows of one source data file (SOURCE_SCHEMA), a row group at a time, without the ids in
    ``done``. A file whose ids cannot be read raises (pyarrow's error or OSError), as does a
    Parquet file without the columns of lgca label's rows."""
    with parquet_file(fs, path) as parquet:
        names = set(parquet.schema_arrow.names)
        missing = [name for name in ROW_COLUMNS if name not in names]
        if missing:
            raise pa.ArrowInvalid(f"no column(s) {', '.join(missing)}: not a data file of lgca label")
        for group in range(parquet.num_row_groups):
            rows = parquet.read_row_group(group, columns=list(ROW_COLUMNS))
            keep = None if done is None or not len(done) else ~done.contains(rows.column("id").to_pylist())
            if keep is not None:
                rows = rows.filter(pa.array(keep))
            if rows.num_rows:
                yield _group_rows(parquet, group, rows, keep, read, names, path)


def _group_rows(parquet: pq.ParquetFile, group: int, rows: pa.Table, keep: np.ndarray | None,
                read: SourceRead, names: set[str], path: str) -> pa.Table:
    """One row group's rows in SOURCE_SCHEMA; its states read now, or an error for every ok row."""
    wanted = [c for c in STATE_COLUMNS if c in names] + ([BOXES_PATH] if read.steps and "steps" in names else [])
    stored = {}
    if wanted:  # an output written before states were kept has none of these columns
        try:
            table = parquet.read_row_group(group, columns=wanted)
        except (pa.ArrowException, OSError) as exc:
            return source_table(rows, {}, np.full(rows.num_rows, f"states: cannot read them from {path} "
                                                  f"({type(exc).__name__}: {exc})", object))
        table = table.filter(pa.array(keep)) if keep is not None else table
        stored = {name: table.column(name) for name in table.column_names}
    columns, problems = check_states(stored, rows.num_rows, read)
    return source_table(rows, columns, problems)


def check_states(stored: dict[str, pa.ChunkedArray], count: int,
                 read: SourceRead) -> tuple[dict[str, pa.Array], np.ndarray]:
    """The state columns a relabel needs of the ``count`` rows ``stored`` (and ``grown``), and per
    row the reason it cannot be scored (None where it can): no states kept, or states of the
    wrong length."""
    problems = np.full(count, None, object)
    spec, columns = read.spec, {}
    for name, values in (("state_full", spec.dim), ("state_steps", spec.steps * spec.dim)):
        if name == "state_steps" and not read.pooled:
            continue
        column = stored.get(name, pa.nulls(count, pa.binary()))
        decoded = decode_column(column, values, spec.dtype)
        problems[decoded.missing] = NO_STATES
        problems[decoded.wrong] = (f"states: {name} does not hold the {values} {spec.dtype} values of the source's "
                                   "manifest (a row not written with its settings)")
        columns[name] = column
    if read.steps:
        grown, bad = expanded_boxes(stored.get("steps"), count, read)
        problems[bad & np.equal(problems, None)] = "states: the row's steps do not hold T steps of K expanded boxes"
        columns["grown"] = grown
    return columns, problems


def expanded_boxes(column: pa.ChunkedArray | None, count: int, read: SourceRead) -> tuple[pa.Array, np.ndarray]:
    """Per row, the boxes expanded at steps 1..T' from its ``steps`` column, as float32 bytes; and
    which rows do not hold the source's T+1 steps of 0, K, .., K boxes."""
    steps, k = read.spec.steps, read.expand_top
    if column is None:
        return pa.nulls(count, pa.binary()), np.ones(count, bool)
    column = column.combine_chunks()
    lengths = column.value_lengths().fill_null(0).to_numpy()
    entries = pc.struct_field(column.flatten(), "expanded_boxes")  # one list of boxes per (row, step)
    boxes = entries.value_lengths().fill_null(0).to_numpy()
    starts = np.r_[0, np.cumsum(lengths)][:-1]
    good = lengths == steps
    index = starts[good][:, None] + np.arange(steps)
    pattern = np.r_[0, np.full(steps - 1, k)]
    good[good] = (boxes[index] == pattern).all(axis=1) if good.any() else []
    values = entries.flatten().flatten().to_numpy()  # every box's 4 numbers, in row and step order
    box_starts = np.r_[0, np.cumsum(boxes)][:-1]
    first = box_starts[starts[good] + 1] if steps > 1 else np.zeros(int(good.sum()), np.int64)
    width = read.steps * k * 4
    picked = values[(first[:, None] * 4 + np.arange(width)).reshape(-1)].reshape(-1, width)
    grown = np.zeros((count, width), np.float32)
    grown[good] = picked
    return binary_rows(grown, "float32"), ~good


def source_table(rows: pa.Table, columns: dict[str, pa.Array], problems: np.ndarray) -> pa.Table:
    """SOURCE_SCHEMA rows: the source's error where it has one, else ``problems``; states kept only
    for the rows that can be scored."""
    count = rows.num_rows
    failed = rows.column("status").to_numpy(zero_copy_only=False) != "ok"
    errors = np.where(failed, rows.column("error").to_numpy(zero_copy_only=False), problems)
    scorable = pa.array(np.equal(errors, None))
    out = {name: rows.column(name) for name in ("id", "uri", "width", "height")}
    out["error"] = pa.array(errors, pa.string())
    for name in ("state_full", "state_steps", "grown"):
        column = columns.get(name, pa.nulls(count, pa.binary()))
        out[name] = pc.if_else(scorable, column, pa.nulls(count, pa.binary()))
    return pa.table(out, schema=SOURCE_SCHEMA)


# ---- search: the exact top N of an output's states against one query vector ----------------

SEARCH_READ_AHEAD = 2  # data files read and scored at once (threads: pyarrow and torch release the GIL)
# Stored vectors converted to float32 at a time: 2 MB of float32 for D = 512, under glibc's 32 MB
# mmap threshold (converting a 4096-row group of lgca states at once, 34 MB, cost 9x as much in
# page faults as the conversion itself)
SEARCH_VECTORS = 1024
VECTORS = ("full", "wca", "lgca")  # k_0; p_0; sum_t a_t p_t (as S_lgca scores a class)


@dataclass(frozen=True)
class Ranked:
    """The top rows of a search, best first: ``files[i]``'s row ``rows[i]`` scored ``scores[i]``."""

    files: np.ndarray  # int64 indices into the searched files
    rows: np.ndarray  # int64 row numbers within the file
    scores: np.ndarray  # float32
    searched: int  # rows scored
    skipped: int  # rows without usable states (error rows, rows labelled before states were kept)


def file_scores(fs: Any, path: str, query: np.ndarray, spec: StateSpec, weights: np.ndarray | None,
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores of one data file's rows against ``query`` ``[D]``: ``cos(k_0, q)`` (``weights``
    None), or ``sum_t weights[t] cos(p_t, q)`` over the first ``len(weights)`` pooled vectors.
    Returns (row numbers, float32 scores, rows skipped), a row group at a time."""
    from pipeline.data.states import as_float32
    import torch

    name = "state_full" if weights is None else "state_steps"
    values = spec.dim if weights is None else spec.steps * spec.dim
    q = torch.from_numpy(query)
    rows, scores, skipped, offset = [], [], 0, 0
    with parquet_file(fs, path) as parquet:
        for group in range(parquet.num_row_groups):
            column = (parquet.read_row_group(group, columns=[name]).column(0)
                      if name in parquet.schema_arrow.names else pa.nulls(parquet.metadata.row_group(group).num_rows))
            decoded = decode_column(column, values, spec.dtype)
            per_part = max(1, SEARCH_VECTORS // (values // spec.dim))
            for start in range(0, len(decoded.rows), per_part):
                vectors = as_float32(decoded.values[start:start + per_part])
                if weights is None:
                    found = vectors @ q
                else:  # every stored vector against q in one product, then the steps' weights
                    cosines = (vectors.view(-1, spec.dim) @ q).view(len(vectors), spec.steps)
                    found = cosines[:, :len(weights)] @ torch.from_numpy(weights)
                scores.append(found.numpy())
            rows.append(decoded.rows + offset)
            skipped += len(column) - len(decoded.rows)
            offset += len(column)
    return (np.concatenate(rows) if rows else np.zeros(0, np.int64),
            np.concatenate(scores) if scores else np.zeros(0, np.float32), skipped)


def search_files(fs: Any, paths: Sequence[str], query: np.ndarray, spec: StateSpec, weights: np.ndarray | None,
                 top: int) -> Ranked:
    """The exact ``top`` rows of ``paths`` by :func:`file_scores`, streamed: a running top-N, so
    memory holds N rows and SEARCH_READ_AHEAD files' scores whatever the output's size."""
    best_files, best_rows = np.zeros(0, np.int64), np.zeros(0, np.int64)
    best = np.zeros(0, np.float32)
    searched = skipped = 0
    read = functools.partial(file_scores, fs, query=query, spec=spec, weights=weights)
    for index, (_, result) in enumerate(read_ahead(read, paths, SEARCH_READ_AHEAD)):
        rows, scores, missing = result.result()
        searched, skipped = searched + len(rows), skipped + missing
        best_files = np.concatenate([best_files, np.full(len(rows), index, np.int64)])
        best_rows, best = np.concatenate([best_rows, rows]), np.concatenate([best, scores])
        if len(best) > top:
            keep = np.argpartition(-best, top - 1)[:top]
            best_files, best_rows, best = best_files[keep], best_rows[keep], best[keep]
    order = np.argsort(-best, kind="stable")
    return Ranked(best_files[order], best_rows[order], best[order], searched, skipped)


def ranked_rows(fs: Any, paths: Sequence[str], ranked: Ranked, columns: Sequence[str]) -> pa.Table:
    """The ``columns`` of the ranked rows, in rank order, with a ``score`` column (reading only
    the files that hold them)."""
    parts = []
    for index in np.unique(ranked.files):
        with parquet_file(fs, paths[index]) as parquet:
            table = parquet.read(columns=list(columns))
        picked = np.flatnonzero(ranked.files == index)
        parts.append((picked, table.take(pa.array(ranked.rows[picked]))))
    if not parts:
        return pa.table({**{c: pa.array([], pa.string()) for c in columns}, "score": pa.array([], pa.float32())})
    order = np.argsort(np.concatenate([picked for picked, _ in parts]))
    table = pa.concat_tables([t for _, t in parts]).take(pa.array(order))
    return table.append_column("score", pa.array(ranked.scores, pa.float32()))
