"""``lgca report``: one self-contained HTML page to review an output's labels.

The numbers are DuckDB aggregates over the view ``labels`` (:mod:`pipeline.data.labels`),
filtered by ``--where`` (the view ``selected``, :mod:`pipeline.data.review`): a handful of
scans, each reading only the columns it needs, holding a few rows per label, method pair,
histogram bin and run, however many images there are. Only the images shown in the
galleries are read, for thumbnails (:mod:`pipeline.data.thumbnails`). The page layout is
``report.html`` beside this module; docs/review.md describes every section.
"""
from __future__ import annotations

import argparse
import html
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from string import Template
from typing import Any, Sequence

import duckdb

from pipeline.config import QueryError, StorageConfig
from pipeline.data.labels import connect
from pipeline.data.output import Output
from pipeline.data.review import SELECTED_VIEW, Provenance, provenance, select_rows
from pipeline.data.rows import ERROR_REASON_SQL
from pipeline.data.thumbnails import ImageRef, Thumbnail, thumbnails
from pipeline.options import STORAGE_FLAGS, add_option_arguments, given_options
from pipeline.storage import write_text

TEMPLATE = Path(__file__).with_name("report.html")
BINS = 20  # histogram bins between the smallest and the largest value
DISAGREEMENTS = 15  # (method, label, other label) pairs listed
ERROR_ROWS = 200  # error rows listed (all are counted)
COMPARED = ("clip", "cupl", "wca")  # methods with a *_label column
OK = f"FROM {SELECTED_VIEW} WHERE status = 'ok'"


@dataclass(frozen=True)
class Histogram:
    """``counts[i]`` values in ``[low + i * width, low + (i + 1) * width)`` (the last bin closed)."""

    name: str
    low: float
    high: float
    counts: list[int]


@dataclass(frozen=True)
class Example:
    """One image of a gallery."""

    image_id: str
    uri: str
    label: str
    score: float
    margin: float
    runner_up: str | None


@dataclass(frozen=True)
class Gallery:
    """A label's ok-row count and its rows of lowest and of highest margin."""

    label: str
    count: int
    lowest: list[Example]
    highest: list[Example]


@dataclass(frozen=True)
class ReportData:
    """Every number and row the page shows (docs/review.md defines them)."""

    output: str
    where: str
    provenance: Provenance
    totals: dict[str, int]  # rows, ok, errors
    labels: list[tuple[str, int]]  # ok rows per label, most frequent first
    reasons: list[tuple[str, int]]  # error rows per reason
    histograms: list[Histogram]  # score, margin
    agreement: dict[tuple[str, str], tuple[int, int]]  # (method a, method b) -> (same label, both labelled)
    disagreements: list[tuple[str, str, str, int]]  # (method, label, that method's label, rows)
    galleries: list[Gallery]
    errors: list[tuple[str, str, str, str]]  # id, uri, error, run_id (at most ERROR_ROWS)
    runs: list[dict[str, Any]]


def label_columns(method: str | None) -> dict[str, str]:
    """Method name -> its label column: clip/cupl/wca, and the output's own method (``label``)."""
    columns = {name: f"{name}_label" for name in COMPARED}
    if method not in columns:
        columns[method or "label"] = "label"
    return columns


def histograms(con: duckdb.DuckDBPyConnection) -> list[Histogram]:
    """Score and margin of the ok rows in BINS bins each (two scans: ranges, then counts)."""
    ranges = con.execute(f"SELECT min(score), max(score), min(margin), max(margin) {OK}").fetchone()
    out, bins = [], []
    for name, (low, high) in zip(("score", "margin"), (ranges[:2], ranges[2:])):
        low, high = (0.0, 0.0) if low is None else (float(low), float(high))
        width = (high - low) / BINS or 1.0
        bins.append(f"least(CAST(floor(({name} - {low!r}) / {width!r}) AS INTEGER), {BINS - 1}) AS {name}_bin")
        out.append(Histogram(name, low, high, [0] * BINS))
    got = con.execute(f"SELECT score_bin, margin_bin, count(*) FROM (SELECT {', '.join(bins)} {OK}) "
                      "GROUP BY GROUPING SETS ((score_bin), (margin_bin))").fetchall()
    for score_bin, margin_bin, count in got:
        for histogram, b in zip(out, (score_bin, margin_bin)):
            if b is not None:
                histogram.counts[b] += count
    return out


def agreement(con: duckdb.DuckDBPyConnection, columns: dict[str, str]) -> dict[tuple[str, str], tuple[int, int]]:
    """For each pair of methods: ok rows where both have a label, and where the labels are equal."""
    names = list(columns)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    sql = ", ".join(f"count(*) FILTER (WHERE {columns[a]} = {columns[b]}), "
                    f"count(*) FILTER (WHERE {columns[a]} IS NOT NULL AND {columns[b]} IS NOT NULL)" for a, b in pairs)
    got = con.execute(f"SELECT {sql} {OK}").fetchone()
    return {pair: (int(got[2 * i]), int(got[2 * i + 1])) for i, pair in enumerate(pairs)}


def disagreements(con: duckdb.DuckDBPyConnection, columns: dict[str, str]) -> list[tuple[str, str, str, int]]:
    """The most frequent (method, label, that method's label) with the two labels different."""
    others = ", ".join(f"{{'method': '{name}', 'other': {column}}}" for name, column in columns.items()
                       if column != "label")
    if not others:
        return []
    return con.execute(
        f"SELECT p.method, label, p.other, count(*) AS n FROM (SELECT label, unnest([{others}]) AS p {OK}) "
        f"WHERE p.other <> label GROUP BY ALL ORDER BY n DESC, p.method, label, p.other LIMIT {DISAGREEMENTS}"
    ).fetchall()


def galleries(con: duckdb.DuckDBPyConnection, per_class: int) -> list[Gallery]:
    """Per label, the ``per_class`` ok rows of lowest and of highest margin (DuckDB keeps N per
    label while it scans, never all the rows)."""
    row = "{'id': id, 'uri': uri, 'score': score, 'margin': margin, 'runner_up': topk_labels[2]}"
    got = con.execute(f"SELECT label, count(*), min_by({row}, margin, {per_class}), "
                      f"max_by({row}, margin, {per_class}) {OK} GROUP BY label ORDER BY label").fetchall()

    def examples(label: str, picked: list[dict] | None) -> list[Example]:
        return [Example(p["id"], p["uri"], label, p["score"], p["margin"], p["runner_up"]) for p in picked or []]

    return [Gallery(label, int(n), examples(label, low), examples(label, high)) for label, n, low, high in got]


def collect(output: str, storage: StorageConfig, where: str = "", per_class: int = 6) -> ReportData:
    """Every number of the report, computed with DuckDB over the output's rows."""
    con = connect(output, storage)
    try:
        select_rows(con, where)
        runs = Output(output, storage).runs()
        source = provenance(output, storage, runs)
        columns = label_columns(source.method)
        totals = con.execute(f"SELECT count(*), count(*) FILTER (WHERE status = 'ok'), "
                             f"count(*) FILTER (WHERE status = 'error') FROM {SELECTED_VIEW}").fetchone()
        return ReportData(
            output=output, where=where, provenance=source,
            totals=dict(zip(("rows", "ok", "errors"), (int(v) for v in totals))),
            labels=con.execute(f"SELECT label, count(*) AS n {OK} GROUP BY label ORDER BY n DESC, label").fetchall(),
            reasons=con.execute(f"SELECT {ERROR_REASON_SQL} AS reason, count(*) AS n FROM {SELECTED_VIEW} "
                                "WHERE status = 'error' GROUP BY reason ORDER BY n DESC, reason").fetchall(),
            histograms=histograms(con), agreement=agreement(con, columns),
            disagreements=disagreements(con, columns), galleries=galleries(con, per_class),
            errors=con.execute(f"SELECT id, uri, error, run_id FROM {SELECTED_VIEW} WHERE status = 'error' "
                               f"ORDER BY id LIMIT {ERROR_ROWS}").fetchall(),
            runs=runs)
    except duckdb.Error as exc:
        raise QueryError(str(exc)) from None
    finally:
        con.close()


# ---- HTML -------------------------------------------------------------------------------

def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = (), attrs: str = "") -> str:
    """A table of already-escaped cells; columns listed in ``numeric`` are right-aligned."""
    def cells(values: Sequence[str], tag: str) -> str:
        return "".join(f"<{tag}{' class=n' if i in numeric else ''}>{v}</{tag}>" for i, v in enumerate(values))
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    return f"<table{attrs}><tr>{cells(header, 'th')}</tr>{body}</table>"


def runs_html(runs: list[dict[str, Any]]) -> str:
    """One line per run record: times, images, errors by reason, images/s."""
    if not runs:
        return "<p class=meta>No run records under _lgca/runs.</p>"
    rows = []
    for run in runs:
        counts = run.get("counts") or {}
        reasons = ", ".join(f"{esc(k)}: {v}" for k, v in (run.get("error_reasons") or {}).items()) or "none"
        speed = run.get("images_per_second")
        rows.append([esc(run.get("run_id")), esc(run.get("started_at")), esc(run.get("finished_at")),
                     str(counts.get("ok", 0) + counts.get("error", 0)), str(counts.get("error", 0)), reasons,
                     f"{speed:.2f}" if isinstance(speed, (int, float)) else "-"])
    return table(["run", "started", "finished", "images", "errors", "errors by reason", "images/s"], rows,
                 numeric=(3, 4, 6), attrs=" class=runs")


def bars_html(counts: list[tuple[str, int]]) -> str:
    """A bar per label, widths relative to the most frequent one."""
    if not counts:
        return "<p class=meta>No ok rows.</p>"
    top = max(n for _, n in counts)
    rows = "".join(f"<tr data-label=\"{esc(label)}\"><td>{esc(label)}</td><td class=n data-count=\"{n}\">{n}</td>"
                   f"<td class=bar><div style=\"width:{100 * n / top:.1f}%\"></div></td></tr>" for label, n in counts)
    return f"<table class=bars>{rows}</table>"


def histogram_html(histogram: Histogram) -> str:
    top = max(histogram.counts) or 1
    width = (histogram.high - histogram.low) / BINS
    bars = "".join(f"<div data-count=\"{n}\" style=\"height:{100 * n / top:.1f}%\" title=\"{n} rows from "
                   f"{histogram.low + i * width:.4f}\"></div>" for i, n in enumerate(histogram.counts))
    return (f"<div data-histogram=\"{histogram.name}\"><h3>{histogram.name}</h3><div class=hist>{bars}</div>"
            f"<div class=axis><span>{histogram.low:.4f}</span><span>{histogram.high:.4f}</span></div></div>")


def agreement_html(data: ReportData) -> str:
    """The method-by-method matrix of agreement (share of ok rows with the same label)."""
    names = list(label_columns(data.provenance.method))
    rows = []
    for a in names:
        cells = [f"<b>{esc(a)}</b>"]
        for b in names:
            same, both = data.agreement.get((a, b)) or data.agreement.get((b, a)) or (0, 0)
            text = "&mdash;" if a == b else (f"{100 * same / both:.1f}%" if both else "n/a")
            cells.append(text if a == b else f"<span data-pair=\"{esc(a)}|{esc(b)}\" data-same=\"{same}\" "
                         f"data-both=\"{both}\" title=\"{same} of {both} rows\">{text}</span>")
        rows.append(cells)
    return table([""] + [esc(name) for name in names], rows, attrs=" class=matrix")


def disagreements_html(pairs: list[tuple[str, str, str, int]], method: str | None) -> str:
    if not pairs:
        return "<p class=meta>None: every method gave the same labels.</p>"
    rows = [[esc(m), esc(label), esc(other), f"<span data-disagreement>{n}</span>"] for m, label, other, n in pairs]
    return table(["method", f"{esc(method or 'output')} label", "that method's label", "rows"], rows, numeric=(3,))


def figure_html(example: Example, thumbnail: Thumbnail) -> str:
    missing = f"<br><span class=reason>{esc(thumbnail.error)}</span>" if thumbnail.error else ""
    runner = esc(example.runner_up) if example.runner_up is not None else "&mdash;"
    return (f"<figure class=\"{'missing' if thumbnail.error else 'shown'}\" data-margin=\"{example.margin!r}\" "
            f"title=\"{esc(example.image_id)}\"><img src=\"{thumbnail.src}\" alt=\"{esc(example.image_id)}\">"
            f"<figcaption><b>{esc(example.label)}</b> {example.score:.4f}<br>margin {example.margin:.4f} "
            f"&middot; runner-up {runner}<br>{esc(example.image_id.rsplit('/', 1)[-1])}{missing}</figcaption></figure>")


def galleries_html(galleries: list[Gallery], thumbs: dict[str, Thumbnail]) -> str:
    parts = []
    for gallery in galleries:
        sides = "".join(f"<div class=side data-side=\"{side}\"><h3>{side} margin</h3><div class=gallery>"
                        + "".join(figure_html(e, thumbs[e.image_id]) for e in examples) + "</div></div>"
                        for side, examples in (("lowest", gallery.lowest), ("highest", gallery.highest)))
        parts.append(f"<section data-label=\"{esc(gallery.label)}\" data-count=\"{gallery.count}\">"
                     f"<h3>{esc(gallery.label)} ({gallery.count} rows)</h3>{sides}</section>")
    return "".join(parts) or "<p class=meta>No ok rows.</p>"


def errors_html(data: ReportData) -> str:
    reasons = table(["reason", "rows"], [[esc(r), f"<span data-reason=\"{esc(r)}\">{n}</span>"]
                                         for r, n in data.reasons], numeric=(1,))
    shown = f"<p class=meta>The first {len(data.errors)} of {data.totals['errors']} by id; lgca query lists all.</p>"
    rows = [[esc(i), esc(u), f"<span class=reason>{esc(e)}</span>", esc(r)] for i, u, e, r in data.errors]
    return (reasons + shown + table(["id", "uri", "error", "run"], rows, attrs=" class=errors")) if data.errors \
        else "<p class=meta>No error rows.</p>"


def render(data: ReportData, thumbs: dict[str, Thumbnail], per_class: int) -> str:
    """The whole page (TEMPLATE filled in)."""
    totals = " ".join(f"<span>{name} <b data-total=\"{name}\">{n}</b></span>" for name, n in data.totals.items())
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        output=esc(data.output), model_version=esc(data.provenance.model_version()),
        where=f"where <code>{esc(data.where)}</code>" if data.where.strip() else "all",
        written=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), totals=totals,
        runs=runs_html(data.runs), labels=bars_html(data.labels),
        histograms="".join(histogram_html(h) for h in data.histograms), agreement=agreement_html(data),
        disagreements=disagreements_html(data.disagreements, data.provenance.method),
        per_class=per_class, galleries=galleries_html(data.galleries, thumbs), errors=errors_html(data))


def write_report(output: str, target: str, storage: StorageConfig, where: str = "", per_class: int = 6) -> ReportData:
    """Collect the numbers, read the thumbnails shown, and write the page to ``target``."""
    data = collect(output, storage, where, per_class)
    shown = {e.image_id: ImageRef(e.image_id, e.uri) for g in data.galleries for e in g.lowest + g.highest}
    write_text(target, render(data, thumbnails(list(shown.values()), storage), per_class), storage)
    return data


def _report(args: argparse.Namespace) -> int:
    if args.per_class < 1:
        raise QueryError("--per-class must be at least 1")
    storage = StorageConfig(**given_options(args, STORAGE_FLAGS)["storage"])
    data = write_report(args.output, args.output_file, storage, args.where, args.per_class)
    print(f"{args.output_file}: {data.totals['rows']} rows ({data.totals['ok']} ok, {data.totals['errors']} error), "
          f"{len(data.galleries)} labels")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``report`` subcommand to the ``lgca`` parser."""
    parser = commands.add_parser("report", help="write a self-contained HTML page to review an output's labels")
    parser.add_argument("output", help="output folder or prefix written by lgca label (local or s3://)")
    parser.add_argument("-o", "--output-file", required=True, help="the HTML file to write (local path or URL)")
    parser.add_argument("--where", default="", help="only rows matching this DuckDB condition over the view "
                                                    "'labels', e.g. \"label = 'cat' AND score > 0.2\"")
    parser.add_argument("--per-class", type=int, default=6,
                        help="images of lowest and of highest margin shown per label (default 6)")
    add_option_arguments(parser, STORAGE_FLAGS)
    parser.set_defaults(handler=_report)
