"""The GPU path: the engine on CUDA in fp32/fp16/bf16, and the pipeline with a GPU model actor.

These run only where CUDA is available (CI machines have no GPU; the results of the last
GPU run are in docs/benchmarks.md). They need no S3 server, so they also run with
``python -m pytest --noconftest tests/test_gpu.py`` on a machine without moto.
"""
from __future__ import annotations

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from skimage import data as photos

from pipeline.config import InputConfig, LabelJob, ModelConfig, ResourceConfig, ScoringParams, TextConfig
from pipeline.data.decode import DecodeLimits, decode_image
from pipeline.method.engine import BatchScores, Engine, ImageInput
from pipeline.model.classes import load_class_set
from pipeline.model.loading import load_model, register_builtin_configs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CLASSES = "cat,astronaut,coffee,rocket,camera man"
SCORING = ScoringParams(crops=12, steps=2, expand_top=3, top_k=3, seed=11)
PHOTOS = (photos.astronaut, photos.chelsea, photos.coffee, photos.rocket, photos.hubble_deep_field)
METHODS = ("clip", "cupl", "wca", "lgca")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random lgca-tiny weights saved as a state_dict (fixed seed)."""
    register_builtin_configs()
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("gpu") / "tiny.pt"
    torch.save(open_clip.create_model("lgca-tiny").state_dict(), path)
    return path


def jpegs() -> list[bytes]:
    import io

    from PIL import Image

    out = []
    for make in PHOTOS:
        buffer = io.BytesIO()
        Image.fromarray(make()).save(buffer, format="JPEG", quality=92)
        out.append(buffer.getvalue())
    return out


def score(checkpoint, device: str, precision: str, only: int | None = None, folder=None) -> BatchScores:
    """Every photo (or photo ``only``) scored in one batch by the engine on ``device`` in ``precision``.

    Ids (which seed the boxes) are the pipeline's, the file paths, when ``folder`` is given.
    """
    loaded = load_model(ModelConfig(name="lgca-tiny", pretrained=str(checkpoint), device=device,
                                    precision=precision))
    engine = Engine.for_classes(loaded, load_class_set(TextConfig(classes=CLASSES)), SCORING)
    limits = DecodeLimits.for_model(loaded.preprocess.image_size, SCORING)
    images = []
    for i, blob in enumerate(jpegs()):
        decoded = decode_image(blob, limits)
        image_id = f"photo-{i}" if folder is None else str(folder / f"photo-{i}.jpg")
        images.append(ImageInput(image_id, decoded.pixels, decoded.height, decoded.width))
    return engine.score(images if only is None else images[only:only + 1])


def test_engine_on_the_gpu_matches_the_cpu(checkpoint):
    cpu, gpu = score(checkpoint, "cpu", "fp32"), score(checkpoint, "cuda", "fp32")
    for method in METHODS:
        np.testing.assert_allclose(getattr(gpu, method).cpu().numpy(), getattr(cpu, method).numpy(), atol=2e-4)
        assert getattr(gpu, method).argmax(1).tolist() == getattr(cpu, method).argmax(1).tolist()
    for step, (boxes_gpu, boxes_cpu) in enumerate(zip(gpu.boxes, cpu.boxes)):
        np.testing.assert_allclose(boxes_gpu.cpu().numpy(), boxes_cpu.numpy(), atol=1e-4, err_msg=f"step {step}")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_the_gpu_stays_close_to_fp32(checkpoint, precision):
    full, half = score(checkpoint, "cuda", "fp32"), score(checkpoint, "cuda", precision)
    tolerance = 5e-3 if precision == "fp16" else 3e-2
    for method in METHODS:
        ref, got = getattr(full, method).cpu().float(), getattr(half, method).cpu().float()
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=tolerance)
        top2 = ref.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance  # a clear fp32 winner must stay the winner
        assert got.argmax(1)[clear].tolist() == ref.argmax(1)[clear].tolist()


def test_pipeline_runs_its_model_actor_on_the_gpu(checkpoint, tmp_path):
    import ray

    from pipeline.distributed.job import run_label_job

    folder = tmp_path / "images"
    folder.mkdir()
    for i, blob in enumerate(jpegs()):
        (folder / f"photo-{i}.jpg").write_bytes(blob)
    job = LabelJob(inputs=InputConfig((str(folder),)), output=str(tmp_path / "labels"),
                   text=TextConfig(classes=CLASSES), scoring=SCORING,
                   # fp16 is refused on a CPU: rows in fp16 can only come from the GPU actor
                   model=ModelConfig(name="lgca-tiny", pretrained=str(checkpoint), device="cuda", precision="fp16"),
                   resources=ResourceConfig(gpus_per_actor=1, batch_size=1))
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False)
    try:
        summary = run_label_job(job)
    finally:
        ray.shutdown()
    rows = pq.read_table(tmp_path / "labels" / "data").to_pylist()
    assert (summary.ok, summary.errors) == (len(PHOTOS), 0), [row["error"] for row in rows]
    # one image per engine call on both sides, so the same kernels see the same inputs
    expected = torch.cat([score(checkpoint, "cuda", "fp16", only=i, folder=folder).lgca
                          for i in range(len(PHOTOS))]).float()
    names = CLASSES.split(",")
    by_uri = {row["uri"].rsplit("/", 1)[-1]: row for row in rows}
    assert len(by_uri) == len(PHOTOS)
    tolerance = 2e-3  # half precision in another process than the reference
    for i in range(len(PHOTOS)):
        row, top = by_uri[f"photo-{i}.jpg"], expected[i].topk(SCORING.top_k)
        assert row["status"] == "ok", row["error"]
        np.testing.assert_allclose(row["topk_scores"], top.values.numpy(), atol=tolerance)
        clear = top.values[0] - top.values[1] > 2 * tolerance
        assert row["label"] == names[int(top.indices[0])] if clear else row["label"] in row["topk_labels"][:2]
