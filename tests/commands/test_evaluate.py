"""``lgca eval`` on a small labelled set of real photos, checked against the engine run directly."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from skimage import data as photos

from pipeline.commands.evaluate import (EvalConfig, Sample, config_from_args, folder_samples, list_samples,
                                        load_sample, loaded_batches, parquet_labels, register, run_eval)
from pipeline.config import (ConfigError, InputConfig, ModelConfig, ResourceConfig, ScoringParams, SourceError,
                             StorageConfig, TextConfig)
from pipeline.data.decode import DecodeLimits, decode_image
from pipeline.method.engine import Engine, ImageInput
from pipeline.model.classes import BUNDLED_FOLDER, load_class_set
from pipeline.model.loading import load_model
from tests.support import encode, upload

CLASSES = ("astronaut", "cat", "coffee cup", "rocket", "galaxy", "camera", "dog", "bicycle")
METHODS = ("clip", "cupl", "wca", "lgca")
CORRUPT = b"\xff\xd8\xff\xe0 this is not a JPEG"


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


# folder name (differs from the class name in case and '_') -> photos of that class
FOLDERS = {
    "astronaut": lambda: [photos.astronaut(), photos.astronaut()[:, ::-1]],
    "Cat": lambda: [photos.chelsea(), photos.chelsea()[40:, 60:]],
    "coffee_cup": lambda: [photos.coffee(), photos.coffee()[:, ::-1]],
    "rocket": lambda: [photos.rocket(), photos.rocket()[50:400, 100:500]],
    "galaxy": lambda: [photos.hubble_deep_field()[:500, :700]],
    "camera": lambda: [_rgb(photos.camera())],
}
FOLDER_CLASS = {"astronaut": 0, "Cat": 1, "coffee_cup": 2, "rocket": 3, "galaxy": 4, "camera": 5}


def write_descriptions(folder: Path) -> str:
    """Two CuPL-style sentences per class, so cupl, wca and lgca differ from clip."""
    entries = {name: [f"A photo showing a {name} in the middle of the picture.",
                      f"An image where a {name} can clearly be seen by anyone."] for name in CLASSES}
    path = folder / "cupl.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return str(path)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """An ImageFolder tree of 12 photos in 6 class folders, plus one corrupt file."""
    root = tmp_path / "images"
    for folder, make in FOLDERS.items():
        (root / folder).mkdir(parents=True)
        for index, pixels in enumerate(make()):
            (root / folder / f"{index}.jpg").write_bytes(encode(np.ascontiguousarray(pixels)))
    (root / "rocket" / "broken.jpg").write_bytes(CORRUPT)
    return root


def reference(checkpoint: Path, descriptions: str, items: list[tuple[str, bytes]], batch_size: int) -> dict:
    """Per-image predictions from the engine run here directly; None for undecodable images.

    ``items``: (image id, encoded bytes) in the order eval reads them; they are scored in
    consecutive groups of ``batch_size`` items, as eval batches them. Each image gets
    ``{method: top-1 index}``, ``top5`` ``{method: set of indices}`` and ``steps`` (top-1 of S_t).
    """
    loaded = load_model(ModelConfig(name="lgca-tiny", pretrained=str(checkpoint), device="cpu"))
    text = json.loads(Path(descriptions).read_text())
    engine = Engine(loaded.model, loaded.tokenizer, CLASSES, [[f"a photo of a {n}."] for n in CLASSES],
                    [text[n] for n in CLASSES], ScoringParams(), loaded.preprocess, loaded.device)
    limits = DecodeLimits(max_short_side=math.ceil(loaded.preprocess.image_size / 0.5))
    predictions: dict[str, dict | None] = {}
    for start in range(0, len(items), batch_size):
        images = []
        for image_id, blob in items[start:start + batch_size]:
            decoded = decode_image(blob, limits)
            predictions[image_id] = None
            if not decoded.error:
                images.append(ImageInput(image_id, decoded.pixels, decoded.height, decoded.width))
        if not images:
            continue
        scores = engine.score(images)
        for row, image in enumerate(images):
            found = {method: int(scores.method(method)[row].numpy().argmax()) for method in METHODS}
            found["top5"] = {method: set(np.argsort(-scores.method(method)[row].numpy())[:5].tolist())
                             for method in METHODS}
            found["steps"] = [int(step[row].numpy().argmax()) for step in scores.steps]
            predictions[image.image_id] = found
    return predictions


def expected_counts(predictions: dict, labels: dict[str, int]) -> dict:
    """Correct top-1 / top-5 per method and top-1 per step, counted over the scored images."""
    scored = [(predictions[key], labels[key]) for key in labels if predictions.get(key) is not None]
    return {"top1": {m: sum(p[m] == label for p, label in scored) for m in METHODS},
            "top5": {m: sum(label in p["top5"][m] for p, label in scored) for m in METHODS},
            "steps": [sum(p["steps"][t] == label for p, label in scored) for t in range(4)]}


def folder_items(root: Path) -> tuple[list[tuple[str, bytes]], dict[str, int]]:
    """(path, bytes) of every file in sorted path order, and each path's class, from its folder."""
    paths = sorted(root.rglob("*.jpg"), key=str)
    return [(str(p), p.read_bytes()) for p in paths], {str(p): FOLDER_CLASS[p.parent.name] for p in paths}


def assert_counts_match(report: dict, expected: dict, scored: int) -> None:
    for method in METHODS:
        accuracy = report["accuracy"][method]
        assert accuracy["top1_correct"] == expected["top1"][method], method
        assert accuracy["top5_correct"] == expected["top5"][method], method
        assert accuracy["top1"] == pytest.approx(expected["top1"][method] / scored)
        assert accuracy["top5"] == pytest.approx(expected["top5"][method] / scored)
    assert report["lgca_steps_top1_correct"] == expected["steps"]
    assert report["lgca_steps_top1"] == pytest.approx([count / scored for count in expected["steps"]])


def test_eval_command_on_image_folder_matches_direct_engine_count(image_folder, tiny_checkpoint, tmp_path):
    descriptions = write_descriptions(tmp_path)
    parser = argparse.ArgumentParser(prog="lgca")
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "report"
    args = parser.parse_args([
        "eval", "--input", str(image_folder), "--classes", ",".join(CLASSES), "--descriptions", descriptions,
        "--model", "lgca-tiny", "--pretrained", str(tiny_checkpoint), "--device", "cpu",
        "--batch-size", "64", "--workers", "2", "--out-dir", str(out)])

    assert args.handler(args) == 0

    report = json.loads((out / "eval.json").read_text())
    items, labels = folder_items(image_folder)
    predictions = reference(tiny_checkpoint, descriptions, items, batch_size=64)
    expected = expected_counts(predictions, labels)
    assert (report["images"], report["scored"], report["errors"]) == (11, 10, 1)
    assert report["error_reasons"] == {"decode": 1}
    assert report["classes"] == 8 and report["top_k"] == 5 and report["images_per_second"] > 0
    assert_counts_match(report, expected, scored=10)

    table = pq.read_table(out / "predictions.parquet").to_pylist()
    assert [row["id"] for row in table] == [image_id for image_id, _ in items]
    for row in table:
        found = predictions[row["id"]]
        assert row["label"] == CLASSES[labels[row["id"]]]
        if found is None:
            assert row["id"].endswith("broken.jpg") and row["error"].startswith("decode:")
            assert row["lgca"] is None and row["steps"] is None
            continue
        assert [row[m] for m in METHODS] == [CLASSES[found[m]] for m in METHODS]
        assert row["steps"] == [CLASSES[i] for i in found["steps"]]
        assert set(row["lgca_topk"]) == {CLASSES[i] for i in found["top5"]["lgca"]}
    markdown = (out / "eval.md").read_text()
    lgca_pct = f"{100 * expected['top1']['lgca'] / 10:.2f}"
    assert f"| lgca | {lgca_pct} |" in markdown and "- decode: 1" in markdown


def test_eval_on_parquet_with_label_column_matches_direct_engine_count(tiny_checkpoint, tmp_path):
    descriptions = write_descriptions(tmp_path)
    keys, blobs, folders = [], [], []
    for folder, make in FOLDERS.items():
        for index, pixels in enumerate(make()):
            keys.append(f"{folder}-{index}")
            blobs.append(encode(np.ascontiguousarray(pixels)))
            folders.append(folder)
    keys[3:3], blobs[3:3], folders[3:3] = ["corrupt", "missing"], [CORRUPT, None], ["rocket", "galaxy"]
    items = [(key, blob) for key, blob in zip(keys, blobs) if blob is not None]
    predictions = reference(tiny_checkpoint, descriptions, items, batch_size=1)
    # The first six scored images are labelled with the class the engine predicts for them with
    # lgca, so top-1 counts are not all zero with random weights; the rest keep their folder's class.
    labels = {key: FOLDER_CLASS[folder] for key, folder in zip(keys, folders)}
    for key in [key for key in keys if predictions.get(key)][:6]:
        labels[key] = predictions[key]["lgca"]
    written = [CLASSES[labels[key]].upper().replace(" ", "_") if i % 2 else CLASSES[labels[key]]
               for i, key in enumerate(keys)]  # every other name in upper case and with '_'
    path = tmp_path / "set.parquet"
    pq.write_table(pa.table({"key": keys, "img": pa.array(blobs, pa.binary()), "cls": written}), path,
                   row_group_size=5)
    cfg = EvalConfig(inputs=InputConfig((str(path),), image_column="img", id_column="key"),
                     text=TextConfig(classes=",".join(CLASSES), descriptions=descriptions),
                     model=ModelConfig(name="lgca-tiny", pretrained=str(tiny_checkpoint), device="cpu"),
                     resources=ResourceConfig(batch_size=1), label_column="cls", workers=2)

    report = run_eval(cfg).to_json()

    expected = expected_counts(predictions, labels)
    assert expected["top1"]["lgca"] >= 6
    assert (report["images"], report["scored"], report["errors"]) == (12, 10, 2)
    assert report["error_reasons"] == {"decode": 1, "parquet": 1}
    assert_counts_match(report, expected, scored=10)


def test_folder_without_a_class_is_an_error_before_the_model_loads(image_folder):
    (image_folder / "Sea_Lion").mkdir()
    (image_folder / "Sea_Lion" / "0.jpg").write_bytes(encode(photos.coffee()))
    (image_folder / "loose.jpg").write_bytes(encode(photos.coffee()))
    cfg = EvalConfig(inputs=InputConfig((str(image_folder),)), text=TextConfig(classes=",".join(CLASSES)),
                     model=ModelConfig(name="lgca-tiny", pretrained="/no/such/checkpoint.pt", device="cpu"))
    with pytest.raises(ConfigError, match=r"2 class folders match no class of --classes .*: '\(images outside "
                                          r"any class folder\)' \(1 images\), 'Sea_Lion' \(1 images\); rename"):
        run_eval(cfg)


def test_parquet_labels_accept_names_and_indices_and_reject_others(tmp_path):
    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"image": pa.array([b"x"] * 3, pa.binary()), "name": ["Coffee_Cup", " DOG ", "cat"],
                             "index": [7, 0, 2], "bad": ["cat", "sea lion", "dog"]}), path)
    base = EvalConfig(inputs=InputConfig((str(path),)), text=TextConfig(classes="x"))

    def labels(column: str) -> list[int]:
        return parquet_labels(str(path), dataclasses.replace(base, label_column=column), CLASSES)

    assert labels("name") == [2, 6, 1]
    assert labels("index") == [7, 0, 2]
    with pytest.raises(ConfigError, match=r"row 1: label 'sea lion' is neither a class name"):
        labels("bad")
    with pytest.raises(SourceError, match="label column 'cls' not found; available: image, name, index, bad"):
        labels("cls")
    path.write_bytes(b"not parquet")
    with pytest.raises(SourceError, match=r"labels.parquet: cannot be read as Parquet \(ArrowInvalid"):
        labels("name")


def eval_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval"] + argv)


def test_flags_fill_the_label_configs_with_their_defaults_and_method_is_always_lgca():
    cfg = config_from_args(eval_args(["--input", "s3://b/places", "--input", "more.parquet", "--classes", "cub",
                                      "--alpha", "0.7", "--steps", "2", "--batch-size", "8", "--image-column", "img",
                                      "--anon", "--precision", "bf16", "--label-column", "y"]))
    assert cfg.inputs == InputConfig(uris=("s3://b/places", "more.parquet"), image_column="img")
    assert cfg.inputs.id_column == "id" and cfg.inputs.format == "auto"  # lgca label's defaults
    assert cfg.resources == ResourceConfig(batch_size=8)
    assert cfg.scoring == ScoringParams(method="lgca", alpha=0.7, steps=2)
    assert cfg.text == TextConfig(classes="cub")
    assert cfg.model == ModelConfig(precision="bf16")
    assert (cfg.label_column, cfg.workers, cfg.storage.anon) == ("y", 4, True)
    own = config_from_args(eval_args(["--input", "x", "--classes", "a", "--workers", "2", "--id-column", "",
                                      "--max-pixels", "1000", "--input-format", "parquet"]))
    assert (own.workers, own.inputs.id_column, own.inputs.format, own.resources.max_pixels) == (2, "", "parquet", 1000)
    with pytest.raises(ConfigError, match="eval scores with lgca"):
        EvalConfig(inputs=InputConfig(("x",)), text=TextConfig(classes="a"), scoring=ScoringParams(method="wca"))


def test_label_checks_apply_and_eval_refuses_tar_and_no_workers():
    cases = {("--batch-size", "0"): "batch_size: must be at least 1, got 0",  # lgca label's checks
             ("--image-column", ""): "image_column: must name the Parquet column",
             ("--input-format", "tar"): "input_format: 'tar': eval reads ImageFolder trees (files) or Parquet",
             ("--workers", "0"): "workers: must be at least 1, got 0"}
    for flag, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            config_from_args(eval_args(["--input", "x", "--classes", "a", *flag]))
    with pytest.raises(SystemExit):  # --input is required, as in lgca label
        eval_args(["--classes", "a"])


def test_parquet_without_the_default_id_column_is_refused_with_the_fix_before_the_model_loads(tmp_path):
    path = tmp_path / "set.parquet"
    pq.write_table(pa.table({"image": pa.array([encode(photos.coffee())], pa.binary()), "label": ["coffee cup"]}),
                   path)
    cfg = EvalConfig(inputs=InputConfig((str(path),)), text=TextConfig(classes=",".join(CLASSES)),
                     model=ModelConfig(name="lgca-tiny", pretrained="/no/such/checkpoint.pt", device="cpu"))
    with pytest.raises(SourceError) as err:
        run_eval(cfg)
    assert str(err.value) == (f"{path}: column 'id' not found; available: image, label; pass --id-column with the "
                              "column of image ids, or --id-column '' to number rows by file and position")
    numbered = dataclasses.replace(cfg, inputs=InputConfig((str(path),), id_column=""))
    assert [(s.id, s.label) for s in list_samples(numbered, CLASSES)] == [(f"{path}#0", 2)]


def test_several_inputs_folders_then_parquet_files_each_once(image_folder, tmp_path):
    path = tmp_path / "set.parquet"
    pq.write_table(pa.table({"image": pa.array([encode(photos.rocket())] * 2, pa.binary()), "label": ["rocket", "Cat"],
                             "id": ["r", "c"]}), path)
    cfg = EvalConfig(inputs=InputConfig((str(path), str(image_folder), str(tmp_path / "*.parquet"))),
                     text=TextConfig(classes=",".join(CLASSES)))
    samples = list(list_samples(cfg, CLASSES))
    _, labels = folder_items(image_folder)
    assert [(s.id, s.label) for s in samples] == list(labels.items()) + [("r", 3), ("c", 1)]


def test_loaded_batches_come_in_order_in_batches_of_batch_size():
    blobs = [encode(photos.coffee()), CORRUPT, encode(photos.rocket()), encode(photos.chelsea()), CORRUPT]
    samples = [Sample(id=str(i), uri="mem", label=i, data=blob) for i, blob in enumerate(blobs)]
    cfg = EvalConfig(inputs=InputConfig(("x",)), text=TextConfig(classes="a"),
                     resources=ResourceConfig(batch_size=2), workers=2)
    batches = list(loaded_batches(iter(samples), cfg, DecodeLimits(max_short_side=64)))
    assert [[sample.id for sample, _ in batch] for batch in batches] == [["0", "1"], ["2", "3"], ["4"]]
    decoded = [d for batch in batches for _, d in batch]
    assert [d.error is None for d in decoded] == [True, False, True, True, False]
    assert [(d.height, d.width) for d in decoded if d.error is None] == [(400, 600), (427, 640), (300, 451)]


def test_a_set_where_nothing_decodes_reports_no_accuracy_and_fails(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "images" / "cat").mkdir(parents=True)
    (tmp_path / "images" / "cat" / "0.jpg").write_bytes(CORRUPT)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--input", str(tmp_path / "images"), "--classes", "cat,dog",
                              "--model", "lgca-tiny", "--pretrained", str(tiny_checkpoint), "--device", "cpu",
                              "--json", str(tmp_path / "r.json")])
    assert args.handler(args) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["accuracy"]["lgca"] == {"top1": None, "top5": None, "top1_correct": 0, "top5_correct": 0}
    assert report["top_k"] == 2 and report["errors"] == 1
    assert "none of the 1 images could be scored" in capsys.readouterr().err


def test_image_folder_on_object_storage_is_listed_labelled_and_read(moto_endpoint, bucket):
    upload(moto_endpoint, bucket, {"set/Cat/a.jpg": encode(photos.chelsea()),
                                   "set/coffee_cup/b.png": encode(photos.coffee(), "PNG"),
                                   "set/coffee_cup/deeper/c.jpg": encode(photos.coffee()[::2, ::2]),
                                   "set/notes.txt": b"not an image"})
    cfg = EvalConfig(inputs=InputConfig((f"s3://{bucket}/set/",)), text=TextConfig(classes=",".join(CLASSES)),
                     storage=StorageConfig(endpoint_url=moto_endpoint))

    samples = folder_samples(cfg.inputs.uris[0], cfg, CLASSES)

    assert [(s.id, s.label) for s in samples] == [(f"s3://{bucket}/set/Cat/a.jpg", 1),
                                                  (f"s3://{bucket}/set/coffee_cup/b.png", 2),
                                                  (f"s3://{bucket}/set/coffee_cup/deeper/c.jpg", 2)]
    decoded = load_sample(samples[1], cfg.storage, DecodeLimits(max_short_side=128))
    assert decoded.error is None and (decoded.height, decoded.width) == (400, 600)
    assert decoded.pixels.shape == (128, 192, 3)
    missing = load_sample(Sample(id="x", uri=f"s3://{bucket}/set/Cat/gone.jpg", label=1), cfg.storage,
                          DecodeLimits(max_short_side=128))
    assert missing.error.startswith("read: FileNotFoundError")


def test_an_image_that_fails_scoring_is_an_error_and_the_rest_are_scored(image_folder, tiny_checkpoint,
                                                                          tmp_path, monkeypatch):
    descriptions = write_descriptions(tmp_path)
    parser = argparse.ArgumentParser(prog="lgca")
    register(parser.add_subparsers(dest="command", required=True))

    def evaluate(out: Path) -> tuple[dict, dict]:
        args = parser.parse_args([
            "eval", "--input", str(image_folder), "--classes", ",".join(CLASSES), "--descriptions", descriptions,
            "--model", "lgca-tiny", "--pretrained", str(tiny_checkpoint), "--device", "cpu",
            "--batch-size", "64", "--out-dir", str(out)])
        assert args.handler(args) == 0
        rows = {row["id"]: row for row in pq.read_table(out / "predictions.parquet").to_pylist()}
        return json.loads((out / "eval.json").read_text()), rows

    _, clean = evaluate(tmp_path / "clean")
    culprit = sorted(key for key, row in clean.items() if row["error"] is None)[3]
    real = Engine.score

    def score(self, images):
        if any(image.image_id == culprit for image in images):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, images)

    monkeypatch.setattr(Engine, "score", score)
    report, rows = evaluate(tmp_path / "failing")
    assert (report["images"], report["scored"], report["errors"]) == (11, 9, 2)
    assert report["error_reasons"] == {"decode": 1, "score": 1}
    assert rows[culprit]["error"] == "score: RuntimeError: CUDA out of memory (simulated)"
    assert rows[culprit]["lgca"] is None
    for key, row in rows.items():  # every other image gets the prediction it gets in one batch
        if key != culprit:
            assert {m: row[m] for m in METHODS} == {m: clean[key][m] for m in METHODS}, key


def test_eval_with_a_bundled_set_by_name_records_what_it_read(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "oxford_pet"  # the images, in a folder named like the set: no clash with --classes
    for folder, pixels in (("Abyssinian", photos.chelsea()), ("Bengal", photos.chelsea()[::-1])):
        (root / folder).mkdir(parents=True)
        (root / folder / "0.jpg").write_bytes(encode(np.ascontiguousarray(pixels)))
    args = eval_args(["--input", "oxford_pet", "--classes", "oxford_pet", "--descriptions", "oxford_pet",
                      "--descriptions-format", "descriptors", "--templates", "oxford_pet", "--model", "lgca-tiny",
                      "--pretrained", str(tiny_checkpoint), "--device", "cpu", "--crops", "4", "--steps", "1",
                      "--expand-top", "2", "--json", "report.json"])
    assert args.handler(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["classes"], report["images"], report["scored"]) == (37, 2, 2)
    assert report["inputs"] == ["oxford_pet"]
    assert report["text_sources"] == {"classes": "bundled:oxford_pet/classes.json",
                                      "descriptions": "bundled:oxford_pet/descriptors.json",
                                      "descriptions_format": "descriptors",
                                      "templates": "bundled:oxford_pet/templates.json"}
    files = BUNDLED_FOLDER / "oxford_pet"
    by_path = load_class_set(TextConfig(classes=str(files / "classes.json"), descriptions=str(files / "descriptors.json"),
                                        templates=str(files / "templates.json")))
    assert report["text_digests"] == by_path.digests()
