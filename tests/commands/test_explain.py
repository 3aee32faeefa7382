"""lgca explain: the drawing functions on known inputs, and the command end to end with lgca-tiny."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline.commands.explain import (BACKGROUND, EXPANDED_COLOUR, EXPANDED_WIDTH, ExplainLayout, HEAT_OPACITY,
                                       configs_from_args, draw_step_panel, heat_colours, read_image, register,
                                       scale_boxes, weight_map)
from pipeline.config import ConfigError, ModelConfig, ScoringParams, StorageConfig, TextConfig
from pipeline.data.decode import DecodeLimits, decode_image
from pipeline.method.engine import Engine, ImageInput
from pipeline.model.classes import ClassSet
from pipeline.model.loading import load_model
from tests.support import encode, upload

CLASSES = ["tabby cat", "dog", "tiger", "car"]
SETTINGS = {"crops": 10, "steps": 2, "expand_top": 3, "seed": 5}
PANEL_WIDTH = 240
GREY = (90, 90, 90)


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lgca")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.handler(args)


def heat_of(pixels: np.ndarray) -> np.ndarray:
    """The heat ``h`` a drawn panel shows at each pixel: red - blue = HEAT_OPACITY * 255 * (2h - 1)."""
    return ((pixels[..., 0] - pixels[..., 2]) / (HEAT_OPACITY * 255) + 1) / 2


def outline_band(box: np.ndarray, shape: tuple[int, int], width: int) -> np.ndarray:
    """Pixels of a ``width``-pixel outline drawn inside the inclusive box ``x0, y0, x1, y1``."""
    x0, y0, x1, y1 = (int(v) for v in box)
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    outer = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    inner = (xs >= x0 + width) & (xs <= x1 - width) & (ys >= y0 + width) & (ys <= y1 - width)
    return outer & ~inner


# ---- geometry and drawing -----------------------------------------------------------------

def test_layout_size_and_origins():
    layout = ExplainLayout.for_image(width=400, height=300, panels=5, panel_width=200, columns=3)
    assert (layout.panel_width, layout.panel_height, layout.columns) == (200, 150, 3)
    line = 12 + 4
    caption, header = 4 * line + 8, 3 * line + 8
    assert layout.size == (8 + 3 * 208, header + 2 * (150 + caption + 8))
    assert layout.origin(0) == (8, header)
    assert layout.origin(4) == (8 + 208, header + 150 + caption + 8)
    assert ExplainLayout.for_image(100, 50, 2, 64, 4).columns == 2


def test_scale_boxes_rounds_and_clamps():
    boxes = np.array([[0.0, 0.0, 200.0, 100.0], [10.4, 20.6, 30.0, 50.0]])
    got = scale_boxes(boxes, width=200, height=100, size=(100, 40))
    assert got.tolist() == [[0, 0, 99, 39], [5, 8, 15, 20]]


def test_weight_map_sums_covering_weights():
    boxes = np.array([[0, 0, 2, 1], [1, 1, 3, 2]])
    got = weight_map(boxes, np.array([0.25, 0.5]), size=(5, 3))
    want = np.array([[0.25, 0.25, 0.25, 0.0, 0.0],
                     [0.25, 0.75, 0.75, 0.5, 0.0],
                     [0.0, 0.5, 0.5, 0.5, 0.0]]) / 0.75
    np.testing.assert_allclose(got, want)
    assert not weight_map(boxes, np.zeros(2), (5, 3)).any()


def test_heat_colours_run_from_blue_to_red():
    got = heat_colours(np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(got, [[0, 0, 255], [127.5, 255, 127.5], [255, 0, 0]])


def test_draw_step_panel_draws_the_heat_map_and_outlines_expanded():
    image = Image.new("RGB", (100, 80), GREY)
    boxes = np.array([[10, 10, 50, 50], [60, 20, 90, 70], [0, 0, 99, 79]])
    panel = draw_step_panel(image, boxes, np.array([0.6, 0.3, 0.0]), [1],
                            [("cat", 0.3125), ("dog", 0.25), ("fox", 0.125)], "step 1")
    pixels = np.asarray(panel).astype(int)
    assert panel.size == (100, 80 + 4 * 16 + 8)
    grey = GREY[0] * (1 - HEAT_OPACITY)
    for (y, x), heat in (((30, 30), 1.0), ((40, 75), 0.5), ((75, 5), 0.0)):  # heaviest box, half, zero weight
        want = grey + HEAT_OPACITY * heat_colours(np.array(heat))
        assert np.abs(pixels[y, x] - want).max() <= 1, (y, x)
    np.testing.assert_allclose(heat_of(pixels[:80])[30, 30], 1.0, atol=0.01)
    # no crop box is outlined: along the heaviest box's edge the picture is the heat map's
    assert np.abs(pixels[30, 10] - (grey + HEAT_OPACITY * heat_colours(np.array(1.0)))).max() <= 1
    band = outline_band(boxes[1], (80, 100), EXPANDED_WIDTH)
    magenta = (pixels[:80] == EXPANDED_COLOUR).all(axis=-1)
    assert (magenta == band).all()
    caption = pixels[80:]
    dark = (caption < 100).all(axis=-1)
    for n in range(4):  # the title and three labels, one text line each
        assert dark[4 + n * 16: 4 + (n + 1) * 16].sum() > 20
    assert (caption == BACKGROUND).all(axis=-1).sum() > 0.5 * caption.shape[0] * caption.shape[1]


# ---- end to end ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "chelsea.jpg"
    path.write_bytes(encode(skimage.data.chelsea(), quality=92))
    return path


def engine_scores(photo, checkpoint):
    """Score the photo directly with the engine, as explain should (same seed, same decode)."""
    loaded = load_model(ModelConfig("lgca-tiny", str(checkpoint), device="cpu"))
    params = ScoringParams(**SETTINGS)
    decoded = decode_image(photo.read_bytes(), DecodeLimits.for_model(loaded.preprocess.image_size, params))
    classes = ClassSet(tuple(CLASSES), ("a photo of a {}.",), tuple(() for _ in CLASSES))
    engine = Engine.for_classes(loaded, classes, params)
    image = ImageInput(str(photo), decoded.pixels, decoded.height, decoded.width)
    return engine.score([image])


def check_heat_peak(panel: np.ndarray, magenta: np.ndarray, scores, step: int, image_size) -> None:
    """The drawn heat map of ``step`` peaks inside the box with the largest weight w^t_i, and
    matches the weight map of the engine's boxes away from the expanded outlines."""
    size = panel.shape[1], panel.shape[0]
    boxes = scale_boxes(scores.boxes[step, 0].numpy(), *image_size, size)
    weights = scores.weights[step, 0].numpy()
    shown = np.where(magenta, -1.0, heat_of(panel))
    peak_y, peak_x = np.unravel_index(shown.argmax(), shown.shape)
    x0, y0, x1, y1 = boxes[weights.argmax()]
    assert x0 <= peak_x <= x1 and y0 <= peak_y <= y1, (step, (peak_x, peak_y), boxes[weights.argmax()].tolist())
    want = weight_map(boxes, weights, size)
    assert np.abs(shown - want)[~magenta].max() < 0.01  # within the rounding of 8-bit colours


def test_explain_draws_the_engines_boxes(photo, tiny_checkpoint, tmp_path, capsys):
    target = tmp_path / "pics" / "explain.png"
    target.parent.mkdir()
    code = cli("explain", str(photo), "--classes", ",".join(CLASSES), "--model", "lgca-tiny",
               "--pretrained", str(tiny_checkpoint), "--device", "cpu", "--crops", "10", "--steps", "2",
               "--expand-top", "3", "--seed", "5", "--panel-width", str(PANEL_WIDTH), "-o", str(target))
    assert code == 0
    scores = engine_scores(photo, tiny_checkpoint)
    label = CLASSES[int(scores.lgca[0].argmax())]
    assert capsys.readouterr().out.strip() == (f"{target}: lgca label {label!r} for {photo} (crops drawn with "
                                               "seed 5; the same label on every run)")

    picture = np.asarray(Image.open(target).convert("RGB")).astype(int)
    height, width = 300, 451  # chelsea
    panel_h = round(PANEL_WIDTH * height / width)
    line = 16
    header, caption = 3 * line + 8, 4 * line + 8
    assert picture.shape[:2] == (header + panel_h + caption + 8, 8 + 3 * (PANEL_WIDTH + 8))

    magenta = (picture == EXPANDED_COLOUR).all(axis=-1)
    for t in range(3):
        x, y = 8 + t * (PANEL_WIDTH + 8), header
        region = magenta[y:y + panel_h, x:x + PANEL_WIDTH]
        check_heat_peak(picture[y:y + panel_h, x:x + PANEL_WIDTH], region, scores, t, (width, height))
        if t == 0:
            assert not region.any()  # nothing is expanded at step 0
            continue
        expanded = scores.expanded_boxes(t)[0].numpy()
        drawn = scale_boxes(expanded, width, height, (PANEL_WIDTH, panel_h))
        band = np.zeros_like(region)
        for box in drawn:
            band |= outline_band(box, region.shape, EXPANDED_WIDTH)
            x0, y0, x1, y1 = box
            for px, py in ((x0 + 1, (y0 + y1) // 2), (x1 - 1, (y0 + y1) // 2), ((x0 + x1) // 2, y0 + 1)):
                assert region[py, px], (t, box.tolist(), px, py)  # on the outline
        assert not (region & ~band).any()  # no magenta away from the engine's boxes
        assert region.sum() > 0.9 * band.sum()
    assert not magenta[:header].any() and not magenta[header + panel_h:].any()


def test_explain_reports_a_missing_image(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="image: .*nope.jpg not found"):
        cli("explain", str(tmp_path / "nope.jpg"), "--classes", "cat,dog", "--model", "lgca-tiny",
            "--pretrained", str(tiny_checkpoint), "--device", "cpu", "-o", str(tmp_path / "x.png"))


def test_explain_checks_the_image_before_loading_any_model(tmp_path, monkeypatch):
    import pipeline.model.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded first"))
    with pytest.raises(ConfigError, match="image: .*nope.jpg not found"):  # the defaults: ViT-B-32, openai
        cli("explain", str(tmp_path / "nope.jpg"), "--classes", "cat,dog", "-o", str(tmp_path / "x.png"))


def test_random_weights_give_the_same_label_on_every_run_and_a_note_says_why(photo, tmp_path, capsys):
    args = ("explain", str(photo), "--classes", ",".join(CLASSES), "--model", "lgca-tiny", "--pretrained", "none",
            "--device", "cpu", "--crops", "6", "--steps", "1", "--expand-top", "2", "--panel-width", "64")
    lines = []
    for run in range(3):
        assert cli(*args, "-o", str(tmp_path / f"{run}.png")) == 0
        lines.append(capsys.readouterr().out.splitlines())
    labels = {out[0].split("lgca label ")[1].split(" for ")[0] for out in lines}
    assert len(labels) == 1  # random weights, but seeded: the same model on every run
    pictures = {(tmp_path / f"{run}.png").read_bytes() for run in range(3)}
    assert len(pictures) == 1  # the same scores to the 4th decimal, the same boxes
    assert lines[0][1] == ("note: --pretrained none gives lgca-tiny random weights (the same on every run), so "
                           "this label means nothing; give a checkpoint file, a URI or a tag for a real one")


def test_explain_reports_an_undecodable_image(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="cannot be scored: decode: cannot identify image file"):
        cli("explain", str(bad), "--classes", "cat,dog", "--model", "lgca-tiny",
            "--pretrained", str(tiny_checkpoint), "--device", "cpu", "-o", str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_read_image_from_s3_ids_it_by_url(photo, moto_endpoint, bucket):
    upload(moto_endpoint, bucket, {"photos/chelsea.jpg": photo.read_bytes()})
    limits = DecodeLimits(max_short_side=128)
    got = read_image(f"s3://{bucket}/photos/chelsea.jpg", StorageConfig(endpoint_url=moto_endpoint), limits)
    local = decode_image(photo.read_bytes(), limits)
    assert got.image_id == f"s3://{bucket}/photos/chelsea.jpg"
    assert (got.height, got.width) == (300, 451) and got.pixels.shape == (128, 192, 3)
    assert np.array_equal(got.pixels, local.pixels)
    assert read_image(str(photo), StorageConfig(), limits, image_id="shard.tar#cat.jpg").image_id == "shard.tar#cat.jpg"


def test_configs_from_args_fill_only_given_flags():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["explain", "x.jpg", "--classes", "a,b", "--steps", "1", "--expand-ratio", "1.5",
                              "--anon", "--pretrained", "none", "-o", "x.png"])
    text, model, scoring, storage = configs_from_args(args)
    assert text == TextConfig(classes="a,b")
    assert model == ModelConfig(pretrained="none")
    assert scoring == ScoringParams(method="lgca", steps=1, expand_ratio=1.5)
    assert storage == StorageConfig(anon=True)
