"""``lgca explain``: one image's LGCA steps drawn side by side, like the LGCA paper's Figure 5.

The picture (see :class:`ExplainLayout` for the exact geometry):

* a header: the final lgca label and score, the clip, cupl and wca labels, the image and
  the settings, and a legend;
* one panel per step ``t = 0..T``, left to right in rows of ``columns``: the image scaled
  to ``panel_width`` (aspect ratio kept) in grey, under a heat map of step t's crop weights:
  each pixel's heat ``h`` is the sum of ``w^t_i`` over the boxes ``boxes^t_i`` that contain
  it, divided by the panel's maximum, coloured :func:`heat_colours` (blue at 0, green at
  0.5, red at 1) and blended at :data:`HEAT_OPACITY`, so ``red - blue`` of a drawn pixel is
  ``HEAT_OPACITY * 255 * (2h - 1)`` whatever the image; the K boxes expanded at step t (their
  grown geometry) outlined on top, opaque, in :data:`EXPANDED_COLOUR`,
  :data:`EXPANDED_WIDTH` pixels wide, inside the box; under the image, the step's top-3
  labels with their scores ``S_t``. The N crop boxes themselves are not outlined (60
  outlines hide the image); the heat map shows where their weight lies.

Boxes are in original-image pixels (as :class:`~pipeline.method.engine.BatchScores` holds them)
and are drawn at ``round(x * panel_width / W)``, ``round(y * panel_height / H)``, clamped
to the panel. Drawing uses Pillow's ImageDraw and its default font only.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.config import ConfigError, ModelConfig, ScoringParams, StorageConfig, TextConfig
from pipeline.data.decode import DecodeLimits, decode_image
from pipeline.method.engine import BatchScores, Engine, ImageInput
from pipeline.model.classes import load_class_set
from pipeline.options import SCORING_FLAGS, add_option_arguments, given_options
from pipeline.storage import filesystem, full_uri, open_output

EXPANDED_COLOUR = (255, 0, 255)  # boxes expanded at the panel's step; no heat colour is pure magenta
EXPANDED_WIDTH = 3  # outline width of expanded boxes, drawn inside the box
HEAT_OPACITY = 0.5  # the heat map's share of each pixel; the rest is the image in grey
TEXT_COLOUR = (0, 0, 0)
BACKGROUND = (255, 255, 255)
FONT_SIZE = 12
LINE_SPACING = 4
MARGIN = 8
SHOWN_LABELS = 3  # labels listed under each panel
HEADER_LINES = 3
LINE_HEIGHT = FONT_SIZE + LINE_SPACING
CAPTION_HEIGHT = (1 + SHOWN_LABELS) * LINE_HEIGHT + MARGIN  # step title and labels under each image
HEADER_HEIGHT = HEADER_LINES * LINE_HEIGHT + MARGIN


@dataclass(frozen=True)
class ExplainLayout:
    """Geometry of the picture: ``panels`` panels of ``panel_width x panel_height`` image pixels."""

    panel_width: int
    panel_height: int
    panels: int  # T + 1
    columns: int  # panels per row (at most `panels`)

    @classmethod
    def for_image(cls, width: int, height: int, panels: int, panel_width: int, columns: int) -> ExplainLayout:
        """Panels ``panel_width`` wide showing a ``width x height`` image, aspect ratio kept."""
        return cls(panel_width, max(1, round(panel_width * height / width)), panels, max(1, min(columns, panels)))

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the whole picture."""
        rows = math.ceil(self.panels / self.columns)
        return (MARGIN + self.columns * (self.panel_width + MARGIN),
                HEADER_HEIGHT + rows * (self.panel_height + CAPTION_HEIGHT + MARGIN))

    def origin(self, step: int) -> tuple[int, int]:
        """Top-left ``(x, y)`` of the image of panel ``step`` in the picture."""
        row, column = divmod(step, self.columns)
        return (MARGIN + column * (self.panel_width + MARGIN),
                HEADER_HEIGHT + row * (self.panel_height + CAPTION_HEIGHT + MARGIN))


def scale_boxes(boxes: np.ndarray, width: int, height: int, size: tuple[int, int]) -> np.ndarray:
    """``[M, 4]`` boxes in pixels of a ``width x height`` image -> int pixels of a ``size`` picture."""
    sx, sy = size[0] / width, size[1] / height
    scaled = np.rint(np.asarray(boxes, dtype=np.float64) * [sx, sy, sx, sy]).astype(np.int64)
    return np.clip(scaled, 0, [size[0] - 1, size[1] - 1, size[0] - 1, size[1] - 1])


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZE)


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """``text``, cut and ended with '...' when it is wider than ``width`` pixels."""
    font = _font()
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def weight_map(boxes: np.ndarray, weights: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[h, w]``: the sum of ``weights`` ``[N]`` of the boxes (inclusive picture pixels ``[N, 4]``)
    containing each pixel of a ``size = (w, h)`` picture, divided by its maximum (all 0 if none)."""
    heat = np.zeros((size[1], size[0]), dtype=np.float64)
    for (x0, y0, x1, y1), weight in zip(np.asarray(boxes, dtype=np.int64), weights):
        heat[y0:y1 + 1, x0:x1 + 1] += float(weight)
    peak = heat.max()
    return heat / peak if peak > 0 else heat


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """``[..., 3]`` RGB (0..255 floats) for heat values in ``[0, 1]``: blue, green at 0.5, red;
    red minus blue is ``255 * (2h - 1)``, so the heat can be read back from a drawn pixel."""
    return 255.0 * np.stack([heat, 4.0 * heat * (1.0 - heat), 1.0 - heat], axis=-1)


def draw_step_panel(image: Image.Image, boxes: np.ndarray, weights: np.ndarray, expanded: Sequence[int],
                    labels: Sequence[tuple[str, float]], title: str) -> Image.Image:
    """One step: ``image`` in grey under the heat map of its boxes (picture pixels, ``[N, 4]``)
    weighted by ``weights`` ``[N]``, the boxes ``expanded`` (indices) outlined, and ``title``
    and ``labels`` below."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)[..., None]
    heat = heat_colours(weight_map(boxes, weights, image.size))
    blended = np.rint(grey * (1.0 - HEAT_OPACITY) + heat * HEAT_OPACITY).astype(np.uint8)
    panel = Image.new("RGB", (image.width, image.height + CAPTION_HEIGHT), BACKGROUND)
    panel.paste(Image.fromarray(blended), (0, 0))
    solid = ImageDraw.Draw(panel)
    for i in expanded:
        solid.rectangle([int(v) for v in boxes[i]], outline=EXPANDED_COLOUR, width=EXPANDED_WIDTH)
    lines = [title] + [f"{name}  {score:.4f}" for name, score in labels]
    for n, line in enumerate(lines):
        y = image.height + MARGIN // 2 + n * LINE_HEIGHT
        solid.text((0, y), fit_text(solid, line, image.width), fill=TEXT_COLOUR, font=_font())
    return panel


def compose(panels: Sequence[Image.Image], header: Sequence[str], layout: ExplainLayout) -> Image.Image:
    """The whole picture: ``header`` lines on top, then ``panels`` placed by ``layout``."""
    picture = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(picture)
    for n, line in enumerate(header[:HEADER_LINES]):
        text = fit_text(draw, line, layout.size[0] - 2 * MARGIN)
        draw.text((MARGIN, MARGIN // 2 + n * LINE_HEIGHT), text, fill=TEXT_COLOUR, font=_font())
    for step, panel in enumerate(panels):
        picture.paste(panel, layout.origin(step))
    return picture


@dataclass(frozen=True)
class Explanation:
    """One scored image and what the picture needs to show about it."""

    image: ImageInput  # the decoded working copy that was scored
    names: tuple[str, ...]  # class names
    scores: BatchScores  # a batch of one image, lgca method
    description: str  # image id, model and settings, for the header


def _top(names: Sequence[str], scores: np.ndarray, count: int) -> list[tuple[str, float]]:
    order = np.argsort(-scores, kind="stable")[:count]
    return [(names[i], float(scores[i])) for i in order]


def render(explanation: Explanation, panel_width: int = 320, columns: int = 4) -> Image.Image:
    """Draw ``explanation`` (see the module docstring for what the picture shows)."""
    image, scores, names = explanation.image, explanation.scores, explanation.names
    steps = scores.steps.shape[0]
    layout = ExplainLayout.for_image(image.width, image.height, steps, panel_width, columns)
    size = (layout.panel_width, layout.panel_height)
    base = Image.fromarray(image.pixels).resize(size, Image.Resampling.BICUBIC)
    panels = []
    for t in range(steps):
        boxes = scale_boxes(scores.boxes[t, 0].numpy(), image.width, image.height, size)
        expanded = scores.expanded[t - 1, 0].tolist() if t > 0 else []
        title = f"step {t}: " + (f"{len(expanded)} boxes expanded" if t else "WCA")
        panels.append(draw_step_panel(base, boxes, scores.weights[t, 0].numpy(), expanded,
                                      _top(names, scores.steps[t, 0].numpy(), SHOWN_LABELS), title))
    final = _top(names, scores.lgca[0].numpy(), 1)[0]
    others = "   ".join(f"{m}: {_top(names, scores.method(m)[0].numpy(), 1)[0][0]}" for m in ("clip", "cupl", "wca"))
    header = [f"lgca: {final[0]} ({final[1]:.4f})   {others}", explanation.description,
              "heat map: summed weights w^t of the crops covering each pixel (blue low, red high);  "
              "magenta: boxes expanded at step t"]
    return compose(panels, header, layout)


def read_bytes(uri: str, storage: StorageConfig) -> tuple[bytes, str]:
    """The bytes of ``uri`` (path or fsspec URL) and the id ``lgca label`` gives it as a loose file
    (the absolute path, or ``proto://path``); a missing or unreadable image is a ConfigError."""
    fs, path = filesystem(uri, storage)
    try:
        with fs.open(path, "rb") as handle:
            return handle.read(), full_uri(fs, path)
    except FileNotFoundError:
        raise ConfigError(f"image: {uri} not found") from None
    except OSError as exc:  # a folder, no permission, an unreachable store
        raise ConfigError(f"image: cannot read {uri}: {type(exc).__name__}: {exc}") from None


def decode(data: bytes, uri: str, image_id: str, limits: DecodeLimits) -> ImageInput:
    """Decode an image's bytes like ``lgca label`` does; one that cannot be scored is a ConfigError."""
    decoded = decode_image(data, limits)
    if decoded.error:
        raise ConfigError(f"image: {uri} cannot be scored: {decoded.error}")
    return ImageInput(image_id, decoded.pixels, decoded.height, decoded.width)


def read_image(uri: str, storage: StorageConfig, limits: DecodeLimits, image_id: str = "") -> ImageInput:
    """Read and decode ``uri`` (path or fsspec URL). The default id is the one ``lgca label`` gives
    a loose file (the absolute path, or ``proto://path``), so the crops are the run's crops."""
    data, own_id = read_bytes(uri, storage)
    return decode(data, uri, image_id or own_id, limits)


def explain_image(uri: str, text: TextConfig, model: ModelConfig, scoring: ScoringParams,
                  storage: StorageConfig, image_id: str = "") -> Explanation:
    """Read ``uri`` (first: a wrong path fails before any model is loaded), load the model and
    classes, decode the image like ``lgca label`` does, and score it."""
    from pipeline.model.loading import load_model  # open_clip is imported only when a model is loaded

    if scoring.method != "lgca":
        raise ConfigError(f"method: explain shows LGCA steps; got method={scoring.method!r}")
    data, own_id = read_bytes(uri, storage)
    classes = load_class_set(text, storage)
    loaded = load_model(model, storage)
    limits = DecodeLimits.for_model(loaded.preprocess.image_size, scoring)
    image = decode(data, uri, image_id or own_id, limits)
    engine = Engine.for_classes(loaded, classes, scoring)
    description = (f"{image.image_id}  {image.width}x{image.height};  {loaded.name} ({model.pretrained}); "
                   f"seed {scoring.seed}, N={scoring.crops}, T={scoring.steps}, K={scoring.expand_top}, "
                   f"r={scoring.expand_ratio:g}")
    return Explanation(image, classes.names, engine.score([image]), description)


def configs_from_args(args: argparse.Namespace) -> tuple[TextConfig, ModelConfig, ScoringParams, StorageConfig]:
    """The configs that the job flags of ``lgca explain`` fill (unset flags keep the defaults)."""
    given = given_options(args, SCORING_FLAGS)
    return (TextConfig(**given["text"]), ModelConfig(**given["model"]),
            ScoringParams(method="lgca", **given["scoring"]), StorageConfig(**given["storage"]))


def save_png(picture: Image.Image, target: str, storage: StorageConfig) -> None:
    """Write ``picture`` as PNG to a local path or fsspec URL (folders created)."""
    with open_output(target, storage) as handle:
        picture.save(handle, format="PNG")


def _explain(args: argparse.Namespace) -> int:
    if args.panel_width < 16 or args.columns < 1:
        raise ConfigError("panel-width must be at least 16 and columns at least 1")
    from pipeline.model.loading import random_weights_said_elsewhere

    text, model, scoring, storage = configs_from_args(args)
    with random_weights_said_elsewhere():  # the note below says it, after the result
        explanation = explain_image(args.image, text, model, scoring, storage, args.id)
    save_png(render(explanation, args.panel_width, args.columns), args.output, storage)
    label = _top(explanation.names, explanation.scores.lgca[0].numpy(), 1)[0][0]
    print(f"{args.output}: lgca label {label!r} for {explanation.image.image_id} (crops drawn with seed "
          f"{scoring.seed}; the same label on every run)")
    if model.pretrained.lower() == "none":
        print(f"note: --pretrained none gives {model.name} random weights (the same on every run), so this "
              "label means nothing; give a checkpoint file, a URI or a tag for a real one")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``explain`` subcommand to the ``lgca`` parser."""
    parser = commands.add_parser("explain", help="draw one image's LGCA steps (boxes, weights, labels) as a PNG")
    parser.add_argument("image", help="image file or fsspec URL (s3://...)")
    parser.add_argument("-o", "--output", required=True, help="PNG file to write (local path or URL)")
    parser.add_argument("--id", default="", help="image id that seeds the crops (default: as lgca label "
                                                 "ids a loose file: its absolute path or URL)")
    parser.add_argument("--panel-width", type=int, default=320, help="pixels per step panel (default 320)")
    parser.add_argument("--columns", type=int, default=4, help="panels per row (default 4)")
    add_option_arguments(parser, SCORING_FLAGS, required=("classes",))
    parser.set_defaults(handler=_explain)
