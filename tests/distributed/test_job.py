"""End to end on a real local Ray cluster: labels, error rows, incremental runs, refusals."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data as photos

from pipeline.config import (ConfigError, InputConfig, LabelJob, ModelConfig, OutputError, ResourceConfig,
                             ScoringParams, SourceError, StorageConfig, TextConfig)
from pipeline.data.decode import DecodeLimits, decode_image
from pipeline.data.output import Output
from pipeline.data.rows import SCHEMA
from pipeline.distributed.job import fingerprint, run_label_job
from pipeline.method.engine import Engine, ImageInput
from pipeline.model.classes import load_class_set
from pipeline.model.loading import load_model
from tests.support import make_tar, encode, upload

CLASSES = "cat,astronaut,coffee,rocket,camera man"
SCORING = ScoringParams(crops=10, steps=2, expand_top=3, top_k=3, seed=5)
PHOTOS = {"astronaut": photos.astronaut, "chelsea": photos.chelsea, "coffee": photos.coffee,
          "rocket": photos.rocket}


def exif_rotated(pixels: np.ndarray) -> bytes:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    return encode(image, "JPEG", exif=exif.tobytes())


def special_images() -> dict[str, bytes]:
    """Images that are valid but unusual: every one must be scored."""
    cat = photos.chelsea()
    sixteen = (photos.camera().astype(np.uint16) * 257)
    palette = Image.fromarray(photos.coffee()).convert("RGBA").quantize(64)
    return {
        "cmyk.jpg": encode(Image.fromarray(cat).convert("CMYK"), "JPEG"),
        "gray16.png": encode(Image.fromarray(sixteen), "PNG"),
        "palette-alpha.png": encode(palette, "PNG"),
        "gray.png": encode(photos.camera(), "PNG"),
        "rotated.jpg": exif_rotated(photos.rocket()),
        "web.webp": encode(cat, "WEBP"),
    }


def bad_files() -> dict[str, str]:
    """File name -> the error prefix its row must carry."""
    return {"zero.png": "empty file", "garbage.jpg": "decode", "truncated.jpg": "decode",
            "text.gif": "decode", "huge.png": "too large"}


def write_bad_files(folder) -> None:
    jpeg = encode(photos.astronaut(), "JPEG")
    (folder / "zero.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(bytes(range(256)) * 10)
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "text.gif").write_bytes(b"this is not a gif")
    (folder / "huge.png").write_bytes(encode(np.zeros((1200, 1500), np.uint8), "PNG"))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "nested").mkdir(parents=True)
    for name, make in PHOTOS.items():
        (root / f"{name}.jpg").write_bytes(encode(make(), "JPEG", quality=92))
    for name, payload in special_images().items():
        (root / "nested" / name).write_bytes(payload)
    write_bad_files(root)
    return root


def make_job(inputs, output, checkpoint, **changes) -> LabelJob:
    if not isinstance(inputs, InputConfig):
        inputs = InputConfig(tuple(str(i) for i in inputs))
    fields = dict(inputs=inputs, output=str(output),
                  text=TextConfig(classes=CLASSES),
                  model=ModelConfig(name="lgca-tiny", pretrained=str(checkpoint), device="cpu"),
                  scoring=SCORING, resources=ResourceConfig(batch_size=4, max_pixels=1_000_000))
    fields.update(changes)
    return LabelJob(**fields)


def read_output(output, storage=StorageConfig()) -> pa.Table:
    from pipeline.storage import filesystem

    where = Output(str(output), storage)
    fs, _ = filesystem(where.data, storage)
    tables = []
    for path in where.data_files():
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def engine_scores(job: LabelJob, payloads: dict[str, bytes]) -> dict[str, tuple[str, np.ndarray]]:
    """Score the same images directly with the engine (no Ray): id -> (label, top-k scores)."""
    loaded = load_model(job.model)
    classes = load_class_set(job.text)
    engine = Engine.for_classes(loaded, classes, job.scoring)
    limits = DecodeLimits.for_model(loaded.preprocess.image_size, job.scoring)
    out = {}
    for image_id, payload in payloads.items():
        decoded = decode_image(payload, limits)
        scores = engine.score([ImageInput(image_id, decoded.pixels, decoded.height, decoded.width)])
        top = scores.lgca[0].topk(job.scoring.top_k)
        out[image_id] = (classes.names[int(top.indices[0])], top.values.numpy(), scores.states)
    return out


def test_labels_scores_and_error_rows(ray_cluster, folder, tmp_path, tiny_checkpoint):
    job = make_job([folder], tmp_path / "out", tiny_checkpoint)
    summary = run_label_job(job)
    table = read_output(job.output)
    rows = {r["id"]: r for r in table.to_pylist()}
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    assert sorted(rows) == files  # exactly one row per input file
    assert table.num_rows == len(files)
    bad = bad_files()
    for image_id, row in rows.items():
        name = image_id.rsplit("/", 1)[-1]
        if name in bad:
            assert row["status"] == "error" and row["error"].startswith(bad[name]), row
            assert row["label"] is None
        else:
            assert row["status"] == "ok" and row["error"] is None, row
    assert (summary.ok, summary.errors, summary.skipped) == (len(files) - len(bad), len(bad), 0)
    assert summary.error_reasons == {"empty file": 1, "decode": 3, "too large": 1}
    # the pipeline's labels and scores equal the engine's on the same images and seed
    good = {p: open(p, "rb").read() for p in files if p.rsplit("/", 1)[-1] not in bad}
    for image_id, (label, top_scores, states) in engine_scores(job, good).items():
        row = rows[image_id]
        assert row["label"] == label
        np.testing.assert_allclose(row["topk_scores"], top_scores, atol=1e-5)
        assert row["score"] == pytest.approx(float(top_scores[0]), abs=1e-5)
        # and the rows keep the engine's image states, k_0 and p_0..p_T, in float16
        np.testing.assert_allclose(np.frombuffer(row["state_full"], "<f2"), states.full[0].numpy(), atol=1e-3)
        np.testing.assert_allclose(np.frombuffer(row["state_steps"], "<f2").reshape(3, -1),
                                   states.pooled[:, 0].numpy(), atol=1e-3)
    assert all(row["state_full"] is None and row["state_steps"] is None
               for row in rows.values() if row["status"] == "error")
    rotated = rows[str(folder / "nested" / "rotated.jpg")]
    assert (rotated["width"], rotated["height"]) == (427, 640)  # rocket is 640x427, turned
    steps = rotated["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2] and steps[0]["expanded_boxes"] == []
    assert all(len(s["expanded_boxes"]) == 3 and len(s["topk_labels"]) == 3 for s in steps[1:])
    for x0, y0, x1, y1 in steps[2]["expanded_boxes"]:
        assert 0 <= x0 < x1 <= 427 + 1e-3 and 0 <= y0 < y1 <= 640 + 1e-3


def test_run_metadata_records_the_run(ray_cluster, folder, tmp_path, tiny_checkpoint):
    job = make_job([folder], tmp_path / "out", tiny_checkpoint, text=TextConfig(classes=CLASSES, templates="oxford_pet"))
    summary = run_label_job(job)
    meta = json.loads((tmp_path / "out" / "_lgca" / "runs" / f"{summary.run_id}.json").read_text())
    assert meta["counts"] == {"ok": summary.ok, "error": summary.errors, "skipped": 0, "skipped_shards": 0}
    assert meta["scoring"]["crops"] == 10 and meta["seed"] == 5
    assert meta["model"]["pretrained"] == str(tiny_checkpoint)
    assert meta["classes"] == CLASSES.split(",")
    assert set(meta["text_digests"]) == {"classes", "descriptions", "templates"}
    assert meta["text_sources"] == {"classes": "inline", "descriptions": "", "descriptions_format": "",
                                    "templates": "bundled:oxford_pet/templates.json"}  # the bundled set, by name
    assert meta["templates"] == ["a photo of a {}, a type of pet."]
    assert meta["versions"]["torch"] == torch.__version__.split("+")[0]
    assert meta["started_at"] <= meta["finished_at"]
    manifest = json.loads((tmp_path / "out" / "_lgca" / "manifest.json").read_text())
    assert manifest["image"]["model"] == "lgca-tiny" and manifest["image"]["steps"] == 2
    assert manifest["text"]["method"] == "lgca" and manifest["states"] == {"dtype": "float16", "dim": 64, "steps": 3}
    assert meta["states"] == {"keep": "keep", "dtype": "float16"}


def test_rows_per_file_merges_actor_calls_into_larger_files(ray_cluster, tmp_path, tiny_checkpoint):
    from pipeline.distributed.plan import FILES_PER_READ

    images = tmp_path / "many"
    images.mkdir()
    pixels = photos.astronaut()[::8, ::8].copy()
    for i in range(3 * FILES_PER_READ):  # three read tasks of 32 files, each cut into four actor calls
        (images / f"{i:03d}.png").write_bytes(encode(np.roll(pixels, i, axis=1), "PNG"))
    sizes = {}
    for rows in (0, 2 * FILES_PER_READ):
        job = make_job([images], tmp_path / f"out-{rows}", tiny_checkpoint,
                       resources=ResourceConfig(batch_size=8, rows_per_file=rows))
        assert run_label_job(job).ok == 3 * FILES_PER_READ
        files = (tmp_path / f"out-{rows}" / "data").glob("*.parquet")
        sizes[rows] = sorted(pq.read_metadata(path).num_rows for path in files)
    assert sizes[0] == [8] * 12  # auto on CPUs: one file per actor call of batch_size rows
    assert sizes[2 * FILES_PER_READ] == [FILES_PER_READ, 2 * FILES_PER_READ]  # two calls merged, then the rest


def test_second_run_is_incremental(ray_cluster, folder, tmp_path, tiny_checkpoint):
    job = make_job([folder], tmp_path / "out", tiny_checkpoint)
    first = run_label_job(job)
    again = run_label_job(job)
    assert (again.ok, again.errors, again.skipped) == (0, 0, first.ok + first.errors)
    (folder / "new").mkdir()
    (folder / "new" / "camera.png").write_bytes(encode(photos.camera(), "PNG"))
    (folder / "new" / "cat2.jpg").write_bytes(encode(photos.chelsea()[::2, ::2].copy(), "JPEG"))
    third = run_label_job(job)
    assert (third.ok, third.errors) == (2, 0)
    table = read_output(job.output)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == first.ok + first.errors + 2
    new_rows = table.filter(pa.compute.equal(table.column("run_id"), third.run_id))
    assert sorted(new_rows.column("id").to_pylist()) == sorted(
        str(folder / "new" / n) for n in ("camera.png", "cat2.jpg"))


def test_changed_settings_are_refused_unless_overwrite(ray_cluster, folder, tmp_path, tiny_checkpoint):
    job = make_job([folder], tmp_path / "out", tiny_checkpoint)
    first = run_label_job(job)
    changed = make_job([folder], tmp_path / "out", tiny_checkpoint, scoring=ScoringParams(
        crops=12, steps=2, expand_top=3, top_k=3, seed=5))
    with pytest.raises(ConfigError, match=r"crops.*--overwrite"):
        run_label_job(changed)
    assert read_output(job.output).num_rows == first.ok + first.errors  # nothing touched
    typo = replace(changed, overwrite=True, inputs=replace(changed.inputs, uris=(str(tmp_path / "typo"),)))
    with pytest.raises(SourceError, match="typo: no such file"):
        run_label_job(typo)
    assert read_output(job.output).num_rows == first.ok + first.errors  # the inputs are listed before removing
    relabelled = run_label_job(LabelJob(**{**changed.__dict__, "overwrite": True}))
    table = read_output(job.output)
    assert table.num_rows == relabelled.ok + relabelled.errors == first.ok + first.errors
    assert set(table.column("run_id").to_pylist()) == {relabelled.run_id}


def test_tar_shards_and_parquet_inputs(ray_cluster, tmp_path, tiny_checkpoint):
    shards = tmp_path / "shards"
    shards.mkdir()
    first = {"000001.jpg": encode(photos.astronaut()), "000001.json": b"{}",
             "000002.png": encode(photos.coffee(), "PNG")}
    (shards / "part-0000.tar").write_bytes(make_tar(first))
    (shards / "part-0001.tar").write_bytes(make_tar({"000003.jpg": b"broken"}))
    table = pa.table({"key": ["p1", "p2", "p3"],
                      "jpeg": [encode(photos.rocket()), encode(photos.chelsea()), None]})
    pq.write_table(table, tmp_path / "photos.parquet")
    inputs = InputConfig((str(shards / "*.tar"), str(tmp_path / "photos.parquet")),
                         image_column="jpeg", id_column="key")
    job = make_job(inputs, tmp_path / "out", tiny_checkpoint)
    summary = run_label_job(job)
    rows = {r["id"]: r for r in read_output(job.output).to_pylist()}
    tar0 = str(shards / "part-0000.tar")
    assert set(rows) == {f"{tar0}#000001.jpg", f"{tar0}#000002.png",
                         f"{shards / 'part-0001.tar'}#000003.jpg", "p1", "p2", "p3"}
    assert [rows[i]["status"] for i in ("p1", "p2", "p3")] == ["ok", "ok", "error"]
    assert rows[f"{tar0}#000002.png"]["status"] == "ok"
    assert (summary.ok, summary.errors) == (4, 2)
    again = run_label_job(job)  # every shard was read whole by the first run: none is read again
    assert (again.ok, again.errors, again.skipped_shards) == (0, 0, 3)
    assert read_output(job.output).num_rows == 6


def same_size_garbage(path) -> None:
    """Overwrite ``path`` with as many bytes of garbage, keeping its modification time."""
    stat = path.stat()
    path.write_bytes((b"not a tar " * (stat.st_size // 10 + 1))[:stat.st_size])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_shards_read_whole_are_read_again_only_when_changed(ray_cluster, tmp_path, tiny_checkpoint):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes(make_tar({"1.jpg": encode(photos.astronaut()), "2.jpg": encode(photos.coffee())}))
    (shards / "b.tar").write_bytes(make_tar({"3.jpg": encode(photos.rocket())}))
    job = make_job([shards / "*.tar", shards / "a.tar"], tmp_path / "out", tiny_checkpoint)
    first = run_label_job(job)
    assert (first.ok, first.errors, first.skipped_shards) == (3, 0, 0)  # a.tar, named twice, read once

    same_size_garbage(shards / "a.tar")  # same listing (size, time): a run that read it would fail or add errors
    (shards / "c.tar").write_bytes(make_tar({"4.jpg": encode(photos.chelsea())}))
    second = run_label_job(job)
    assert (second.ok, second.errors, second.skipped_shards) == (1, 0, 2)  # only c.tar was read

    (shards / "b.tar").write_bytes(make_tar({"3.jpg": encode(photos.rocket()), "5.jpg": encode(photos.camera())}))
    third = run_label_job(job)  # b.tar changed: read again, its labelled member dropped
    assert (third.ok, third.errors, third.skipped_shards) == (1, 0, 2)
    rows = read_output(job.output)
    assert sorted(rows.column("id").to_pylist()) == sorted(
        f"{shards / name}#{member}" for name, member in
        (("a.tar", "1.jpg"), ("a.tar", "2.jpg"), ("b.tar", "3.jpg"), ("c.tar", "4.jpg"), ("b.tar", "5.jpg")))
    assert set(rows.column("status").to_pylist()) == {"ok"}
    meta = json.loads((tmp_path / "out" / "_lgca" / "runs" / f"{third.run_id}.json").read_text())
    assert meta["counts"] == {"ok": 1, "error": 0, "skipped": 0, "skipped_shards": 2}


def test_a_shard_cut_short_is_read_again_and_records_without_data_are_ignored(ray_cluster, tmp_path,
                                                                             tiny_checkpoint):
    shards = tmp_path / "shards"
    shards.mkdir()
    whole = make_tar({"1.jpg": encode(photos.astronaut()), "2.jpg": encode(photos.coffee())})
    (shards / "a.tar").write_bytes(whole[:len(whole) - len(encode(photos.coffee())) // 2 - 1024])  # cut in 2.jpg
    (shards / "b.tar").write_bytes(make_tar({"3.jpg": encode(photos.rocket())}))
    job = make_job([shards / "*.tar"], tmp_path / "out", tiny_checkpoint)
    first = run_label_job(job)
    assert (first.ok, first.errors) == (2, 1)  # 1.jpg, 3.jpg, and the '<a.tar>#' row of the cut shard
    assert [uri for uri in pq.read_table(tmp_path / "out" / "_lgca" / "shards").column("uri").to_pylist()] == [
        str(shards / "b.tar")]  # a.tar is not taken as read whole
    (shards / "a.tar").write_bytes(whole[:len(whole) - len(encode(photos.coffee())) // 2])  # broken again
    assert run_label_job(job).skipped_shards == 1  # its '#' row is labelled already, yet it is not recorded
    (shards / "a.tar").write_bytes(whole)  # the shard arrives complete
    second = run_label_job(job)
    assert (second.ok, second.errors, second.skipped_shards) == (1, 0, 1)  # 2.jpg labelled now
    third = run_label_job(job)  # read to its end at last: recorded, not read again
    assert (third.ok, third.errors, third.skipped_shards) == (0, 0, 2)
    assert not (tmp_path / "out" / "_lgca" / "reading").exists() or not any(
        (tmp_path / "out" / "_lgca" / "reading").iterdir())  # every run removed its marks

    for path in (tmp_path / "out" / "data").iterdir():  # data deleted by hand, records left behind
        path.unlink()
    again = run_label_job(job)
    assert (again.ok, again.errors, again.skipped_shards) == (3, 0, 0)  # stale records are not trusted


def test_shard_records_are_not_trusted_when_a_data_file_is_lost(ray_cluster, tmp_path, tiny_checkpoint,
                                                                monkeypatch):
    import pipeline.data.output as output_module
    from pipeline.distributed import plan

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes(make_tar({"1.jpg": encode(photos.astronaut()), "2.jpg": encode(photos.coffee())}))
    (shards / "b.tar").write_bytes(make_tar({"3.jpg": encode(photos.rocket())}))
    job = make_job([shards / "*.tar"], tmp_path / "out", tiny_checkpoint)
    first = run_label_job(job)
    (first_file,) = (tmp_path / "out" / "data").iterdir()  # one actor call, one file
    (shards / "c.tar").write_bytes(make_tar({"3b.jpg": encode(photos.chelsea())}))
    assert (first.ok, run_label_job(job).ok) == (3, 1)
    first_file.write_bytes(b"PAR1 cut")  # unreadable now: removed by the next run, c.tar's file stays
    write = plan.write

    def fail(*args, **kwargs):
        raise RuntimeError("stopped before writing")

    monkeypatch.setattr(plan, "write", fail)  # the run that removes the file fails: the distrust must outlive it
    with pytest.raises(RuntimeError, match="stopped before writing"):
        run_label_job(job)
    assert not first_file.exists()
    monkeypatch.setattr(plan, "write", write)
    again = run_label_job(job)
    assert (again.ok, again.skipped_shards) == (3, 0)  # the records are ignored, the lost rows labelled again

    (shards / "d.tar").write_bytes(make_tar({"4.jpg": encode(photos.camera())}))
    real = output_module.error_rows

    def unreadable(fs, path):
        raise pa.ArrowInvalid("Parquet magic bytes not found")

    monkeypatch.setattr(output_module, "error_rows", unreadable)  # this run's own file cannot be read back
    third = run_label_job(job)
    assert (third.ok, third.skipped_shards) == (0, 3)
    assert not (tmp_path / "out" / "_lgca" / "shards" / f"{third.run_id}.parquet").exists()  # d.tar unrecorded
    monkeypatch.setattr(output_module, "error_rows", real)
    fourth = run_label_job(job)
    assert (fourth.ok, fourth.skipped_shards) == (1, 3)  # d.tar read again: its image labelled
    assert sorted(read_output(job.output).column("id").to_pylist()) == sorted(
        f"{shards / name}#{member}" for name, member in
        (("a.tar", "1.jpg"), ("a.tar", "2.jpg"), ("b.tar", "3.jpg"), ("c.tar", "3b.jpg"), ("d.tar", "4.jpg")))


def test_a_failed_run_records_no_shard(ray_cluster, tmp_path, tiny_checkpoint, monkeypatch):
    from pipeline.distributed import plan

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes(make_tar({"1.jpg": encode(photos.astronaut()), "2.jpg": encode(photos.coffee())}))
    job = make_job([shards / "a.tar"], tmp_path / "out", tiny_checkpoint)
    write = plan.write

    def write_then_fail(*args, **kwargs):
        write(*args, **kwargs)
        raise RuntimeError("stopped after writing")

    monkeypatch.setattr(plan, "write", write_then_fail)
    with pytest.raises(RuntimeError, match="stopped after writing"):
        run_label_job(job)
    assert read_output(job.output).num_rows == 2 and not (tmp_path / "out" / "_lgca" / "shards").exists()
    (failed,) = Output(job.output).runs()  # recorded all the same, with what it wrote
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: stopped after writing"
    assert failed["counts"]["ok"] == 2
    assert list((tmp_path / "out" / "_lgca" / "reading").iterdir()) == []  # its marks removed all the same
    monkeypatch.setattr(plan, "write", write)
    again = run_label_job(job)  # the shard is read again; its rows are in the output already
    assert (again.ok, again.errors, again.skipped_shards) == (0, 0, 0)
    assert run_label_job(job).skipped_shards == 1  # and recorded by the run that finished
    assert read_output(job.output).num_rows == 2


def test_s3_inputs_and_outputs(ray_cluster, moto_endpoint, bucket, tiny_checkpoint):
    objects = {f"photos/{name}.jpg": encode(make()) for name, make in PHOTOS.items()}
    objects["photos/broken.jpg"] = b"\xff\xd8 not really"
    upload(moto_endpoint, bucket, objects)
    storage = StorageConfig(endpoint_url=moto_endpoint)
    job = make_job([f"s3://{bucket}/photos/"], f"s3://{bucket}/labels", tiny_checkpoint, storage=storage)
    summary = run_label_job(job)
    assert (summary.ok, summary.errors) == (4, 1)
    table = read_output(job.output, storage)
    assert sorted(table.column("id").to_pylist()) == sorted(f"s3://{bucket}/{k}" for k in objects)
    where = Output(job.output, storage)
    assert [v for c in where.read_column("status") for v in c.to_pylist()].count("ok") == 4
    assert run_label_job(job).ok == 0  # incremental on S3 too


def test_bad_config_is_rejected_before_ray_starts(tmp_path, tiny_checkpoint, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(encode(photos.astronaut()))
    with pytest.raises(ConfigError, match="lgca-tinny.*not found"):
        run_label_job(make_job([folder], tmp_path / "o", tiny_checkpoint,
                               model=ModelConfig(name="lgca-tinny", pretrained="none", device="cpu")))
    with pytest.raises(ConfigError, match="no checkpoint file"):
        run_label_job(make_job([folder], tmp_path / "o", tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="not found"):
        run_label_job(make_job([folder], tmp_path / "o", tiny_checkpoint,
                               text=TextConfig(classes="cat,dog", descriptions=str(tmp_path / "nope.json"))))
    with pytest.raises(SourceError, match="no such file"):
        run_label_job(make_job([tmp_path / "absent"], tmp_path / "o", tiny_checkpoint))
    pq.write_table(pa.table({"image": [encode(photos.astronaut())], "label": [3]}), tmp_path / "hf.parquet")
    with pytest.raises(SourceError, match=r"hf.parquet: column 'id' not found; available: image, label; "
                                          r"pass --id-column .* or --id-column '' to number rows"):
        run_label_job(make_job([tmp_path / "hf.parquet"], tmp_path / "o", tiny_checkpoint))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    two_actors = ResourceConfig(actors_min=2, actors_max=2, cpus_per_actor=1)
    with pytest.raises(ConfigError, match=r"2 actor\(s\) of 1 CPUs leave none of this machine's 2 CPUs.*"
                                          r"--cpus-per-actor 0.5 or less"):
        run_label_job(make_job([folder], tmp_path / "o", tiny_checkpoint, resources=two_actors))


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_run_stopped_before_labelling_leaves_no_output_folder_it_created(tmp_path, tiny_checkpoint, monkeypatch,
                                                                           folder, stop):
    import pipeline.distributed.job as job_module

    def stopped(*args):
        raise stop("stopped")

    monkeypatch.setattr(job_module, "label_on_ray", stopped)
    monkeypatch.setattr(job_module, "stop_ray", lambda: None)  # the session's Ray stays up for other tests
    job = make_job([folder], tmp_path / "new" / "out", tiny_checkpoint)
    with pytest.raises(job_module.Interrupted if stop is KeyboardInterrupt else RuntimeError) as info:
        run_label_job(job)
    if stop is KeyboardInterrupt:
        assert str(info.value) == "interrupted after 0 images; rerun the same command to resume"
    assert not (tmp_path / "new").exists() and tmp_path.is_dir()  # what the run made, and only that
    (tmp_path / "kept").mkdir()  # an output folder made before: kept, with the run's record
    with pytest.raises(BaseException):
        run_label_job(replace(job, output=str(tmp_path / "kept")))
    (record,) = Output(str(tmp_path / "kept")).runs()
    assert record["counts"] == {"ok": 0, "error": 0, "skipped": 0, "skipped_shards": 0}
    assert record["status"] == ("interrupted" if stop is KeyboardInterrupt else "failed")
    assert record["error"] == (None if stop is KeyboardInterrupt else "RuntimeError: stopped")


def test_an_interrupted_run_is_recorded_with_the_rows_it_wrote(tmp_path, tiny_checkpoint, monkeypatch, folder):
    import pipeline.distributed.job as job_module
    from pipeline.data.rows import error_table

    def label_some(run, *args):
        table = error_table(["a", "b"], ["a", "b"], ["decode: x", "read: y"], [0, 0], [0, 0], run.run_id)
        (tmp_path / "out" / "data").mkdir(parents=True)
        pq.write_table(table, tmp_path / "out" / "data" / f"{run.run_id}_w_000000-0.parquet")
        raise KeyboardInterrupt

    monkeypatch.setattr(job_module, "label_on_ray", label_some)
    monkeypatch.setattr(job_module, "stop_ray", lambda: None)
    with pytest.raises(job_module.Interrupted, match="^interrupted after 2 images; rerun the same command"):
        run_label_job(make_job([folder], tmp_path / "out", tiny_checkpoint))
    (record,) = Output(str(tmp_path / "out")).runs()
    assert record["status"] == "interrupted" and record["counts"]["error"] == 2
    assert record["error_reasons"] == {"decode": 1, "read": 1}


def test_an_output_that_is_a_file_is_refused_before_ray_starts(tmp_path, tiny_checkpoint, folder):
    (tmp_path / "labels").write_text("a file")
    with pytest.raises(OutputError, match="labels is a file; give a folder"):
        run_label_job(make_job([folder], tmp_path / "labels", tiny_checkpoint))
    assert (tmp_path / "labels").read_text() == "a file"


def test_a_store_error_while_recording_shards_is_logged_not_raised(tmp_path, tiny_checkpoint, caplog):
    from pipeline.distributed.job import record_whole_shards
    from pipeline.data.output import ShardMarks

    class Unlistable(ShardMarks):
        def marked(self, uris):
            raise ConnectionResetError(104, "Connection reset by peer")

    job = make_job([tmp_path / "shards"], tmp_path / "out", tiny_checkpoint)
    output = Output(job.output)
    record_whole_shards(output, "r1", [("s3://in/a.tar", "10:etag")], Unlistable(output.reading("r1"), job.storage))
    assert "could not record the shards read whole" in caplog.text  # the run's rows are written: it goes on
    assert not (tmp_path / "out" / "_lgca" / "shards").exists()


def test_an_output_of_the_previous_version_is_continued_with_the_same_settings(tmp_path, tiny_checkpoint):
    """The previous version wrote a flat manifest (model, pretrained, scoring, text digests)."""
    job = make_job([tmp_path], tmp_path / "out", tiny_checkpoint)
    classes = load_class_set(job.text)
    scoring = dataclasses.asdict(job.scoring)
    scoring.pop("encode_batch_size")
    flat = {"model": job.model.name, "pretrained": job.model.pretrained, "scoring": scoring, "text": classes.digests()}
    output = Output(job.output)
    (tmp_path / "out" / "_lgca").mkdir(parents=True)
    (tmp_path / "out" / "_lgca" / "manifest.json").write_text(json.dumps(flat))
    (tmp_path / "out" / "data").mkdir()
    pq.write_table(SCHEMA.empty_table().drop_columns(["state_full", "state_steps"]),
                   tmp_path / "out" / "data" / "20250101T000000Z-aaaaaa_w_000000-0.parquet")
    output.check_manifest(fingerprint(job, classes, 64), overwrite=False)  # accepted: the same settings
    changed = replace(job, scoring=replace(job.scoring, seed=6))
    with pytest.raises(ConfigError, match=r"image.seed: 5 -> 6\)"):
        output.check_manifest(fingerprint(changed, classes, 64), overwrite=False)
