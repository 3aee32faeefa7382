"""A labelled output of real photos, made once per session by the real pipeline (local Ray,
lgca-tiny), for the commands that read outputs (report, export)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from skimage import data as photos

from pipeline.config import InputConfig, LabelJob, ModelConfig, ResourceConfig, ScoringParams, TextConfig
from pipeline.data.output import Output
from pipeline.model.loading import register_builtin_configs
from tests.support import encode, make_tar

CLASSES = "cat,astronaut,coffee,rocket,camera man,moon,coins"
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "moon", "page", "clock", "coins",
          "hubble_deep_field", "immunohistochemistry", "colorwheel", "grass", "brick")
TAR_MEMBERS = {"shard/cat.jpg": "chelsea", "shard/text.png": "text"}
# Random lgca-tiny weights label nearly every photo alike; with this seed they give these
# photos three different labels, so the per-label parts of a report have something to show.
VARIED_SEED = 7


@dataclass(frozen=True)
class Labelled:
    """The output folder, its rows (read back with pyarrow), and the input image deleted since."""

    root: Path
    images: Path
    gone: str  # id of an image labelled and then deleted

    def rows(self) -> pa.Table:
        return pa.concat_tables([pq.read_table(p) for p in sorted((self.root / "data").glob("*.parquet"))])


def write_inputs(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in PHOTOS:
        pixels = getattr(photos, name)()
        (folder / f"{name}.jpg").write_bytes(encode(pixels, "JPEG", quality=90))
    (folder / "gone.jpg").write_bytes(encode(photos.rocket()[::2, ::2], "JPEG"))
    (folder / "garbage.jpg").write_bytes(bytes(range(256)) * 4)
    (folder / "zero.png").write_bytes(b"")
    members = {name: encode(np.asarray(getattr(photos, photo)()), "PNG" if name.endswith(".png") else "JPEG")
               for name, photo in TAR_MEMBERS.items()}
    (folder / "shards").mkdir()
    (folder / "shards" / "part-0.tar").write_bytes(make_tar(members))


@pytest.fixture(scope="session")
def varied_checkpoint(tmp_path_factory) -> Path:
    """A random-weight lgca-tiny state_dict (seed VARIED_SEED)."""
    register_builtin_configs()
    torch.manual_seed(VARIED_SEED)
    path = tmp_path_factory.mktemp("varied") / "tiny.pt"
    torch.save(open_clip.create_model("lgca-tiny").state_dict(), path)
    return path


@pytest.fixture(scope="session")
def labelled(ray_cluster, tmp_path_factory, varied_checkpoint) -> Labelled:
    """19 loose images (14 photos, one deleted after labelling, 2 broken files) and a tar shard
    of 2 photos, labelled by `lgca label`'s job into OUTPUT: 17 ok rows and 2 error rows."""
    from pipeline.distributed.job import run_label_job

    root = tmp_path_factory.mktemp("labelled")
    images = root / "images"
    write_inputs(images)
    job = LabelJob(inputs=InputConfig((str(images), str(images / "shards" / "part-0.tar")), format="auto"),
                   output=str(root / "out"), text=TextConfig(classes=CLASSES),
                   model=ModelConfig(name="lgca-tiny", pretrained=str(varied_checkpoint), device="cpu"),
                   scoring=ScoringParams(crops=10, steps=2, expand_top=3, top_k=3, seed=5),
                   resources=ResourceConfig(batch_size=8, max_pixels=2_000_000))
    summary = run_label_job(job)
    assert (summary.ok, summary.errors) == (17, 2), summary
    (images / "gone.jpg").unlink()
    assert Output(job.output).runs()  # the run record the report lists
    labelled = Labelled(root / "out", images, str(images / "gone.jpg"))
    labels = set(labelled.rows()["label"].drop_null().to_pylist())
    assert len(labels) >= 2, f"seed {VARIED_SEED} no longer gives varied labels ({labels}); pick another"
    return labelled
