"""lgca export: Label Studio, FiftyOne and CSV files checked against each format's documented
schema, and loaded with the tools' own Python packages (label-studio-sdk's LabelInterface,
FiftyOne's dataset importer; neither needs a running service)."""
from __future__ import annotations

import csv
import json
import urllib.request
import xml.etree.ElementTree as ET

import pyarrow.parquet as pq
import pytest
import skimage.data
import torch

from pipeline.cli import main
from pipeline.commands.export import export, sample_key
from pipeline.config import QueryError, StorageConfig
from pipeline.data.output import Output
from pipeline.data.review import Band
from pipeline.data.rows import scored_table
from pipeline.method.engine import BatchScores, ImageStates
from pipeline.storage import write_json
from tests.commands.conftest import CLASSES
from tests.support import encode, upload

MODEL_VERSION_PREFIX = "lgca-tiny ("


def ok_rows(labelled) -> list[dict]:
    """The ok rows as the export orders them: lowest margin first."""
    rows = [r for r in labelled.rows().to_pylist() if r["status"] == "ok"]
    return sorted(rows, key=lambda r: (r["margin"], r["id"]))


def test_labelstudio_tasks_and_config(labelled, tmp_path, capsys):
    target = tmp_path / "ls"
    assert main(["export", str(labelled.root), "--format", "labelstudio", "-o", str(target)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{target}: 17 rows (labelstudio)"
    assert "2 of them are images inside tar or Parquet inputs" in err
    config = ET.fromstring((target / "config.xml").read_text())
    tasks = json.loads((target / "tasks.json").read_text())
    rows = ok_rows(labelled)
    # the documented format: a list of tasks {data: {image, ...}, predictions: [{model_version, score, result}]}
    # whose choices regions name the config's Choices control (from_name) and Image object (to_name)
    assert config.tag == "View"
    [image_tag] = config.findall("Image")
    [choices_tag] = config.findall("Choices")
    assert image_tag.attrib == {"name": "image", "value": "$image"}
    assert (choices_tag.get("name"), choices_tag.get("toName"), choices_tag.get("choice")) == ("label", "image", "single")
    assert [c.get("value") for c in choices_tag.findall("Choice")] == CLASSES.split(",")
    assert [t["data"]["id"] for t in tasks] == [r["id"] for r in rows]
    for task, row in zip(tasks, rows):
        assert set(task) == {"data", "predictions"}
        assert task["data"]["image"] == (row["uri"] if row["id"] == row["uri"] else row["id"])
        assert task["data"]["margin"] == pytest.approx(row["margin"]) and task["data"]["runner_up"] == row["topk_labels"][1]
        [prediction] = task["predictions"]
        assert prediction["model_version"].startswith(MODEL_VERSION_PREFIX) and prediction["model_version"].endswith(", lgca")
        assert prediction["score"] == pytest.approx(row["score"])
        assert prediction["result"] == [{"from_name": "label", "to_name": "image", "type": "choices",
                                         "value": {"choices": [row["label"]]}}]

    from label_studio_sdk.label_interface import LabelInterface
    from label_studio_sdk.label_interface.objects import PredictionValue

    interface = LabelInterface((target / "config.xml").read_text())
    assert interface.get_control("label").labels == CLASSES.split(",")
    assert all(obj.value_name in task["data"] for obj in interface.objects for task in tasks)
    assert all(interface.validate_prediction(task["predictions"][0]) for task in tasks)
    assert PredictionValue(**tasks[0]["predictions"][0]).score == pytest.approx(rows[0]["score"])
    wrong = json.loads(json.dumps(tasks[0]["predictions"][0]))
    wrong["result"][0]["value"]["choices"] = ["zebra"]
    assert not interface.validate_prediction(wrong)  # the SDK's check does look at the choices


def test_fiftyone_dataset_with_confidences(labelled, tmp_path):
    target = tmp_path / "fo"
    count, inside = export(str(labelled.root), "fiftyone", str(target), StorageConfig())
    rows = ok_rows(labelled)
    assert (count, inside) == (17, 2)
    labels = json.loads((target / "labels.json").read_text())
    paths = json.loads((target / "data.json").read_text())
    # the documented layout: labels.json {classes: [...], labels: {key: {label, confidence}}}, data.json {key: path}
    assert set(labels) == {"classes", "labels"} and labels["classes"] == CLASSES.split(",")
    assert list(labels["labels"]) == list(paths) == [sample_key(r["id"]) for r in rows]
    for row in rows:
        assert labels["labels"][sample_key(row["id"])] == {"label": row["label"], "confidence": pytest.approx(row["score"])}


def test_fiftyone_reads_the_export_with_its_own_importer(labelled, tmp_path, monkeypatch):
    """Where fiftyone is installed (not in the test extra: it brings its own MongoDB, and with s3fs's
    botocore pin it sends pip backtracking for over ten minutes; `pip install fiftyone` to run this)."""
    importers = pytest.importorskip("fiftyone.utils.data.importers", reason="fiftyone is not installed")
    target = tmp_path / "fo"
    export(str(labelled.root), "fiftyone", str(target), StorageConfig())
    rows = ok_rows(labelled)
    monkeypatch.setenv("FIFTYONE_DO_NOT_TRACK", "true")
    FiftyOneImageClassificationDatasetImporter = importers.FiftyOneImageClassificationDatasetImporter

    importer = FiftyOneImageClassificationDatasetImporter(str(target), data_path="data.json")
    with importer:
        assert importer.get_dataset_info() == {"classes": CLASSES.split(",")}
        loaded = {path: (label.label, label.confidence) for path, _, label in importer}
    want = {(r["uri"] if r["id"] == r["uri"] else r["id"]): (r["label"], pytest.approx(r["score"])) for r in rows}
    assert loaded == want


def test_csv_with_review_band_and_where(labelled, tmp_path):
    rows = ok_rows(labelled)
    edge = rows[3]["margin"]  # a band ending exactly at a row's margin keeps that row
    target = tmp_path / "band.csv"
    assert main(["export", str(labelled.root), "--format", "csv", "-o", str(target),
                 "--review-band", f"0,{edge!r}"]) == 0
    got = list(csv.DictReader(target.open()))
    assert [g["id"] for g in got] == [r["id"] for r in rows if r["margin"] <= edge] == [r["id"] for r in rows[:4]]
    assert [float(g["margin"]) for g in got] == [r["margin"] for r in rows[:4]]
    assert list(got[0]) == ["id", "image", "uri", "label", "score", "margin", "runner_up", "clip_label", "cupl_label",
                            "wca_label", "run_id"]
    label = rows[0]["label"]
    count, _ = export(str(labelled.root), "csv", str(tmp_path / "where.csv"), StorageConfig(),
                      where=f"label = '{label}'", band=Band(0.0, 1.0))
    assert count == sum(r["label"] == label for r in rows)


@pytest.mark.parametrize("text", ["0.1", "a,b", "0.2,0.1", "0,inf"])
def test_review_band_must_be_two_ordered_numbers(text):
    with pytest.raises(QueryError, match="--review-band"):
        Band.parse(text)


def test_presigned_urls_for_s3_images(tmp_path, moto_endpoint, bucket):
    """Rows whose images are on S3: --presign gives URLs that fetch the image without credentials."""
    photo = encode(skimage.data.coffee(), "JPEG")
    upload(moto_endpoint, bucket, {"photos/coffee.jpg": photo})
    uri = f"s3://{bucket}/photos/coffee.jpg"
    scores = torch.tensor([[0.31, 0.25]])
    root = tmp_path / "out"
    (root / "data").mkdir(parents=True)
    pq.write_table(scored_table([uri], [uri], [600], [400], BatchScores(clip=scores, cupl=scores, states=ImageStates(full=torch.ones(len(scores), 4) / 2)), ["coffee", "tea"],
                                "clip", 2, "run"), root / "data" / "run_a_0.parquet")
    write_json(Output(str(root)).manifest, {"model": "ViT-B-32", "pretrained": "openai",
                                            "scoring": {"method": "clip"}}, StorageConfig())
    storage = StorageConfig(endpoint_url=moto_endpoint)
    export(str(root), "csv", str(tmp_path / "plain.csv"), storage)
    assert next(csv.DictReader((tmp_path / "plain.csv").open()))["image"] == uri
    export(str(root), "labelstudio", str(tmp_path / "ls"), storage, presign=600)
    [task] = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    url = task["data"]["image"]
    assert url.startswith(f"{moto_endpoint}/{bucket}/photos/coffee.jpg?") and "Signature" in url
    assert task["predictions"][0]["model_version"] == "ViT-B-32 (openai), clip"
    with urllib.request.urlopen(url) as response:  # no credentials: the signature is the access
        assert response.read() == photo
