"""The output schema, result rows, done ids and the manifest check."""
from __future__ import annotations

import json
import threading

import fsspec.implementations.local
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import pipeline.data.output as sink
from pipeline.config import ConfigError, OutputError, StorageConfig
from pipeline.data.output import IdSet, Output, id_digests, make_manifest, shard_key
from pipeline.data.rows import SCHEMA, error_table, parquet_options, scored_table
from pipeline.data.states import decode_column
from pipeline.method.engine import BatchScores, ImageStates

NAMES = ["cat", "dog", "owl"]
LOCAL = StorageConfig()


def batch_scores() -> BatchScores:
    """Two images, 3 classes, T=1, N=3, K=1, with known numbers."""
    steps = torch.tensor([[[0.1, 0.5, 0.2], [0.3, 0.2, 0.1]],
                          [[0.2, 0.4, 0.6], [0.9, 0.1, 0.0]]])
    boxes = torch.zeros(2, 2, 3, 4, dtype=torch.float64)
    boxes[1, 0, 2] = torch.tensor([1.0, 2.0, 11.0, 12.0], dtype=torch.float64)
    boxes[1, 1, 0] = torch.tensor([0.0, 0.0, 5.0, 5.0], dtype=torch.float64)
    expanded = torch.tensor([[[2], [0]]])
    grown = boxes[1].gather(1, expanded[0][..., None].expand(-1, -1, 4))[None]
    states = ImageStates(full=torch.eye(2, 4), pooled=torch.rand(2, 2, 4), grown=grown, boxes=boxes,
                         weights=torch.full((2, 2, 3), 1 / 3), expanded=expanded)
    return BatchScores(clip=torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
                       cupl=torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
                       wca=steps[0], steps=steps, lgca=steps.mean(0), states=states)


def test_scored_rows_hold_the_labels_scores_and_steps():
    table = scored_table(["a", "b"], ["u/a", "u/b"], [640, 10], [480, 10], batch_scores(), NAMES,
                         "lgca", 2, "run-1")
    assert table.schema == SCHEMA
    rows = table.to_pylist()
    assert [r["label"] for r in rows] == ["dog", "cat"]  # lgca = mean of the two steps
    assert rows[0]["topk_labels"] == ["dog", "owl"] and rows[1]["topk_labels"] == ["cat", "dog"]
    np.testing.assert_allclose(rows[0]["topk_scores"], [0.45, 0.4], atol=1e-6)
    np.testing.assert_allclose(rows[1]["topk_scores"], [0.6, 0.15], atol=1e-6)
    assert rows[0]["score"] == pytest.approx(0.45)
    assert [r["clip_label"] for r in rows] == ["cat", "owl"]
    assert [r["cupl_label"] for r in rows] == ["dog", "owl"]
    assert [r["wca_label"] for r in rows] == ["dog", "cat"]
    first = rows[0]["steps"]
    assert [s["step"] for s in first] == [0, 1]
    assert first[0]["topk_labels"] == ["dog", "owl"] and first[0]["expanded_boxes"] == []
    assert first[1]["topk_labels"] == ["owl", "dog"]
    assert first[1]["expanded_boxes"] == [[1.0, 2.0, 11.0, 12.0]]
    assert rows[1]["steps"][1]["expanded_boxes"] == [[0.0, 0.0, 5.0, 5.0]]
    assert rows[1]["status"] == "ok" and rows[1]["error"] is None and rows[1]["run_id"] == "run-1"
    assert rows[0]["state_full"] is None and rows[0]["state_steps"] is None  # no state dtype: none kept


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_scored_rows_keep_the_image_states_in_the_state_dtype(dtype):
    scores = batch_scores()
    table = scored_table(["a", "b"], ["u/a", "u/b"], [640, 10], [480, 10], scores, NAMES, "lgca", 2, "r", dtype)
    full = decode_column(table.column("state_full"), 4, dtype)
    steps = decode_column(table.column("state_steps"), 8, dtype)
    assert full.rows.tolist() == steps.rows.tolist() == [0, 1]
    np.testing.assert_array_equal(full.values, scores.states.full.numpy().astype(dtype))
    stored = scores.states.pooled.permute(1, 0, 2).reshape(2, 8).numpy().astype(dtype)  # p_0 then p_1
    np.testing.assert_array_equal(steps.values, stored)
    assert len(table.column("state_full")[0].as_py()) == 4 * np.dtype(dtype).itemsize


def test_state_columns_are_written_plain_and_uncompressed(tmp_path):
    table = scored_table(["a", "b"], ["u/a", "u/b"], [1, 1], [1, 1], batch_scores(), NAMES, "lgca", 2, "r", "float16")
    pq.write_table(table, tmp_path / "f.parquet", **parquet_options())
    group = pq.ParquetFile(tmp_path / "f.parquet").metadata.row_group(0)
    codecs = {group.column(i).path_in_schema: group.column(i).compression for i in range(group.num_columns)}
    assert len(codecs) == 21 and codecs["steps.list.element.expanded_boxes.list.element.list.element"] == "SNAPPY"
    assert {codecs["state_full"], codecs["state_steps"]} == {"UNCOMPRESSED"}
    assert {codec for path, codec in codecs.items() if not path.startswith("state_")} == {"SNAPPY"}


def test_lgca_label_is_the_argmax_of_the_step_mean():
    scores = batch_scores()
    table = scored_table(["a", "b"], ["a", "b"], [1, 1], [1, 1], scores, NAMES, "lgca", 3, "r")
    expected = scores.steps.mean(0)  # a_t = 1/(T+1)
    for row, values in zip(table.to_pylist(), expected):
        np.testing.assert_allclose(row["topk_scores"], values.sort(descending=True).values.numpy(), atol=1e-6)


def test_error_rows_have_no_labels():
    table = error_table(["x"], ["u"], ["decode: broken"], [0], [0], "r")
    assert table.schema == SCHEMA
    row = table.to_pylist()[0]
    assert row["status"] == "error" and row["error"] == "decode: broken"
    assert row["label"] is None and row["steps"] is None and row["topk_labels"] is None


def write_rows(root, name, ids):
    (root / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(error_table(ids, ids, ["e"] * len(ids), [0] * len(ids), [0] * len(ids), "r"),
                   root / "data" / name)


def test_done_ids_and_partial_files(tmp_path):
    write_rows(tmp_path, "r1_a_000000-0.parquet", ["s3://b/1.jpg", "s3://b/2.jpg"])
    write_rows(tmp_path, "r2_a_000000-0.parquet", ["s3://b/3.jpg"])
    (tmp_path / "data" / "r2_a_000001-0.parquet").write_bytes(b"PAR1 cut short")
    layout = Output(str(tmp_path))
    done = layout.labelled_ids()
    assert len(done) == 3
    assert done.contains(["s3://b/2.jpg", "s3://b/4.jpg", "s3://b/3.jpg"]).tolist() == [True, False, True]
    assert not (tmp_path / "data" / "r2_a_000001-0.parquet").exists()  # removed, to be relabelled
    assert [v for c in layout.read_column("id", run_id="r2") for v in c.to_pylist()] == ["s3://b/3.jpg"]
    assert Output(str(tmp_path / "empty")).labelled_ids().contains(["x"]).tolist() == [False]


def test_done_ids_are_sorted_unique_digests_of_every_file(tmp_path):
    """Ids repeated across files (two runs that overlapped) count once; lookups still work."""
    ids = [f"s3://b/{i}.jpg" for i in range(500)]
    write_rows(tmp_path, "r1_a_000000-0.parquet", ids[:300])
    write_rows(tmp_path, "r2_a_000000-0.parquet", ids[200:])  # 200..299 in both
    done = Output(str(tmp_path)).labelled_ids()
    assert len(done) == 500
    assert (done.digests[:-1] < done.digests[1:]).all()  # strictly increasing: sorted, no repeats
    assert done.contains(ids[::-1] + ["s3://b/500.jpg"]).tolist() == [True] * 500 + [False]


def test_output_files_are_read_several_at_once_and_yielded_in_order(tmp_path, monkeypatch):
    """On object storage every file read waits on requests: read_column keeps several in flight."""
    for i in range(4):
        write_rows(tmp_path, f"r1_a_{i:06d}-0.parquet", [f"s3://b/{i}.jpg"])
    together = threading.Barrier(4, timeout=30)  # a sequential reader would break it
    real = sink.read_columns

    def read(fs, path, columns):
        together.wait()
        return real(fs, path, columns)

    monkeypatch.setattr(sink, "read_columns", read)
    values = [v for chunk in Output(str(tmp_path)).read_column("id") for v in chunk.to_pylist()]
    assert values == [f"s3://b/{i}.jpg" for i in range(4)]


def test_an_output_file_that_cannot_be_fetched_is_kept_and_the_run_stops(tmp_path, monkeypatch):
    """Only a file that is not Parquet (a partial write) is removed; a network or permission
    error says nothing about the file, so it stays and the error names it."""
    write_rows(tmp_path, "r1_a_000000-0.parquet", ["s3://b/1.jpg"])
    write_rows(tmp_path, "r1_a_000001-0.parquet", ["s3://b/2.jpg"])
    real = pq.ParquetFile

    def flaky(source, *args, **kwargs):
        if "000001" in getattr(source, "path", str(source)):
            raise ConnectionError("connection reset by peer")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(sink.pq, "ParquetFile", flaky)
    with pytest.raises(OutputError, match="000001-0.parquet: cannot read .*ConnectionError.*nothing was removed"):
        Output(str(tmp_path)).labelled_ids()
    assert (tmp_path / "data" / "r1_a_000001-0.parquet").exists()


def test_done_ids_lookup_across_digest_chunks(monkeypatch):
    monkeypatch.setattr("pipeline.data.output.CONTAINS_CHUNK", 3)
    done = IdSet(np.sort(id_digests(["a", "b", "c", "d"])))
    assert done.contains(["x", "a", "b", "y", "d", "z", "c"]).tolist() == [False, True, True, False, True, False, True]
    assert done.contains([]).tolist() == []


SCORING = {"method": "lgca", "crops": 60, "alpha": 0.5, "beta": 0.9, "lambda_v": 54.6, "lambda_t": 7.39,
           "steps": 3, "expand_top": 6, "expand_ratio": 1.25, "aggregation": "mean", "top_k": 5, "seed": 0}
DIGESTS = {"classes": "c1", "descriptions": "d1", "templates": "t1"}
STATES = {"dtype": "float16", "dim": 512, "steps": 4}


def manifest(states=STATES, **scoring):
    return make_manifest("ViT-B-32", "openai", {**SCORING, **scoring}, DIGESTS, states)


def test_the_manifest_has_an_image_side_a_text_side_and_the_states():
    m = manifest()
    assert m["image"] == {"model": "ViT-B-32", "pretrained": "openai", "crops": 60, "alpha": 0.5, "beta": 0.9,
                          "lambda_v": 54.6, "steps": 3, "expand_top": 6, "expand_ratio": 1.25, "seed": 0}
    assert m["text"] == {"method": "lgca", "lambda_t": 7.39, "aggregation": "mean", "top_k": 5, **DIGESTS}
    assert m["states"] == STATES and "source" not in m


def test_manifest_refuses_other_settings_unless_overwrite(tmp_path):
    layout = Output(str(tmp_path))
    layout.check_manifest(manifest(), overwrite=False)
    layout.start(manifest(), overwrite=False)
    write_rows(tmp_path, "r_a_000000-0.parquet", ["x"])
    layout.check_manifest(manifest(), overwrite=False)  # same: fine
    with pytest.raises(ConfigError, match=r"image.crops: 60 -> 30; text.top_k: 5 -> 3\).*--overwrite"):
        layout.check_manifest(manifest(crops=30, top_k=3), overwrite=False)
    with pytest.raises(ConfigError, match=r"states.dtype: float16 -> \(none\)"):
        layout.check_manifest(manifest(states=None), overwrite=False)
    layout.check_manifest(manifest(crops=30), overwrite=True)
    assert (tmp_path / "data" / "r_a_000000-0.parquet").exists()  # checking removes nothing
    layout.start(manifest(crops=30), overwrite=True)
    assert not (tmp_path / "data").exists()
    assert json.loads((tmp_path / "_lgca" / "manifest.json").read_text())["image"]["crops"] == 30


def test_a_manifest_of_the_earlier_flat_form_is_compared_in_the_new_form(tmp_path):
    layout = Output(str(tmp_path))
    old = {"model": "ViT-B-32", "pretrained": "openai", "scoring": SCORING, "text": DIGESTS}
    (tmp_path / "_lgca").mkdir()
    (tmp_path / "_lgca" / "manifest.json").write_text(json.dumps(old))
    write_rows(tmp_path, "r_a_000000-0.parquet", ["x"])
    layout.check_manifest(manifest(), overwrite=False)  # same settings; its rows just have no states
    layout.check_manifest(manifest(states=None), overwrite=False)
    with pytest.raises(ConfigError, match=r"image.seed: 0 -> 1\)"):
        layout.check_manifest(manifest(seed=1), overwrite=False)
    with pytest.raises(ConfigError, match=r"text.classes: changed\)"):
        layout.check_manifest(make_manifest("ViT-B-32", "openai", SCORING, {**DIGESTS, "classes": "c2"}, STATES),
                              overwrite=False)


def test_a_settings_mismatch_names_each_setting_that_differs_and_nothing_else():
    before = {"model": "ViT-B-32", "pretrained": "openai", "text": {"classes": "a1", "templates": "t1"},
              "scoring": {"crops": 60, "steps": 3, "seed": 0, "aggregation": "mean"}}
    after = {"model": "ViT-B-32", "pretrained": "none", "text": {"classes": "a2", "templates": "t1"},
             "scoring": {"crops": 8, "steps": 3, "seed": 0, "top_k": 5}}
    assert sink.manifest_changes(before, after) == [  # the earlier flat form, read into its two sides
        "image.crops: 60 -> 8", "image.pretrained: openai -> none", "text.aggregation: mean -> (none)",
        "text.classes: changed", "text.top_k: (none) -> 5"]
    assert sink.manifest_changes(before, before) == []


def test_an_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "labels.txt").write_text("not a folder")
    with pytest.raises(OutputError, match=r"labels.txt is a file; give a folder"):
        Output(str(tmp_path / "labels.txt")).check_folder()
    Output(str(tmp_path / "new")).check_folder()  # absent: created later
    Output(str(tmp_path)).check_folder()
    assert Output(str(tmp_path)).first_missing() is None
    assert Output(str(tmp_path / "a" / "b" / "out")).first_missing() == str(tmp_path / "a")


def test_shards_read_whole_are_recorded_per_run_and_forgotten_on_overwrite(tmp_path):
    layout = Output(str(tmp_path))
    assert len(layout.shards_read_whole()) == 0  # nothing recorded yet
    layout.record_shards("r1", [])
    assert not (tmp_path / "_lgca" / "shards").exists()  # a run without shards writes nothing
    layout.record_shards("r1", [("s3://b/a.tar", "10:e1"), ("s3://b/b.tar", "20:e2")])
    layout.record_shards("r2", [("s3://b/c.tar", "30:e3"), ("s3://b/a.tar", "10:e1")])
    assert sorted(p.name for p in (tmp_path / "_lgca" / "shards").iterdir()) == ["r1.parquet", "r2.parquet"]
    table = pq.read_table(tmp_path / "_lgca" / "shards" / "r1.parquet")
    assert table.to_pylist() == [{"uri": "s3://b/a.tar", "version": "10:e1"}, {"uri": "s3://b/b.tar", "version": "20:e2"}]
    done = layout.shards_read_whole()
    assert len(done) == 3  # a.tar recorded twice, counted once
    keys = [shard_key("s3://b/a.tar", "10:e1"), shard_key("s3://b/a.tar", "11:e9"), shard_key("s3://b/c.tar", "30:e3"),
            shard_key("s3://b/d.tar", "10:e1")]
    assert done.contains(keys).tolist() == [True, False, True, False]  # a new version is a new shard
    layout.start({"model": "a"}, overwrite=True)
    assert len(layout.shards_read_whole()) == 0
    layout.record_shards("r3", [("s3://b/a.tar", "10:e1")])
    layout.forget_shards()
    assert len(layout.shards_read_whole()) == 0
    layout.forget_shards()  # nothing recorded: nothing to do


def test_a_foreign_parquet_file_in_the_data_folder_is_refused_not_deleted(tmp_path):
    layout = Output(str(tmp_path))
    write_rows(tmp_path, "r_a_000000-0.parquet", ["x"])
    pq.write_table(pa.table({"label": ["cat"], "n": [3]}), tmp_path / "data" / "label_counts.parquet")
    with pytest.raises(OutputError, match=r"label_counts.parquet: a Parquet file without the column\(s\) id.*move it"):
        layout.labelled_ids([])
    assert (tmp_path / "data" / "label_counts.parquet").exists()


def test_a_cut_shard_record_is_removed_and_unversioned_shards_are_not_recorded(tmp_path, caplog):
    layout = Output(str(tmp_path))
    layout.record_shards("r1", [("s3://b/a.tar", "10:e1"), ("s3://b/x.tar", None)])
    assert pq.read_table(tmp_path / "_lgca" / "shards" / "r1.parquet").column("uri").to_pylist() == ["s3://b/a.tar"]
    (tmp_path / "_lgca" / "shards" / "r2.parquet").write_bytes(b"PAR1 cut")  # a run killed while recording
    done = layout.shards_read_whole()
    assert done.contains([shard_key("s3://b/a.tar", "10:e1")]).tolist() == [True] and len(done) == 1
    assert not (tmp_path / "_lgca" / "shards" / "r2.parquet").exists()
    assert "its shards will be read again" in caplog.text


def test_error_rows_of_a_file_skip_row_groups_without_errors(tmp_path):
    ids = [f"s3://b/{np.random.default_rng(i).bytes(24).hex()}.jpg" for i in range(30000)]  # incompressible
    errors = [None] * 30000
    errors[25000] = "decode: bad"
    table = pa.table({"id": ids, "uri": ids, "error": pa.array(errors, pa.string()), "label": ["cat"] * 30000})
    pq.write_table(table, tmp_path / "f.parquet", row_group_size=10000)
    read = []

    class Counting(fsspec.implementations.local.LocalFileSystem):
        def open(self, path, mode="rb", **kwargs):
            handle = super().open(path, mode, **kwargs)
            real = handle.read
            handle.read = lambda *args: read.append(len(out := real(*args))) or out
            return handle

    rows, failed = sink.error_rows(Counting(), str(tmp_path / "f.parquet"))
    assert rows == 30000 and failed.to_pylist() == [{"error": "decode: bad"}]
    assert sum(read) < (tmp_path / "f.parquet").stat().st_size / 2  # two of three row groups left unread


@pytest.mark.parametrize("where", ["local", "s3"])
def test_shard_marks_round_trip_and_removal(where, tmp_path, request):
    if where == "s3":
        storage = StorageConfig(endpoint_url=request.getfixturevalue("moto_endpoint"))
        root = f"s3://{request.getfixturevalue('bucket')}/out"
    else:
        storage, root = LOCAL, str(tmp_path / "out")
    marks = sink.Output(root, storage).marks("r1")
    shards = ["s3://in/a.tar", "s3://in/b.tar", "s3://in/deep/c.parquet", "s3://in/d.tar"]
    assert marks.marked(shards) == [False] * 4  # no folder yet
    marks.create()
    marks.mark(shards[0], whole=True)
    marks.mark(shards[2], whole=True)
    marks.mark(shards[3], whole=False)
    assert marks.marked(shards) == [True, False, True, False]
    marks.mark(shards[3], whole=True)  # a later attempt read it whole: the break still counts
    marks.mark(shards[0], whole=False)
    assert marks.marked(shards) == [False, False, True, False]
    marks.remove()
    assert marks.marked(shards) == [False] * 4
    marks.remove()  # removing twice is no error


class ReadOnly(fsspec.implementations.local.LocalFileSystem):
    def open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            raise PermissionError(13, "Permission denied", path)
        return super().open(path, mode, **kwargs)


def test_a_whole_mark_that_cannot_be_written_is_logged_a_broken_one_raises(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sink, "filesystem", lambda uri, storage: (ReadOnly(), uri))
    marks = sink.ShardMarks(str(tmp_path / "reading" / "r1"), LOCAL)
    marks.create()
    marks.mark("s3://in/a.tar", whole=True)  # no exception: the shard is only read again next run
    assert marks.marked(["s3://in/a.tar"]) == [False]
    assert "could not mark s3://in/a.tar read whole" in caplog.text
    with pytest.raises(PermissionError):  # else another attempt's whole mark would vouch for the shard
        marks.mark("s3://in/a.tar", whole=False)


def test_run_records_read_back_oldest_first_and_a_cut_one_is_skipped(tmp_path, caplog):
    output = Output(str(tmp_path / "out"))
    output.write_run("20250102T000000Z-bbbbbb", {"run_id": "20250102T000000Z-bbbbbb", "counts": {"ok": 2}})
    output.write_run("20250101T000000Z-aaaaaa", {"run_id": "20250101T000000Z-aaaaaa", "counts": {"ok": 1}})
    # what a driver killed mid-write left behind before records were written whole
    (tmp_path / "out" / "_lgca" / "runs" / "20250103T000000Z-cccccc.json").write_text('{"run_id": "2025')
    assert [run["run_id"] for run in output.runs()] == ["20250101T000000Z-aaaaaa", "20250102T000000Z-bbbbbb"]
    assert "skipping the run record" in caplog.text and "20250103T000000Z-cccccc.json" in caplog.text
    assert sorted(p.name for p in (tmp_path / "out" / "_lgca" / "runs").iterdir()) == [
        "20250101T000000Z-aaaaaa.json", "20250102T000000Z-bbbbbb.json", "20250103T000000Z-cccccc.json"]
