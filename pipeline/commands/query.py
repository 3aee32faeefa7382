"""``lgca query`` and ``lgca summary``: SQL (DuckDB) over an output folder's labels.

The rows are DuckDB's view ``labels`` (:mod:`pipeline.data.labels`). docs/querying.md
describes both commands.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import duckdb
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import QueryError, StorageConfig
from pipeline.data.labels import LABELS_VIEW, connect, run_sql
from pipeline.data.output import Output, manifest_form
from pipeline.data.rows import ERROR_REASON_SQL
from pipeline.options import add_option_arguments, given_options
from pipeline.storage import filesystem

RESULT_VIEW = "lgca_result"
SUMMARY_TABLE = "lgca_summary"  # summarize's one-scan aggregate
FORMATS = ("table", "csv", "json", "parquet")
SUFFIXES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet"}
COPY_OPTIONS = {"csv": "FORMAT csv, HEADER true", "json": "FORMAT json", "parquet": "FORMAT parquet"}
STORAGE_FLAGS = ("endpoint-url", "anon", "profile", "region")
COMPARED_METHODS = ("clip", "cupl", "wca")  # methods with a *_label column to compare with `label`
DEFAULT_MARGIN = 0.01
RUN_FIELDS = ("run_id", "name", "started_at", "finished_at", "seconds", "images_per_second", "inputs",
              "counts", "error_reasons", "model", "scoring")


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """The object-storage flags of ``lgca label`` (``--endpoint-url`` ...), same names and help."""
    add_option_arguments(parser, STORAGE_FLAGS)


def storage_from_args(args: argparse.Namespace) -> StorageConfig:
    """The :class:`StorageConfig` given by the flags of :func:`add_storage_arguments`."""
    return StorageConfig(**given_options(args, STORAGE_FLAGS)["storage"])


def resolve_format(fmt: str | None, target: str) -> str:
    """``--format`` as given, else from ``-o``'s suffix (``.csv``, ``.json``/``.jsonl``, ``.parquet``),
    else ``table``; checks that parquet has a file and table has none."""
    if fmt is None:
        suffix = os.path.splitext(target)[1].lower()
        if target and suffix not in SUFFIXES:
            raise QueryError(f"-o {target}: cannot tell the format from {suffix or 'no suffix'!r}; "
                             f"give --format ({', '.join(FORMATS[1:])})")
        fmt = SUFFIXES.get(suffix, "table")
    if fmt == "parquet" and not target:
        raise QueryError("--format parquet needs -o FILE")
    if fmt == "table" and target:
        raise QueryError("--format table prints to the terminal; give --format csv, json or parquet with -o")
    return fmt


def write_result(con: duckdb.DuckDBPyConnection, relation: duckdb.DuckDBPyRelation, fmt: str,
                 target: str, storage: StorageConfig, max_rows: int = 100) -> None:
    """Print ``relation`` as a table, or write it as csv/json (JSON Lines)/parquet to ``target``.

    ``target`` may be a local path or an fsspec URL; csv and json without one go to stdout.
    """
    try:
        if fmt == "table":
            width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
            relation.show(max_width=width, max_rows=max_rows)  # no width limit when piped
            return
        relation.create_view(RESULT_VIEW, replace=True)
        with tempfile.TemporaryDirectory(prefix="lgca-query-") as tmp:
            local = os.path.join(tmp, f"result.{fmt}")
            literal = local.replace("'", "''")
            con.execute(f"COPY {RESULT_VIEW} TO '{literal}' ({COPY_OPTIONS[fmt]})")
            _deliver(local, target, storage)
    except duckdb.Error as exc:
        raise QueryError(str(exc)) from None


def _deliver(local: str, target: str, storage: StorageConfig) -> None:
    """Copy the written ``local`` file to ``target`` (any fsspec URL), or to stdout when empty."""
    if not target:
        with open(local, encoding="utf-8") as handle:
            shutil.copyfileobj(handle, sys.stdout)
        return
    fs, path = filesystem(target, storage)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and isinstance(fs, LocalFileSystem):
        fs.makedirs(parent, exist_ok=True)
    fs.put_file(local, path)


@dataclass(frozen=True)
class Share:
    """``count`` of ``total`` rows have a property; ``share`` is None when ``total`` is 0."""

    count: int
    total: int

    @property
    def share(self) -> float | None:
        return self.count / self.total if self.total else None

    def describe(self) -> str:
        percent = f" ({100 * self.share:.1f}%)" if self.total else ""
        return f"{self.count} of {self.total}{percent}"


@dataclass(frozen=True)
class Summary:
    """What ``lgca summary`` reports; docs/querying.md defines every number."""

    output: str
    rows: int  # all rows (images) in the output
    ok: int  # rows with status 'ok'
    errors: int  # rows with status 'error'
    labels: dict[str, int]  # ok rows per label, most frequent first
    error_reasons: dict[str, int]  # error rows per reason (the error's text before the first ':')
    margin: float  # low-confidence threshold on top-1 minus top-2 score
    low_confidence: Share  # ok rows with >= 2 scores whose top-1 beats top-2 by less than margin
    method: str | None  # the method that gave `label` (from the manifest), None when unknown
    agreement: dict[str, Share]  # per method: ok rows with that method's label set, equal to `label`
    runs: list[dict[str, Any]]  # run metadata (RUN_FIELDS) plus `rows` found in the data, oldest first

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; each Share becomes ``{count, total, share}``."""
        def share(value: Share) -> dict[str, Any]:
            return {"count": value.count, "total": value.total, "share": value.share}

        out = dataclasses.asdict(self)
        out["low_confidence"] = share(self.low_confidence)
        out["agreement"] = {name: share(value) for name, value in self.agreement.items()}
        return out


def _counts(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, int]:
    """``{key: count}`` from a two-column query, in the query's order."""
    return {key: int(count) for key, count in con.execute(sql).fetchall()}


def _share(con: duckdb.DuckDBPyConnection, count: str, total: str) -> Share:
    """``Share(sum(count), sum(total))`` over the ok rows of the summary table's label groups."""
    got = con.execute(f"SELECT coalesce(sum({count}), 0), coalesce(sum({total}), 0) FROM {SUMMARY_TABLE} "
                      "WHERE grouping = 'label' AND status = 'ok'").fetchone()
    return Share(int(got[0]), int(got[1]))


def summary_table(con: duckdb.DuckDBPyConnection, margin: float, methods: tuple[str, ...]) -> None:
    """One scan of ``labels`` into the small table SUMMARY_TABLE, whose ``grouping`` column
    names three sets of groups: ``label`` (per status and label), ``reason`` (per status and
    error reason) and ``run`` (per run id); each group has its row count ``n`` and its
    low-confidence and per-method agreement counts. Every number of the summary is a sum
    over it, so a large output on object storage is read once, and the table holds a few
    rows per label, reason and run, however many images there are."""
    agreement = "".join(f", count(*) FILTER (WHERE {m}_label IS NOT NULL) AS {m}_n, "
                        f"count(*) FILTER (WHERE {m}_label = label) AS {m}_same" for m in methods)
    columns = "".join(f", {m}_label" for m in methods)
    con.execute(
        f"CREATE TEMP TABLE {SUMMARY_TABLE} AS SELECT "
        "CASE WHEN GROUPING(run_id) = 0 THEN 'run' WHEN GROUPING(reason) = 0 THEN 'reason' ELSE 'label' END "
        "AS grouping, status, label, reason, run_id, count(*) AS n, "
        "count(*) FILTER (WHERE len(topk_scores) >= 2) AS ranked, count(*) FILTER (WHERE len(topk_scores) >= 2 "
        "AND CAST(topk_scores[1] AS DOUBLE) - CAST(topk_scores[2] AS DOUBLE) < ?) AS low"
        f"{agreement} FROM (SELECT status, label, run_id, topk_scores{columns}, CASE WHEN status = 'error' THEN "
        f"{ERROR_REASON_SQL} END AS reason "
        f"FROM {LABELS_VIEW}) GROUP BY GROUPING SETS ((status, label), (status, reason), (run_id))", [margin])


def output_method(output: str, storage: StorageConfig, runs: list[dict[str, Any]]) -> str | None:
    """The scoring method of the output's rows: from the manifest, else from the latest run."""
    manifest = Output(output, storage).read_manifest() or {}
    method = manifest_form(manifest).get("text", {}).get("method")
    if method is None and runs:
        method = runs[-1].get("scoring", {}).get("method")
    return method


def summarize(output: str, storage: StorageConfig, margin: float = DEFAULT_MARGIN) -> Summary:
    """Count labels, errors, low-confidence rows and method agreement, in one scan of ``labels``."""
    con = connect(output, storage)  # first: no data (or no access) is a QueryError that says so
    try:
        runs = Output(output, storage).runs()
        method = output_method(output, storage, runs)
        compared = tuple(name for name in COMPARED_METHODS if name != method)
        summary_table(con, margin, compared)
        rows, ok, errors = con.execute(
            "SELECT coalesce(sum(n), 0), coalesce(sum(n) FILTER (WHERE status = 'ok'), 0), "
            f"coalesce(sum(n) FILTER (WHERE status = 'error'), 0) FROM {SUMMARY_TABLE} "
            "WHERE grouping = 'label'").fetchone()
        labels = _counts(con, f"SELECT label, n FROM {SUMMARY_TABLE} WHERE grouping = 'label' AND status = 'ok' "
                              "ORDER BY n DESC, label")
        reasons = _counts(con, f"SELECT reason, n FROM {SUMMARY_TABLE} WHERE grouping = 'reason' "
                               "AND status = 'error' ORDER BY n DESC, reason")
        low = _share(con, "low", "ranked")
        agreement = {name: _share(con, f"{name}_same", f"{name}_n") for name in compared}
        per_run = _counts(con, f"SELECT run_id, n FROM {SUMMARY_TABLE} WHERE grouping = 'run'")
    except duckdb.Error as exc:
        raise QueryError(str(exc)) from None
    finally:
        con.close()
    records = [{**{key: run.get(key) for key in RUN_FIELDS}, "rows": per_run.get(run.get("run_id"), 0)}
               for run in runs]
    return Summary(output=output, rows=int(rows), ok=int(ok), errors=int(errors), labels=labels,
                   error_reasons=reasons, margin=margin, low_confidence=low, method=method,
                   agreement=agreement, runs=records)


def _describe_run(run: dict[str, Any]) -> str:
    """One run as two lines: id, times and counts; then model and scoring parameters."""
    counts = run.get("counts") or {}
    model = run.get("model") or {}
    scoring = ", ".join(f"{k}={v}" for k, v in (run.get("scoring") or {}).items())
    shards = f"{counts['skipped_shards']} shards not read again, " if counts.get("skipped_shards") else ""
    return (f"  {run['run_id']}  {run.get('started_at')} .. {run.get('finished_at')}  "
            f"{counts.get('ok', 0)} ok, {counts.get('error', 0)} error, {counts.get('skipped', 0)} skipped, {shards}"
            f"{run['rows']} rows in the output\n"
            f"    model {model.get('name')} ({model.get('pretrained')}); {scoring}")


def format_summary(summary: Summary, top: int = 20) -> str:
    """``summary`` as readable text; at most ``top`` labels are listed."""
    lines = [f"output: {summary.output}",
             f"rows: {summary.rows} ({summary.ok} ok, {summary.errors} error)",
             f"method: {summary.method or 'unknown'}",
             f"labels ({len(summary.labels)} distinct, ok rows):"]
    lines += [f"  {count:>8}  {label}" for label, count in list(summary.labels.items())[:top]]
    if len(summary.labels) > top:
        lines.append(f"  ... {len(summary.labels) - top} more labels (lgca summary --json lists them all)")
    if summary.error_reasons:
        lines.append("error reasons:")
        lines += [f"  {count:>8}  {reason}" for reason, count in summary.error_reasons.items()]
    lines.append(f"low confidence (top-1 score less than {summary.margin:g} above top-2): "
                 f"{summary.low_confidence.describe()} ok rows")
    if summary.agreement:
        lines.append(f"agreement with the {summary.method or 'output'} label (ok rows):")
        lines += [f"  {name:<5} {share.describe()}" for name, share in summary.agreement.items()]
    lines.append(f"runs ({len(summary.runs)}):")
    lines += [_describe_run(run) for run in summary.runs]
    return "\n".join(lines)


def _query(args: argparse.Namespace) -> int:
    storage = storage_from_args(args)
    fmt = resolve_format(args.format, args.output_file)
    con = connect(args.output, storage)
    try:
        write_result(con, run_sql(con, args.sql), fmt, args.output_file, storage, args.max_rows)
    finally:
        con.close()
    return 0


def _summary(args: argparse.Namespace) -> int:
    summary = summarize(args.output, storage_from_args(args), args.margin)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(format_summary(summary))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``query`` and ``summary`` subcommands to the ``lgca`` parser."""
    query = commands.add_parser("query", help="run SQL over an output's labels (the view 'labels')")
    query.add_argument("output", help="output folder or prefix written by lgca label (local or s3://)")
    query.add_argument("sql", help="DuckDB SQL over the view 'labels', e.g. \"SELECT * FROM labels LIMIT 5\"")
    query.add_argument("--format", choices=FORMATS, default=None,
                       help="table (printed; default), csv, json (JSON Lines) or parquet; "
                            "default: from -o's suffix, else table")
    query.add_argument("-o", "--output-file", default="", help="write the result here (local path or URL)")
    query.add_argument("--max-rows", type=int, default=100, help="rows a printed table shows at most")
    add_storage_arguments(query)
    query.set_defaults(handler=_query)
    summary = commands.add_parser("summary", help="label counts, errors, confidence and runs of an output")
    summary.add_argument("output", help="output folder or prefix written by lgca label (local or s3://)")
    summary.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    summary.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                         help="an ok row is low-confidence when its top-1 score is less than this "
                              "above its top-2 score (default 0.01)")
    add_storage_arguments(summary)
    summary.set_defaults(handler=_summary)
