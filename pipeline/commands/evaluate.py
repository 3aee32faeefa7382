"""``lgca eval``: top-1 and top-5 accuracy of clip, cupl, wca and lgca on a labelled image set.

The set is an ImageFolder tree (one folder per class, local or fsspec) or Parquet files with
image bytes and a label column (class name or 0-based class index). Folder names and labels
match class names as descriptions do (``normalize_name``), all checked before the model loads.
One engine pass with method lgca yields every method and LGCA step, in this process, batch by
batch; ``--workers`` threads each read and decode a whole batch, a bounded number of batches
ahead (``storage.read_ahead``), so memory stays flat. The data, format, column, batch-size and
pixel-limit flags are ``lgca label``'s, with its defaults and checks. Images that cannot be read
or decoded count as errors, never as wrong predictions.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import (ConfigError, InputConfig, ModelConfig, ResourceConfig, ScoringParams, SourceError,
                             StorageConfig, TextConfig, option, to_dict)
from pipeline.data.decode import DecodeLimits, Decoded, decode_image
from pipeline.data.rows import error_reason
from pipeline.data.sources import (check_parquet_columns, detect_kind, iter_parquet_rows, list_image_files,
                                   list_shards, read_file)
from pipeline.method.engine import BatchScores, Engine, ImageInput, score_apart
from pipeline.model.classes import ClassSet, load_class_set, normalize_name
from pipeline.model.loading import load_model
from pipeline.options import SCORING_FLAGS, add_option_arguments, given_options, options_of
from pipeline.storage import filesystem, full_uri, open_output, read_ahead

METHOD_NAMES = ("clip", "cupl", "wca", "lgca")
TOP_K = 5
EVAL_FORMATS = ("auto", "files", "parquet")
SETTINGS = ("crops", "alpha", "beta", "steps", "expand_top", "expand_ratio", "aggregation", "seed")
log = logging.getLogger(__name__)

_SHOWN = 5  # offending items listed in an error message
PREDICTION_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("label", pa.string()),
                               ("error", pa.string()), *[(name, pa.string()) for name in METHOD_NAMES],
                               ("lgca_topk", pa.list_(pa.string())), ("steps", pa.list_(pa.string()))])


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: the labelled data, the classes, the model and the scoring.

    The sections are ``lgca label``'s, with its defaults and checks; of ``resources`` eval uses
    ``batch_size`` (images per engine call) and ``max_pixels`` only.
    """

    inputs: InputConfig  # ImageFolder roots (format 'files') or Parquet files (format 'parquet')
    text: TextConfig
    model: ModelConfig = ModelConfig()
    scoring: ScoringParams = ScoringParams()  # method must be lgca: it yields every method
    resources: ResourceConfig = ResourceConfig()
    storage: StorageConfig = StorageConfig()
    label_column: str = option("Parquet: the column of each image's class name or 0-based class index", "label")
    workers: int = option("threads reading and decoding ahead, one batch each", 4)

    def __post_init__(self) -> None:
        if self.scoring.method != "lgca":
            raise ConfigError("method: eval scores with lgca, which yields every method's scores")
        if self.inputs.format not in EVAL_FORMATS:
            raise ConfigError(f"input_format: {self.inputs.format!r}: eval reads ImageFolder trees (files) or "
                              "Parquet files (parquet), or auto (by extension)")
        if self.workers < 1:
            raise ConfigError(f"workers: must be at least 1, got {self.workers}")


@dataclass(frozen=True)
class Sample:
    """One labelled image; Parquet samples carry their bytes, image files are read later."""

    id: str
    uri: str
    label: int  # index into the class list
    data: bytes | None = None
    error: str | None = None  # why there are no bytes (e.g. a null Parquet cell)


def folder_samples(root: str, cfg: EvalConfig, names: Sequence[str]) -> list[Sample]:
    """The images of the ImageFolder tree at ``root``, labelled by their top folder.

    Images outside a class folder, or in folders that match no class, raise ConfigError.
    """
    fs, path = filesystem(root, cfg.storage)
    if not fs.isdir(path):
        raise SourceError(f"{root}: not a folder; give an ImageFolder root (one folder per class) "
                          "or Parquet files with --input-format parquet")
    prefix = full_uri(fs, path).rstrip("/") + "/"
    lookup = {normalize_name(name): index for index, name in enumerate(names)}
    samples, unknown = [], {}
    for uri in list_image_files(root, cfg.storage):
        folder, _, rest = uri[len(prefix):].partition("/")
        folder = folder if rest else "(images outside any class folder)"
        if rest and normalize_name(folder) in lookup:
            samples.append(Sample(id=uri, uri=uri, label=lookup[normalize_name(folder)]))
        else:
            unknown[folder] = unknown.get(folder, 0) + 1
    if unknown:
        shown = ", ".join(f"{name!r} ({count} images)" for name, count in sorted(unknown.items())[:_SHOWN])
        raise ConfigError(f"{root}: {len(unknown)} class folders match no class of --classes (case, '_' "
                          f"and spaces are ignored): {shown}; rename them to class names or add the classes")
    return samples


def parquet_labels(uri: str, cfg: EvalConfig, names: Sequence[str]) -> list[int]:
    """The class index of every row of a Parquet file: its label column holds names or 0-based indices."""
    fs, path = filesystem(uri, cfg.storage)
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            if cfg.label_column not in parquet.schema_arrow.names:
                raise SourceError(f"{uri}: label column {cfg.label_column!r} not found; available: "
                                  f"{', '.join(parquet.schema_arrow.names)}")
            values = [v for b in parquet.iter_batches(columns=[cfg.label_column]) for v in b.column(0).to_pylist()]
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"{uri}: cannot be read as Parquet ({type(exc).__name__}: {exc}); the labels of a "
                          "labelled set must all be readable") from exc
    lookup = {normalize_name(name): index for index, name in enumerate(names)}
    labels = []
    for row, value in enumerate(values):
        if isinstance(value, str) and normalize_name(value) in lookup:
            labels.append(lookup[normalize_name(value)])
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            labels.append(value)
        else:
            raise ConfigError(f"{uri} row {row}: label {value!r} is neither a class name of --classes (case, "
                              f"'_' and spaces are ignored) nor a class index 0..{len(names) - 1}")
    return labels


def parquet_samples(files: Sequence[str], labels: Sequence[list[int]], cfg: EvalConfig) -> Iterator[Sample]:
    """Stream the rows of Parquet ``files`` with their labels; a corrupt file raises SourceError."""
    for uri, file_labels in zip(files, labels):
        row_labels = iter(file_labels)
        for batch in iter_parquet_rows(uri, cfg.storage, cfg.inputs.image_column, cfg.inputs.id_column):
            for row_id, blob, error in zip(batch["id"], batch["bytes"], batch["error"]):
                if error and row_id == f"{uri}#":
                    raise SourceError(f"{uri}: cannot be used ({error})")
                yield Sample(id=row_id, uri=uri, label=next(row_labels), data=blob, error=error)


def list_samples(cfg: EvalConfig, names: Sequence[str]) -> Iterator[Sample]:
    """Every labelled image of the inputs: the ImageFolder trees', then the Parquet files'. The
    columns and labels of every Parquet file are checked before this returns."""
    folders: list[Sample] = []
    files: list[str] = []
    for uri in cfg.inputs.uris:
        kind = cfg.inputs.format if cfg.inputs.format != "auto" else detect_kind(uri)
        if kind == "files":
            folders += folder_samples(uri, cfg, names)
        elif kind == "parquet":
            files += list_shards(uri, "parquet", cfg.storage)
        else:
            raise ConfigError(f"input: {uri} looks like {kind} shards; eval reads ImageFolder trees or Parquet files "
                              "(--input-format files or parquet)")
    files = list(dict.fromkeys(files))  # a file named by two inputs is read once
    for uri in files:  # a missing id column (the default 'id') is named with its fix before the model loads
        check_parquet_columns(uri, cfg.storage, cfg.inputs.image_column, cfg.inputs.id_column)
    return itertools.chain(folders, parquet_samples(files, [parquet_labels(uri, cfg, names) for uri in files], cfg))


def load_sample(sample: Sample, storage: StorageConfig, limits: DecodeLimits) -> Decoded:
    """Read (when needed) and decode one sample; failures come back in ``Decoded.error``."""
    data, error = sample.data, sample.error
    if data is None and error is None:
        data, error = read_file(sample.uri, storage)  # in eval's own reader threads
    return Decoded(pixels=None, width=0, height=0, error=error) if error else decode_image(data, limits)


def loaded_batches(samples: Iterator[Sample], cfg: EvalConfig,
                   limits: DecodeLimits) -> Iterator[list[tuple[Sample, Decoded]]]:
    """Batches of ``batch_size`` decoded samples, in order, each read and decoded by one of
    ``cfg.workers`` threads, at most 2 x workers batches ahead (:func:`read_ahead`): whole
    batches, since reads of single images would stall a few images ahead while the engine scores."""
    def load(chunk: list[Sample]) -> list[tuple[Sample, Decoded]]:
        return [(sample, load_sample(sample, cfg.storage, limits)) for sample in chunk]

    chunks = iter(lambda: list(itertools.islice(samples, cfg.resources.batch_size)), [])
    for _, future in read_ahead(load, chunks, cfg.workers):
        yield future.result()


@dataclass
class Tally:
    """Running counts of correct predictions; ``k`` is the k of the top-k (5, or C if fewer)."""

    k: int
    step_top1: list[int]  # correct top-1 of S_t, for t = 0..T
    top1: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METHOD_NAMES, 0))
    topk: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METHOD_NAMES, 0))
    scored: int = 0
    errors: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)  # text before the first ':'

    def add(self, scores: BatchScores, labels: torch.Tensor) -> None:
        """Count a scored batch; ``labels``: long ``[B]`` true class indices."""
        for name in METHOD_NAMES:
            top = scores.method(name).topk(self.k).indices
            self.top1[name] += int((top[:, 0] == labels).sum())
            self.topk[name] += int((top == labels[:, None]).any(dim=1).sum())
        hits = (scores.steps.topk(1).indices[..., 0] == labels[None]).sum(dim=1)
        self.step_top1 = [old + int(new) for old, new in zip(self.step_top1, hits)]
        self.scored += len(labels)

    def add_error(self, message: str) -> None:
        """Count an image that could not be scored, under the reason its message starts with."""
        reason = error_reason(message)
        self.errors += 1
        self.error_reasons[reason] = self.error_reasons.get(reason, 0) + 1

    def fraction(self, count: int) -> float | None:
        """``count`` over the scored images; None when no image was scored."""
        return count / self.scored if self.scored else None


def prediction_table(samples: Sequence[Sample], errors: Sequence[str | None], scores: BatchScores | None,
                     names: Sequence[str]) -> pa.Table:
    """Rows: true label, error, each method's top-1, lgca top-k and S_t top-1 for each step t.

    ``scores`` covers exactly the samples without error, in order.
    """
    picks: dict[str, list] = {name: [] for name in PREDICTION_SCHEMA.names[4:]}
    if scores is not None:
        picks = {name: scores.method(name).topk(1).indices[:, 0].tolist() for name in METHOD_NAMES}
        picks["lgca_topk"] = scores.lgca.topk(min(TOP_K, len(names))).indices.tolist()
        picks["steps"] = scores.steps.topk(1).indices[..., 0].T.tolist()  # [B, T+1]
    rows = {"id": [s.id for s in samples], "uri": [s.uri for s in samples],
            "label": [names[s.label] for s in samples], "error": list(errors)}
    for column, values in picks.items():
        found = iter([names[v] for v in value] if isinstance(value, list) else names[value] for value in values)
        rows[column] = [None if error else next(found) for error in errors]
    return pa.table(rows, schema=PREDICTION_SCHEMA)


def evaluate_batch(engine: Engine, batch: list[tuple[Sample, Decoded]], tally: Tally,
                   writer: pq.ParquetWriter | None, names: Sequence[str]) -> None:
    """Score the decoded images of one batch; count them and the errors in ``tally``, write their rows.

    If scoring the batch fails, its images are scored one by one (:func:`score_apart`, as in the
    pipeline's model actor), so that only an image that fails alone becomes an error (``score: ...``).
    """
    good = [i for i, (_, decoded) in enumerate(batch) if decoded.error is None]
    images = [ImageInput(batch[i][0].id, batch[i][1].pixels, batch[i][1].height, batch[i][1].width) for i in good]
    groups = score_apart(engine.score, images)
    if len(groups) > 1:  # scored one by one: each image is its own group, rows in batch order
        alone = {good[members[0]]: (scores, error) for members, scores, error in groups}
        parts = [([item], alone.get(i, (None, None))) for i, item in enumerate(batch)]
    else:
        parts = [(batch, (groups[0][1], groups[0][2]) if groups else (None, None))]
    for items, (scores, error) in parts:
        if error is not None:
            items = [(sample, Decoded(None, 0, 0, error) if decoded.error is None else decoded)
                     for sample, decoded in items]
        if scores is not None:
            tally.add(scores, torch.tensor([sample.label for sample, decoded in items if decoded.error is None]))
        for _, decoded in items:
            if decoded.error is not None:
                tally.add_error(decoded.error)
        if writer is not None:
            writer.write_table(prediction_table([s for s, _ in items], [d.error for _, d in items], scores, names))


@dataclass(frozen=True)
class EvalResult:
    """What an evaluation measured, and with what."""

    config: EvalConfig
    classes: ClassSet
    model: str  # resolved open_clip model name
    device: str
    tally: Tally
    seconds: float  # reading, decoding and scoring; model loading and text encoding excluded

    def to_json(self) -> dict[str, Any]:
        """The report: accuracies as fractions in [0, 1] (None when nothing was scored) and counts."""
        tally, cfg, images = self.tally, self.config, self.tally.scored + self.tally.errors
        accuracy = {name: {"top1": tally.fraction(tally.top1[name]), "top5": tally.fraction(tally.topk[name]),
                           "top1_correct": tally.top1[name], "top5_correct": tally.topk[name]}
                    for name in METHOD_NAMES}
        return {"inputs": list(cfg.inputs.uris), "model": self.model, "pretrained": cfg.model.pretrained, "device": self.device,
                "precision": cfg.model.precision, "classes": len(self.classes.names), "top_k": tally.k,
                "images": images, "scored": tally.scored, "errors": tally.errors,
                "error_reasons": tally.error_reasons, "accuracy": accuracy,
                "lgca_steps_top1": [tally.fraction(count) for count in tally.step_top1],
                "lgca_steps_top1_correct": tally.step_top1, "seconds": self.seconds,
                "images_per_second": images / self.seconds if self.seconds > 0 else 0.0,
                "scoring": to_dict(cfg.scoring), "text_digests": self.classes.digests(),
                "text_sources": None if self.classes.sources is None else to_dict(self.classes.sources)}


def run_eval(cfg: EvalConfig, predictions: str = "") -> EvalResult:
    """Evaluate every method on the inputs; per-image rows go to ``predictions`` when given."""
    classes = load_class_set(cfg.text, cfg.storage)
    samples = list_samples(cfg, classes.names)
    loaded = load_model(cfg.model, cfg.storage)
    engine = Engine.for_classes(loaded, classes, cfg.scoring)
    limits = DecodeLimits.for_model(loaded.preprocess.image_size, cfg.scoring, cfg.resources.max_pixels)
    tally = Tally(k=min(TOP_K, len(classes.names)), step_top1=[0] * (cfg.scoring.steps + 1))
    clock = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writer = None
        if predictions:
            handle = stack.enter_context(open_output(predictions, cfg.storage, "wb"))
            writer = stack.enter_context(pq.ParquetWriter(handle, PREDICTION_SCHEMA))
        for batch in loaded_batches(samples, cfg, limits):
            evaluate_batch(engine, batch, tally, writer, classes.names)
    return EvalResult(config=cfg, classes=classes, model=loaded.name, device=str(loaded.device), tally=tally,
                      seconds=time.perf_counter() - clock)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def markdown_report(report: dict[str, Any]) -> str:
    """The JSON report of :meth:`EvalResult.to_json` as Markdown, accuracies in %."""
    steps, acc = report["lgca_steps_top1"], report["accuracy"]
    lines = [f"# Zero-shot evaluation of {', '.join(f'`{uri}`' for uri in report['inputs'])}", "",
             f"Model `{report['model']}` (pretrained `{report['pretrained']}`) on {report['device']}, "
             f"{report['precision']}; {report['classes']} classes. {report['images']} images: "
             f"{report['scored']} scored, {report['errors']} errors; {report['images_per_second']:.2f} images/s.",
             "", f"| method | top-1 % | top-{report['top_k']} % |", "|---|---|---|",
             *[f"| {name} | {_percent(a['top1'])} | {_percent(a['top5'])} |" for name, a in acc.items()],
             "", "LGCA top-1 % per step (S_0 is WCA; lgca aggregates the steps):", "",
             "| " + " | ".join([f"S_{t}" for t in range(len(steps))] + ["lgca"]) + " |",
             "|" + "---|" * (len(steps) + 1),
             "| " + " | ".join([_percent(v) for v in steps] + [_percent(acc["lgca"]["top1"])]) + " |"]
    if report["error_reasons"]:
        lines += ["", "Errors (not counted as predictions):", "",
                  *[f"- {reason}: {count}" for reason, count in sorted(report["error_reasons"].items())]]
    lines += ["", "Settings: " + ", ".join(f"{key} {report['scoring'][key]}" for key in SETTINGS) + "."]
    return "\n".join(lines) + "\n"


# The eval flags: `lgca label`'s options (pipeline.options) that mean the same here, then eval's own.
EVAL_OPTIONS = (("input", "input-format", "image-column", "id-column") + SCORING_FLAGS
                + ("batch-size", "max-pixels") + tuple(options_of(EvalConfig, "")))


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The eval flags: the options of :class:`EvalConfig` plus the output flags."""
    add_option_arguments(parser, EVAL_OPTIONS, required=("input", "classes"))
    parser.add_argument("--out-dir", default="", help="writes eval.json, eval.md and predictions.parquet")
    for name in ("json", "markdown", "predictions"):
        parser.add_argument(f"--{name}", default="", help=f"{name} file (overrides --out-dir)")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The :class:`EvalConfig` of parsed ``lgca eval`` arguments (the method is always lgca)."""
    given = given_options(args, EVAL_OPTIONS)
    return EvalConfig(inputs=InputConfig(**given["inputs"]), text=TextConfig(**given["text"]),
                      model=ModelConfig(**given["model"]), scoring=ScoringParams(method="lgca", **given["scoring"]),
                      resources=ResourceConfig(**given["resources"]), storage=StorageConfig(**given["storage"]),
                      **given[""])


def output_paths(args: argparse.Namespace) -> dict[str, str]:
    """Where the JSON, Markdown and predictions go: explicit flags, else files in --out-dir."""
    base = args.out_dir.rstrip("/")
    names = {"json": "eval.json", "markdown": "eval.md", "predictions": "predictions.parquet"}
    return {key: getattr(args, key) or (f"{base}/{name}" if base else "") for key, name in names.items()}


def _handle(args: argparse.Namespace) -> int:
    """Run ``lgca eval``: write the reports, print the Markdown; 1 when no image could be scored."""
    cfg = config_from_args(args)
    paths = output_paths(args)
    result = run_eval(cfg, paths["predictions"])
    report = result.to_json()
    texts = {"json": json.dumps(report, indent=2) + "\n", "markdown": markdown_report(report)}
    for key in (key for key in texts if paths[key]):
        with open_output(paths[key], cfg.storage, "w") as handle:
            handle.write(texts[key])
    print(texts["markdown"])
    if result.tally.scored == 0:
        print(f"lgca eval: error: none of the {report['images']} images could be scored; "
              "see the error reasons above", file=sys.stderr)
        return 1
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand to the ``lgca`` command line."""
    parser = commands.add_parser(
        "eval", help="accuracy of clip, cupl, wca and lgca on a labelled image set",
        description="Each --input is an ImageFolder tree (one folder per class; --input-format files) or Parquet "
                    "files with a label column (parquet); tar shards carry no labels and are refused. The other "
                    "flags are lgca label's. See docs/evaluation.md.")
    add_eval_arguments(parser)
    parser.set_defaults(handler=_handle)
