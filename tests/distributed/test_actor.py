"""The scoring UDFs without Ray: one output row per input row, failures isolated per image; stored
states scored as the model actor scores the images."""
from __future__ import annotations

from dataclasses import replace

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from skimage import data as photos

from pipeline.config import ModelConfig, ScoringParams, StatesConfig, StorageConfig
from pipeline.data.decode import DecodeLimits, decode_batch
from pipeline.data.rows import parquet_options
from pipeline.data.states import StateSpec
from pipeline.data.stored import SourceRead, read_source_file
from pipeline.distributed.actor import LabelActor, RelabelContext, score_source_rows
from pipeline.method.engine import Scorer
from pipeline.model.classes import ClassSet
from pipeline.model.loading import load_model
from tests.support import encode

CLASSES = ClassSet(names=("cat", "rocket", "coffee"), templates=("a photo of a {}.",),
                   descriptions=((), ("a tall launch vehicle",), ()))
SCORING = ScoringParams(crops=8, steps=2, expand_top=2, top_k=2)


@pytest.fixture(scope="module")
def actor(tiny_checkpoint):
    return LabelActor(ModelConfig(name="lgca-tiny", pretrained=str(tiny_checkpoint), device="cpu"),
                      CLASSES, SCORING, StorageConfig(), "run-7", batch_size=2)


def decoded(payloads: dict[str, bytes | None], errors: dict[str, str] | None = None) -> dict:
    ids = list(payloads)
    batch = {"id": ids, "uri": ids, "bytes": [payloads[i] for i in ids],
             "error": [(errors or {}).get(i) for i in ids]}
    return decode_batch(batch, DecodeLimits(max_short_side=128))


def test_every_row_comes_back_with_its_status(actor):
    batch = decoded({"cat": encode(photos.chelsea()), "bad": b"nope", "rocket": encode(photos.rocket()),
                     "unread": None}, errors={"unread": "read: FileNotFoundError: gone"})
    table = actor(batch)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert set(rows) == {"cat", "bad", "rocket", "unread"}
    assert rows["cat"]["status"] == rows["rocket"]["status"] == "ok"
    assert rows["bad"]["error"].startswith("decode") and rows["unread"]["error"] == "read: FileNotFoundError: gone"
    assert all(r["run_id"] == "run-7" for r in rows.values())
    assert len(rows["cat"]["steps"]) == 3 and len(rows["cat"]["topk_labels"]) == 2


def test_large_blocks_are_scored_batch_size_images_at_a_time(actor, monkeypatch):
    sizes = []
    real = actor.engine.score
    monkeypatch.setattr(actor.engine, "score", lambda images: sizes.append(len(images)) or real(images))
    photos_ = [photos.chelsea, photos.coffee, photos.rocket, photos.astronaut, photos.camera]
    table = actor(decoded({f"p{i}": encode(make()) for i, make in enumerate(photos_)}))
    assert sizes == [2, 2, 1] and table.num_rows == 5


def test_a_batch_with_no_errors_in_an_all_null_column(actor):
    batch = decoded({"cat": encode(photos.chelsea())})
    batch["error"] = np.array([np.nan], dtype=np.float32)  # how Ray Data hands over an all-null column
    assert [r["status"] for r in actor(batch).to_pylist()] == ["ok"]


def test_an_image_that_fails_scoring_becomes_an_error_row_alone(actor, monkeypatch):
    batch = decoded({"a": encode(photos.chelsea()), "b": encode(photos.coffee()), "c": encode(photos.rocket())})
    real = actor.engine.score

    def fragile(images):
        if any(image.image_id == "b" for image in images):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(images)

    monkeypatch.setattr(actor.engine, "score", fragile)
    rows = {r["id"]: r for r in actor(batch).to_pylist()}
    assert rows["b"]["status"] == "error" and "out of memory" in rows["b"]["error"]
    assert rows["a"]["status"] == rows["c"]["status"] == "ok"


def test_empty_batches_give_empty_tables(actor):
    assert actor(decoded({})).num_rows == 0


# ---- relabel's scoring of stored states ----------------------------------------------------

OTHER = ClassSet(names=("dog", "missile", "mug", "bird"), templates=("a photo of a {}.", "a {} in the wild."),
                 descriptions=(("a furry pet",), (), ("a cup for tea", "a coffee cup"), ()))


@pytest.mark.parametrize("method, steps", [("lgca", 2), ("lgca", 1), ("wca", 2), ("cupl", 2)])
def test_stored_states_are_scored_as_label_scores_the_images(tiny_checkpoint, tmp_path, method, steps):
    model = ModelConfig(name="lgca-tiny", pretrained=str(tiny_checkpoint), device="cpu")
    source = LabelActor(model, CLASSES, SCORING, StorageConfig(), "run-1", batch_size=4,
                        states=StatesConfig(dtype="float32"))
    batch = decoded({"cat": encode(photos.chelsea()), "bad": b"nope", "rocket": encode(photos.rocket()),
                     "coffee": encode(photos.coffee())})
    pq.write_table(source(batch), tmp_path / "source.parquet", **parquet_options())
    scoring = replace(SCORING, method=method, steps=steps, aggregation="last" if steps == 1 else "mean")
    read = SourceRead(StateSpec("float32", 64, 3), {"lgca": steps + 1, "wca": 1}.get(method, 0),
                      steps if method == "lgca" else 0, SCORING.expand_top)
    rows = pa.concat_tables(read_source_file(fsspec.filesystem("file"), str(tmp_path / "source.parquet"), read))
    bank = Scorer.for_classes(load_model(model), OTHER, scoring).bank
    got = {r["id"]: r for r in score_source_rows(rows, RelabelContext.of(bank, scoring, read, "run-2")).to_pylist()}
    direct = LabelActor(model, OTHER, scoring, StorageConfig(), "run-2", batch_size=4, states=StatesConfig(keep="none"))
    want = {r["id"]: r for r in direct(batch).to_pylist()}
    assert got.keys() == want.keys() == {"cat", "bad", "rocket", "coffee"}
    for image_id, row in want.items():
        mine = got[image_id]
        assert {k: v for k, v in mine.items() if "score" not in k and k != "steps"} == \
               {k: v for k, v in row.items() if "score" not in k and k != "steps"}, image_id
        if row["status"] == "ok":
            np.testing.assert_allclose(mine["topk_scores"], row["topk_scores"], atol=1e-5, rtol=0)
            assert [s["expanded_boxes"] for s in mine["steps"] or []] == [s["expanded_boxes"] for s in row["steps"] or []]
            assert [s["topk_labels"] for s in mine["steps"] or []] == [s["topk_labels"] for s in row["steps"] or []]
