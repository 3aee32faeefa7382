"""lgca relabel end to end on a real local Ray cluster and real photos: it gives the labels of
lgca label with the new classes, incrementally, and refuses what the stored states cannot give."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from skimage import data as photos

from pipeline.config import (ConfigError, RelabelJob, RelabelModel, RelabelScoring, ScoringParams, StatesConfig,
                             StorageConfig, TextConfig)
from pipeline.data.decode import DecodeLimits, decode_batch
from pipeline.data.output import Output
from pipeline.data.rows import parquet_options
from pipeline.distributed.actor import LabelActor
from pipeline.distributed.job import fingerprint, run_label_job
from pipeline.distributed.relabel import run_relabel_job
from pipeline.model.classes import load_class_set
from tests.distributed.test_job import make_job, read_output
from tests.support import encode

CLASSES_A = "cat,astronaut,coffee,rocket"
CLASSES_B = "dog,spaceman,mug,missile,bird"
DESCRIPTIONS_B = {"dog": ["a furry pet with four legs", "an animal that barks"],
                  "mug": ["a cup for hot drinks"], "missile": ["a tall rocket on a launch pad"], "spaceman": [],
                  "bird": []}
TEMPLATES_B = ["a photo of a {}.", "a blurry photo of the {}."]
SCORING = ScoringParams(crops=8, steps=2, expand_top=2, top_k=3, seed=3)


@pytest.fixture(scope="module")
def text_b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    (folder / "cupl.json").write_text(json.dumps(DESCRIPTIONS_B))
    (folder / "templates.json").write_text(json.dumps(TEMPLATES_B))
    return TextConfig(classes=CLASSES_B, descriptions=str(folder / "cupl.json"), templates=str(folder / "templates.json"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry"):
        (folder / f"{name}.jpg").write_bytes(encode(getattr(photos, name)(), "JPEG", quality=90))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def label(images, output, checkpoint, text, **changes):
    job = make_job([images], output, checkpoint, text=text, scoring=SCORING, **changes)
    summary = run_label_job(job)
    return {row["id"]: row for row in read_output(output).to_pylist()}, summary


def relabel_job(source, output, text, **changes) -> RelabelJob:
    fields = dict(scoring=RelabelScoring(top_k=3), model=RelabelModel(device="cpu"))
    return RelabelJob(source=str(source), output=str(output), text=text, **{**fields, **changes})


def rows_of(output):
    return {row["id"]: row for row in read_output(output).to_pylist()}


def test_relabel_gives_the_labels_of_label_with_the_new_classes(ray_cluster, images, tmp_path, tiny_checkpoint,
                                                                 text_b):
    direct, _ = label(images, tmp_path / "direct", tiny_checkpoint, text_b)  # what relabel must reproduce
    compared = 0
    for dtype, tolerance in (("float32", 1e-5), ("float16", 2e-3)):
        source, _ = label(images, tmp_path / f"a-{dtype}", tiny_checkpoint, TextConfig(classes=CLASSES_A),
                          states=StatesConfig(dtype=dtype))
        summary = run_relabel_job(relabel_job(tmp_path / f"a-{dtype}", tmp_path / f"b-{dtype}", text_b))
        rows = rows_of(tmp_path / f"b-{dtype}")
        assert rows.keys() == direct.keys() == source.keys()
        assert (summary.ok, summary.errors) == (6, 1)
        for image_id, want in direct.items():
            got = rows[image_id]
            assert got["run_id"] == summary.run_id and got["status"] == want["status"]
            assert got["state_full"] is None  # a relabel output keeps no states of its own
            if want["status"] == "error":  # carried over from the source's row
                assert got["error"] == want["error"] == source[image_id]["error"]
                continue
            np.testing.assert_allclose(got["topk_scores"], want["topk_scores"], atol=tolerance, rtol=0)
            for a, b in zip(got["steps"], want["steps"]):
                assert a["expanded_boxes"] == b["expanded_boxes"]  # carried from the source's rows
                np.testing.assert_allclose(a["topk_scores"], b["topk_scores"], atol=tolerance, rtol=0)
            margin = want["topk_scores"][0] - want["topk_scores"][1]
            if dtype == "float32" or margin > tolerance:
                assert (got["label"], got["clip_label"], got["cupl_label"], got["wca_label"]) == (
                    want["label"], want["clip_label"], want["cupl_label"], want["wca_label"]), image_id
                assert got["topk_labels"][:1] == want["topk_labels"][:1]
                compared += dtype == "float16"
    assert compared >= 3  # the float16 label check held for most photos, not vacuously
    manifest = json.loads((tmp_path / "b-float16" / "_lgca" / "manifest.json").read_text())
    direct_manifest = json.loads((tmp_path / "direct" / "_lgca" / "manifest.json").read_text())
    assert manifest["image"] == direct_manifest["image"] and manifest["text"] == direct_manifest["text"]
    assert manifest["states"] is None and manifest["source"] == str(tmp_path / "a-float16")


def test_relabel_is_incremental_and_reads_only_new_source_files(ray_cluster, images, tmp_path, tiny_checkpoint,
                                                                  text_b):
    folder = tmp_path / "grow"
    shutil.copytree(images, folder)
    (folder / "broken.jpg").unlink()
    label(folder, tmp_path / "src", tiny_checkpoint, TextConfig(classes=CLASSES_A))
    job = relabel_job(tmp_path / "src", tmp_path / "new", text_b)
    first = run_relabel_job(job)
    files = len(list((tmp_path / "src" / "data").glob("*.parquet")))
    again = run_relabel_job(job)
    assert (first.ok, again.ok, again.errors, again.skipped_shards) == (6, 0, 0, files)
    (folder / "later.png").write_bytes(encode(photos.coffee()[::3, ::3].copy(), "PNG"))
    label(folder, tmp_path / "src", tiny_checkpoint, TextConfig(classes=CLASSES_A))  # a scheduled label ...
    later = run_relabel_job(job)  # ... then a scheduled relabel: only the label run's new file is read
    assert (later.ok, later.errors, later.skipped_shards) == (1, 0, files)
    rows = rows_of(tmp_path / "new")
    assert len(rows) == 7 and rows[str(folder / "later.png")]["run_id"] == later.run_id
    changed = replace(job, scoring=RelabelScoring(top_k=2))
    with pytest.raises(ConfigError, match=r"text.top_k: 3 -> 2.*--overwrite"):
        run_relabel_job(changed)


def corrupt_states(path) -> None:
    """Overwrite the first data page of the file's state_full column chunk with garbage: its ids
    stay readable, its states cannot be read."""
    meta = pq.read_metadata(path)
    group = meta.row_group(0)
    chunk = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == "state_full")
    raw = bytearray(path.read_bytes())
    raw[chunk.data_page_offset:chunk.data_page_offset + 24] = b"\xff" * 24
    path.write_bytes(bytes(raw))


def test_a_file_with_unreadable_states_gives_error_rows_and_nothing_else_is_lost(ray_cluster, images, tmp_path,
                                                                                 tiny_checkpoint, text_b):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut.jpg", "chelsea.jpg", "broken.jpg"):
        shutil.copy(images / name, folder / name)
    label(folder, tmp_path / "src", tiny_checkpoint, TextConfig(classes=CLASSES_A))  # the first file ...
    source, _ = label(images, tmp_path / "src", tiny_checkpoint, TextConfig(classes=CLASSES_A))  # ... and another
    files = sorted((tmp_path / "src" / "data").glob("*.parquet"))
    (first,) = [f for f in files if str(folder) in pq.read_table(f, columns=["id"]).column("id")[0].as_py()]
    assert len(files) >= 2  # the first run's file, and the second run's
    hit = {row["id"] for row in pq.read_table(first, columns=["id", "status"]).to_pylist() if row["status"] == "ok"}
    corrupt_states(first)
    run_relabel_job(relabel_job(tmp_path / "src", tmp_path / "new", text_b))
    rows = rows_of(tmp_path / "new")
    assert rows.keys() == source.keys()
    for image_id, row in rows.items():
        if image_id in hit:
            assert row["status"] == "error" and row["error"].startswith("states: cannot read them from"), row
        else:
            assert row["status"] == source[image_id]["status"]


def write_source(root, checkpoint, scoring=SCORING, states=StatesConfig()) -> None:
    """An lgca label output of three photos and a broken file, scored by the model actor without Ray."""
    job = make_job([root], root, checkpoint, text=TextConfig(classes=CLASSES_A), scoring=scoring, states=states)
    classes = load_class_set(job.text)
    actor = LabelActor(job.model, classes, scoring, StorageConfig(), "20260101T000000Z-aaaaaa", batch_size=4,
                       states=states)
    blobs = {f"/photos/{n}.jpg": encode(getattr(photos, n)()) for n in ("chelsea", "coffee", "rocket")}
    batch = decode_batch({"id": [*blobs, "/photos/x.jpg"], "uri": [*blobs, "/photos/x.jpg"],
                          "bytes": [*blobs.values(), b"nope"], "error": [None] * 4}, DecodeLimits(max_short_side=128))
    (root / "data").mkdir(parents=True)
    pq.write_table(actor(batch), root / "data" / "20260101T000000Z-aaaaaa_w_000000-0.parquet", **parquet_options())
    Output(str(root)).start(fingerprint(job, classes, 64), overwrite=False)


def test_what_the_stored_states_cannot_give_is_refused_before_ray_starts_with_what_to_run(
        tmp_path, tiny_checkpoint, text_b, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    write_source(tmp_path / "lgca", tiny_checkpoint)
    write_source(tmp_path / "wca", tiny_checkpoint, scoring=replace(SCORING, method="wca"))
    write_source(tmp_path / "none", tiny_checkpoint, states=StatesConfig(keep="none"))
    new = tmp_path / "new"

    def refused(source, match, **changes):
        with pytest.raises(ConfigError, match=match):
            run_relabel_job(relabel_job(tmp_path / source, new, text_b, **changes))
        assert not new.exists()  # nothing written

    refused("none", r"keeps no image states \(labelled with --states none.*instead: lgca label --input "
                    r"<the source's inputs> --output .*new --classes dog,spaceman,mug,missile,bird --model lgca-tiny")
    refused("wca", r"method: lgca with T = 2 needs 3 pooled vectors per image, but .*wca keeps k_0 and p_0 only "
                   r"\(a wca run\); relabel with a method and T it can give \(clip, cupl, wca\), or label the images")
    refused("lgca", r"lgca with T = 5 needs 6 pooled vectors.*keeps p_0..p_2 \(T = 2\).*lgca with --steps 2 or less",
            scoring=RelabelScoring(steps=5))
    refused("lgca", r"model: .*lgca was encoded with model 'lgca-tiny', not 'ViT-B-32'.*drop --model",
            model=RelabelModel(name="ViT-B-32", device="cpu"))
    refused("lgca", r"pretrained: .*encoded with pretrained '.*tiny.pt', not 'openai'",
            model=RelabelModel(pretrained="openai", device="cpu"))
    refused("lgca", r"aggregation: 2 weights given, but steps=2 needs 3", scoring=RelabelScoring(aggregation="0.5,0.5"))
    refused("absent", r"has no _lgca/manifest.json")
    manifest = tmp_path / "none" / "_lgca" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()),
                                    "states": {"dtype": "float16", "dim": 32, "steps": 3}}))
    refused("none", r"its states hold 32 values per vector, but model 'lgca-tiny' embeds 64")
    path = next((tmp_path / "lgca" / "data").glob("*.parquet"))
    table = pq.read_table(path)
    short = pa.array([None if v is None else v[:-4] for v in table.column("state_full").to_pylist()], pa.binary())
    pq.write_table(table.set_column(table.schema.get_field_index("state_full"), "state_full", short), path)
    refused("lgca", r"source: .*parquet: states: state_full does not hold the 64 float16 values.*damaged")
    (new / "_lgca").mkdir(parents=True)
    (new / "_lgca" / "manifest.json").write_text(json.dumps({"image": {}, "text": {}, "states": None,
                                                             "source": "s3://b/src"}))
    with pytest.raises(ConfigError, match=r"new is an lgca relabel output.*relabel its source s3://b/src instead"):
        run_relabel_job(relabel_job(new, tmp_path / "other", text_b))


def test_random_weights_are_said_once_as_a_log_line_not_a_python_warning(tmp_path, caplog):
    import warnings

    from pipeline.distributed.relabel import prepare_relabel, text_context
    from pipeline.model.loading import RandomWeightsWarning

    with pytest.warns(RandomWeightsWarning):  # the source's own label run, with random weights
        write_source(tmp_path / "source", "none")
    job = relabel_job(tmp_path / "source", tmp_path / "new", TextConfig(classes=CLASSES_B))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        context = text_context(job, prepare_relabel(job), "20260101T000000Z-bbbbbb")
    assert not [w for w in caught if issubclass(w.category, RandomWeightsWarning)]
    notes = [r.getMessage() for r in caplog.records if "has random weights" in r.getMessage()]
    assert notes == ["pretrained none: lgca-tiny has random weights (drawn from seed 0, the same in every run), so "
                     "its labels and scores mean nothing; give a checkpoint file, a URI or a tag for real labels"]
    assert context.names == tuple(CLASSES_B.split(","))
