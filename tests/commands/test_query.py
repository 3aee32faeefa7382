"""lgca query / lgca summary on a hand-built output folder, checked against pyarrow and Python."""
from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cli import main
from pipeline.commands.query import (SUMMARY_TABLE, Share, connect, format_summary, resolve_format, summarize,
                                     summary_table)
from pipeline.config import QueryError, StorageConfig
from pipeline.data.labels import run_sql
from pipeline.data.output import Output
from pipeline.data.rows import error_table, scored_table
from pipeline.method.engine import BatchScores, ImageStates
from pipeline.storage import write_json
from tests.support import s3_client, upload

NAMES = ["cat", "dog", "fox", "owl", "yak"]
RUN_A, RUN_B = "20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"
STEPS, CROPS, EXPAND = 2, 5, 2
SCORING = {"method": "lgca", "crops": CROPS, "steps": STEPS, "expand_top": EXPAND, "seed": 7, "top_k": 3}
CLOSE = 0.004  # the top-2 gap forced on every third row: below the 0.01 default margin


def fake_scores(batch: int, seed: int) -> BatchScores:
    """lgca BatchScores with seeded random values; every third row has top-1 only CLOSE above top-2."""
    gen = torch.Generator().manual_seed(seed)
    classes = len(NAMES)
    steps = 0.25 + 0.05 * torch.randn(STEPS + 1, batch, classes, generator=gen)
    lgca = steps.mean(dim=0)
    order = lgca.argsort(dim=1, descending=True)
    for b in range(0, batch, 3):
        lgca[b, order[b, 1]] = lgca[b, order[b, 0]] - CLOSE
    corner = torch.rand(STEPS + 1, batch, CROPS, 2, generator=gen) * 50
    boxes = torch.cat([corner, corner + 20], dim=-1)
    weights = torch.softmax(torch.randn(STEPS + 1, batch, CROPS, generator=gen), dim=-1)
    clip = 0.25 + 0.05 * torch.randn(batch, classes, generator=gen)
    cupl = 0.25 + 0.05 * torch.randn(batch, classes, generator=gen)
    expanded = torch.randint(0, CROPS, (STEPS, batch, EXPAND), generator=gen)
    grown = torch.stack([boxes[t + 1].gather(1, expanded[t][..., None].expand(-1, -1, 4)) for t in range(STEPS)])
    states = ImageStates(full=torch.randn(batch, 8, generator=gen), pooled=torch.randn(STEPS + 1, batch, 8, generator=gen),
                         grown=grown, boxes=boxes, weights=weights, expanded=expanded)
    return BatchScores(clip=clip, cupl=cupl, wca=steps[0], steps=steps, lgca=lgca, states=states)


def ok_rows(run_id: str, start: int, count: int, seed: int) -> pa.Table:
    ids = [f"/photos/{i:03d}.jpg" for i in range(start, start + count)]
    return scored_table(ids, ids, [640] * count, [480] * count, fake_scores(count, seed), NAMES, "lgca", 3,
                        run_id)


def bad_rows(run_id: str, errors: list[str]) -> pa.Table:
    ids = [f"/photos/bad-{run_id[-6:]}-{i}.jpg" for i in range(len(errors))]
    return error_table(ids, ids, errors, [0] * len(errors), [0] * len(errors), run_id)


def write_output(root: Path) -> Path:
    """An output folder of two runs: 3 data files, 15 ok and 3 error rows, manifest and run JSON."""
    data = root / "data"
    data.mkdir(parents=True)
    files = {
        f"{RUN_A}_w1_0-0.parquet": ok_rows(RUN_A, 0, 6, seed=1),
        f"{RUN_A}_w1_1-0.parquet": pa.concat_tables([
            ok_rows(RUN_A, 6, 4, seed=2),
            bad_rows(RUN_A, ["decode: cannot identify image file", "too large: 9x9 exceeds max_pixels=1"])]),
        f"{RUN_B}_w2_0-0.parquet": pa.concat_tables([
            ok_rows(RUN_B, 10, 5, seed=3), bad_rows(RUN_B, ["decode: broken data stream"])]),
    }
    for name, table in files.items():
        pq.write_table(table, data / name)
    storage = StorageConfig()
    layout = Output(str(root))
    write_json(layout.manifest, {"model": "ViT-B-32", "pretrained": "openai", "scoring": SCORING}, storage)
    for run_id, ok, error, started in ((RUN_A, 10, 2, "2026-01-01T00:00:00"), (RUN_B, 5, 1, "2026-01-02T00:00:00")):
        counts = {"ok": ok, "error": error, "skipped": 0} | ({"skipped_shards": 3} if run_id == RUN_B else {})
        write_json(layout.run(run_id), {
            "run_id": run_id, "name": "lgca-label", "started_at": started, "finished_at": started[:-2] + "09",
            "seconds": 9.0, "images_per_second": (ok + error) / 9.0, "inputs": ["/photos"],
            "counts": counts, "error_reasons": {},
            "model": {"name": "ViT-B-32", "pretrained": "openai"}, "scoring": SCORING, "versions": {}}, storage)
    return root


@pytest.fixture
def output(tmp_path) -> Path:
    return write_output(tmp_path / "out")


def all_rows(root: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((root / "data").glob("*.parquet"))])


def expected_summary(table: pa.Table, margin: float) -> dict:
    """The summary's numbers computed independently in Python from the pyarrow table."""
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    scored = [r for r in ok if len(r["topk_scores"]) >= 2]
    low = sum(1 for r in scored if float(r["topk_scores"][0]) - float(r["topk_scores"][1]) < margin)
    agreement = {m: (sum(r[f"{m}_label"] == r["label"] for r in ok), len(ok)) for m in ("clip", "cupl", "wca")}
    return {"rows": len(rows), "ok": len(ok), "errors": len(rows) - len(ok),
            "labels": Counter(r["label"] for r in ok),
            "reasons": Counter(r["error"].split(":", 1)[0] for r in rows if r["status"] == "error"),
            "low": (low, len(scored)), "agreement": agreement}


def cli(*argv: str) -> int:
    return main(list(argv))


LABEL_COUNTS = "SELECT label, count(*) AS n FROM labels WHERE status = 'ok' GROUP BY label ORDER BY label"


def pyarrow_label_counts(table: pa.Table) -> dict[str, int]:
    ok = table.filter(pc.equal(table["status"], "ok"))
    counts = pc.value_counts(ok["label"]).to_pylist()
    return {c["values"]: c["counts"] for c in counts}


# ---- query ---------------------------------------------------------------------------

def test_query_json_matches_pyarrow(output, capsys):
    assert cli("query", str(output), LABEL_COUNTS, "--format", "json") == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["label"]: r["n"] for r in got} == pyarrow_label_counts(all_rows(output))
    assert [r["label"] for r in got] == sorted(r["label"] for r in got)
    assert sum(r["n"] for r in got) == 15


def test_query_csv_file_and_nested_columns(output, tmp_path, capsys):
    target = tmp_path / "res" / "steps.csv"
    sql = ("SELECT id, steps[2].step AS step, steps[2].topk_labels[1] AS top, len(steps[3].expanded_boxes) AS k "
           "FROM labels WHERE status = 'ok' ORDER BY id")
    assert cli("query", str(output), sql, "-o", str(target)) == 0
    got = list(csv.DictReader(io.StringIO(target.read_text())))
    assert capsys.readouterr().out == f"wrote {len(got)} rows to {target}\n" and len(got) == 15
    table = all_rows(output).to_pylist()
    want = sorted((r for r in table if r["status"] == "ok"), key=lambda r: r["id"])
    assert [g["id"] for g in got] == [r["id"] for r in want]
    assert [g["top"] for g in got] == [r["steps"][1]["topk_labels"][0] for r in want]
    assert {g["step"] for g in got} == {"1"} and {g["k"] for g in got} == {str(EXPAND)}


def test_query_parquet_round_trips_rows(output, tmp_path):
    target = tmp_path / "errors.parquet"
    sql = "SELECT id, error, run_id FROM labels WHERE status = 'error' ORDER BY id"
    assert cli("query", str(output), sql, "--format", "parquet", "-o", str(target)) == 0
    got = pq.read_table(target).to_pylist()
    table = all_rows(output).to_pylist()
    assert got == sorted(({"id": r["id"], "error": r["error"], "run_id": r["run_id"]} for r in table
                          if r["status"] == "error"), key=lambda r: r["id"])
    assert len(got) == 3


def test_the_labels_view_leaves_the_states_out_and_older_files_read_them_as_null(output, capsys):
    kept = scored_table(["/photos/kept.jpg"], ["/photos/kept.jpg"], [640], [480], fake_scores(1, seed=4), NAMES,
                        "lgca", 3, RUN_B, "float16")
    pq.write_table(kept, output / "data" / f"{RUN_B}_w3_0-0.parquet")
    older = output / "data" / f"{RUN_A}_w1_0-0.parquet"  # a file of an earlier version: no state columns
    pq.write_table(pq.read_table(older).drop_columns(["state_full", "state_steps"]), older)
    assert cli("query", str(output), "SELECT * FROM labels LIMIT 1", "--format", "json") == 0
    columns = set(json.loads(capsys.readouterr().out))
    assert "label" in columns and "steps" in columns and not columns & {"state_full", "state_steps"}
    sql = ("SELECT count(*) AS n, count(state_full) AS kept, max(octet_length(state_steps)) AS steps_bytes "
           "FROM labels_with_states")
    assert cli("query", str(output), sql, "--format", "json") == 0
    assert json.loads(capsys.readouterr().out) == {"n": 19, "kept": 1, "steps_bytes": (STEPS + 1) * 8 * 2}


def test_query_table_prints_values(output, capsys):
    assert cli("query", str(output), "SELECT count(*) AS images, max(score) AS best FROM labels") == 0
    out = capsys.readouterr().out
    best = max(s for s in all_rows(output)["score"].to_pylist() if s is not None)
    assert "images" in out and "18" in out
    assert f"{best:.4f}"[:5] in out


def test_query_sql_error_exits_2_with_duckdb_message(output, capsys):
    assert cli("query", str(output), "SELECT nope FROM labels") == 2
    err = capsys.readouterr().err
    assert err.startswith("lgca query: error: Binder Error")
    assert '"nope"' in err and "Traceback" not in err


def test_query_without_data_exits_2(tmp_path, capsys):
    (tmp_path / "empty" / "_lgca").mkdir(parents=True)
    assert cli("query", str(tmp_path / "empty"), "SELECT 1") == 2
    assert capsys.readouterr().err.strip() == (
        f"lgca query: error: no labels under {tmp_path / 'empty'}/data; run lgca label first")


def test_run_sql_runs_every_statement_and_returns_the_last(output):
    con = connect(str(output), StorageConfig())
    relation = run_sql(con, "SET threads = 1; SELECT count(*) FILTER (WHERE status = 'error') FROM labels")
    assert relation.fetchall() == [(3,)]
    assert con.sql("SELECT current_setting('threads')").fetchall() == [(1,)]


@pytest.mark.parametrize("fmt, target, want", [
    (None, "", "table"), (None, "a.csv", "csv"), (None, "a.jsonl", "json"), (None, "x/a.PARQUET", "parquet"),
    ("json", "a.txt", "json"), ("csv", "", "csv")])
def test_resolve_format(fmt, target, want):
    assert resolve_format(fmt, target) == want


@pytest.mark.parametrize("fmt, target, message", [
    ("parquet", "", "needs -o"), ("table", "a.csv", "prints to the terminal"), (None, "a.txt", "'.txt'")])
def test_resolve_format_errors(fmt, target, message):
    with pytest.raises(QueryError, match=message):
        resolve_format(fmt, target)


# ---- summary -------------------------------------------------------------------------

def test_summary_matches_independent_counts(output):
    summary = summarize(str(output), StorageConfig())
    want = expected_summary(all_rows(output), 0.01)
    assert (summary.rows, summary.ok, summary.errors) == (18, 15, 3) == (want["rows"], want["ok"], want["errors"])
    assert summary.labels == dict(want["labels"])
    assert list(summary.labels.values()) == sorted(summary.labels.values(), reverse=True)
    assert summary.error_reasons == {"decode": 2, "too large": 1} == dict(want["reasons"])
    assert (summary.low_confidence.count, summary.low_confidence.total) == want["low"]
    assert summary.low_confidence.count >= 6  # rows 0, 3, ... of each batch were made close
    assert summary.method == "lgca"
    assert {m: (s.count, s.total) for m, s in summary.agreement.items()} == want["agreement"]
    assert [r["run_id"] for r in summary.runs] == [RUN_A, RUN_B]
    assert [r["rows"] for r in summary.runs] == [12, 6]
    assert summary.runs[0]["scoring"] == SCORING and summary.runs[1]["counts"]["error"] == 1


def test_summary_margin_flag_changes_low_confidence(output):
    table = all_rows(output)
    for margin in (0.0, 0.003, 0.05, 1.0):
        got = summarize(str(output), StorageConfig(), margin).low_confidence
        assert (got.count, got.total) == expected_summary(table, margin)["low"]
    assert summarize(str(output), StorageConfig(), 1.0).low_confidence.share == 1.0


def test_summary_json_cli(output, capsys):
    assert cli("summary", str(output), "--json", "--margin", "0.02") == 0
    got = json.loads(capsys.readouterr().out)
    want = expected_summary(all_rows(output), 0.02)
    assert got["labels"] == dict(want["labels"]) and got["margin"] == 0.02
    assert got["low_confidence"] == {"count": want["low"][0], "total": want["low"][1],
                                     "share": want["low"][0] / want["low"][1]}
    assert got["agreement"]["wca"]["count"] == want["agreement"]["wca"][0]
    assert got["runs"][1]["model"] == {"name": "ViT-B-32", "pretrained": "openai"}


def test_summary_text(output, capsys):
    assert cli("summary", str(output)) == 0
    text = capsys.readouterr().out
    summary = summarize(str(output), StorageConfig())
    assert text.strip() == format_summary(summary)
    assert "rows: 18 (15 ok, 3 error)" in text
    assert "         2  decode" in text and "method: lgca" in text
    low = summary.low_confidence
    assert f"{low.count} of 15 ({100 * low.count / 15:.1f}%) ok rows" in text
    assert f"  {RUN_A}  2026-01-01T00:00:00 .. 2026-01-01T00:00:09  10 ok, 2 error, 0 skipped, 12 rows" in text
    assert (f"  {RUN_B}  2026-01-02T00:00:00 .. 2026-01-02T00:00:09  5 ok, 1 error, 0 skipped, "
            "3 shards not read again, 6 rows") in text
    assert text.count("    9.0 s, ") == 2  # each run's seconds, speed and inputs, as --json has them
    assert "    9.0 s, 1.33 images/s; inputs: /photos\n" in text and "    9.0 s, 0.67 images/s; inputs: /photos" in text


def test_summary_text_marks_an_interrupted_run(output, capsys):
    record = json.loads(Path(Output(str(output)).run(RUN_B)).read_text())
    write_json(Output(str(output)).run(RUN_B), {**record, "status": "interrupted"}, StorageConfig())
    assert cli("summary", str(output)) == 0
    text = capsys.readouterr().out
    assert f"  {RUN_B} INTERRUPTED  2026-01-02T00:00:00" in text and f"  {RUN_A}  2026-01-01" in text
    assert cli("summary", str(output), "--json") == 0
    assert [run["status"] for run in json.loads(capsys.readouterr().out)["runs"]] == [None, "interrupted"]


def test_summary_skips_own_method_and_handles_missing_columns(tmp_path):
    """A wca run: wca_label is the label itself, so only clip and cupl are compared."""
    root = tmp_path / "wca"
    (root / "data").mkdir(parents=True)
    scores = fake_scores(4, seed=9)
    wca_only = BatchScores(clip=scores.clip, cupl=scores.cupl, wca=scores.wca,
                           states=ImageStates(full=scores.states.full, pooled=scores.states.pooled[:1]))
    pq.write_table(scored_table(list("abcd"), list("abcd"), [1] * 4, [1] * 4, wca_only, NAMES, "wca", 1, "r"),
                   root / "data" / "r_x_0.parquet")
    write_json(Output(str(root)).manifest, {"scoring": {"method": "wca"}}, StorageConfig())
    summary = summarize(str(root), StorageConfig())
    assert set(summary.agreement) == {"clip", "cupl"}
    # top_k = 1 keeps one score per row, but the margin column comes from all the classes' scores
    top2 = scores.wca.topk(2, dim=1).values
    low = int(((top2[:, 0] - top2[:, 1]) < 0.01).sum())
    assert summary.low_confidence == Share(low, 4)
    assert summary.runs == [] and summary.errors == 0 and summary.error_reasons == {}
    assert f"low confidence (top-1 score less than 0.01 above top-2): {low} of 4" in format_summary(summary)


def test_summary_of_an_output_written_before_the_margin_column(output):
    """Files without `margin` (older outputs): the low-confidence count comes from topk_scores."""
    want = summarize(str(output), StorageConfig()).low_confidence
    for path in (output / "data").glob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["margin"]), path)
    assert "margin" not in pq.read_schema(next((output / "data").glob("*.parquet"))).names
    assert summarize(str(output), StorageConfig()).low_confidence == want
    assert want == Share(*expected_summary(all_rows(output), 0.01)["low"])


# ---- the same on S3 ------------------------------------------------------------------

def test_s3_output_gives_the_same_answers(output, moto_endpoint, bucket, tmp_path, capsys):
    objects = {f"runs/out/{p.relative_to(output).as_posix()}": p.read_bytes()
               for p in output.rglob("*") if p.is_file()}
    upload(moto_endpoint, bucket, objects)
    remote = f"s3://{bucket}/runs/out"
    storage = StorageConfig(endpoint_url=moto_endpoint)
    assert summarize(remote, storage).to_json() == {**summarize(str(output), StorageConfig()).to_json(),
                                                    "output": remote}
    assert cli("query", remote, LABEL_COUNTS, "--format", "json", "--endpoint-url", moto_endpoint) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["label"]: r["n"] for r in got} == pyarrow_label_counts(all_rows(output))
    target = f"s3://{bucket}/results/ids.parquet"
    assert cli("query", remote, "SELECT id FROM labels ORDER BY id", "-o", target,
               "--endpoint-url", moto_endpoint) == 0
    fs_rows = pq.read_table(io.BytesIO(_get(moto_endpoint, bucket, "results/ids.parquet")))["id"].to_pylist()
    assert fs_rows == sorted(all_rows(output)["id"].to_pylist())
    assert cli("query", f"s3://{bucket}/nothing", "SELECT 1", "--endpoint-url", moto_endpoint) == 2
    assert f"no labels under s3://{bucket}/nothing/data" in capsys.readouterr().err


def _get(endpoint: str, bucket: str, key: str) -> bytes:
    return s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()


def test_scores_are_float32_like_the_output(output):
    """The fixture itself: top-k scores come back as float32, the type the margin is computed from."""
    assert all_rows(output).schema.field("topk_scores").type == pa.list_(pa.float32())
    gaps = [s[0] - s[1] for s in all_rows(output)["topk_scores"].to_pylist() if s]
    assert min(gaps) == pytest.approx(CLOSE, abs=1e-6) and np.all(np.array(gaps) >= 0)


def test_summary_reads_each_data_file_once(output, monkeypatch):
    """All of the summary comes from one scan: on object storage every read is a request."""
    opened = []
    real_open = pafs.FSSpecHandler.open_input_file
    monkeypatch.setattr(pafs.FSSpecHandler, "open_input_file",
                        lambda self, path: opened.append(path) or real_open(self, path))
    summary = summarize(str(output), StorageConfig())
    files = sorted(p.as_posix() for p in (output / "data").glob("*.parquet"))
    assert summary.rows == 18 and len(files) >= 2
    assert sorted(opened) == files


def test_summary_table_has_a_row_per_label_reason_and_run_not_per_image(output):
    rows = all_rows(output).to_pylist()
    reason = [r["error"].split(":", 1)[0] if r["status"] == "error" else None for r in rows]
    want = (len({(r["status"], r["label"]) for r in rows}) + len({(r["status"], x) for r, x in zip(rows, reason)})
            + len({r["run_id"] for r in rows}))
    con = connect(str(output), StorageConfig())
    summary_table(con, 0.01, ("clip", "cupl", "wca"))
    assert con.execute(f"SELECT count(*) FROM {SUMMARY_TABLE}").fetchone()[0] == want < len(rows)
