"""``lgca export``: an output's ok rows as a review project for people.

Formats (docs/review.md shows each file):

* ``labelstudio``: ``-o`` is a folder with ``tasks.json`` (Label Studio's task list: ``data``
  with the image reference and the row's fields, and one ``predictions`` entry per task
  whose ``model_version`` names model, weights and method, ``score`` is the row's score and
  ``result`` one ``choices`` region) and ``config.xml`` (the labeling config those regions
  name: an ``Image`` object ``image`` and a single-choice ``Choices`` control ``label`` over
  every class);
* ``fiftyone``: ``-o`` is a folder in FiftyOne's image-classification layout:
  ``labels.json`` (``classes`` and, per sample key, ``{label, confidence}``) and
  ``data.json`` (sample key -> image path), loaded with
  ``fo.Dataset.from_dir(dataset_dir, fo.types.FiftyOneImageClassificationDataset)``;
* ``csv``: ``-o`` is one file, a row per image.

Rows are streamed from DuckDB in batches (memory bounded however many are exported), lowest
margin first, so a review starts with the least certain labels.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from typing import Any, Callable, Iterator, TextIO
from xml.sax.saxutils import quoteattr

import duckdb

from pipeline.config import QueryError, StorageConfig
from pipeline.data.labels import connect
from pipeline.data.output import Output
from pipeline.data.review import Band, Provenance, SELECTED_VIEW, provenance, select_rows
from pipeline.options import STORAGE_FLAGS, add_option_arguments, given_options
from pipeline.storage import filesystem, open_output

FORMATS = ("labelstudio", "fiftyone", "csv")
COLUMNS = ("id", "uri", "label", "score", "margin", "runner_up", "clip_label", "cupl_label", "wca_label", "run_id")
FROM_NAME, TO_NAME = "label", "image"  # the Choices control and the Image object of config.xml
BATCH_ROWS = 10_000
CSV_COLUMNS = ("id", "image", *COLUMNS[1:])


def review_rows(con: duckdb.DuckDBPyConnection) -> Iterator[dict[str, Any]]:
    """The selected ok rows as dicts of COLUMNS, lowest margin first, BATCH_ROWS at a time."""
    relation = con.sql(f"SELECT id, uri, label, score, margin, topk_labels[2] AS runner_up, clip_label, cupl_label, "
                       f"wca_label, run_id FROM {SELECTED_VIEW} WHERE status = 'ok' ORDER BY margin NULLS LAST, id")
    with relation.to_arrow_reader(BATCH_ROWS) as reader:
        for batch in reader:
            yield from batch.to_pylist()


class ImageReference:
    """What a reviewer's tool opens for a row: the image's uri, or with ``presign`` seconds a
    presigned HTTPS URL for ``s3://`` images. Images inside tar or Parquet inputs have no URL
    of their own: they keep their id and are counted in ``inside_shards``."""

    def __init__(self, storage: StorageConfig, presign: int | None):
        self.storage, self.presign, self.inside_shards = storage, presign, 0

    def __call__(self, row: dict[str, Any]) -> str:
        if row["id"] != row["uri"]:
            self.inside_shards += 1
            return row["id"]
        if self.presign and row["uri"].startswith("s3://"):
            fs, path = filesystem(row["uri"], self.storage)
            return fs.sign(path, expiration=self.presign)
        return row["uri"]


def labeling_config(classes: list[str]) -> str:
    """Label Studio's labeling config for the tasks: one image, one single choice among ``classes``."""
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in classes)
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true">\n'
            f"{choices}\n  </Choices>\n</View>\n")


def labelstudio_task(row: dict[str, Any], image: str, model_version: str) -> dict[str, Any]:
    """One Label Studio task with the row's label as a prediction."""
    data = {"image": image, **{k: row[k] for k in COLUMNS if k not in ("label", "score")}}
    region = {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [row["label"]]}}
    return {"data": data, "predictions": [{"model_version": model_version, "score": row["score"],
                                           "result": [region]}]}


def sample_key(image_id: str) -> str:
    """The FiftyOne sample key of an image: a digest of its id (ids hold '/', ':' and '#')."""
    return hashlib.blake2b(image_id.encode(), digest_size=10).hexdigest()


def _json_items(handle: TextIO, opening: str, items: Iterator[str], closing: str) -> None:
    """Write ``opening``, the ``items`` separated by commas, then ``closing``, item by item."""
    handle.write(opening)
    for n, item in enumerate(items):
        handle.write(("," if n else "") + "\n" + item)
    handle.write("\n" + closing)


def write_labelstudio(rows: Iterator[dict], open_file: Callable[[str], TextIO], image: ImageReference,
                      source: Provenance, classes: list[str]) -> int:
    count = 0

    def tasks() -> Iterator[str]:
        nonlocal count
        for row in rows:
            count += 1
            yield json.dumps(labelstudio_task(row, image(row), source.model_version()))

    with open_file("config.xml") as handle:
        handle.write(labeling_config(classes))
    with open_file("tasks.json") as handle:
        _json_items(handle, "[", tasks(), "]\n")
    return count


def write_fiftyone(rows: Iterator[dict], open_file: Callable[[str], TextIO], image: ImageReference,
                   source: Provenance, classes: list[str]) -> int:
    count = 0
    with open_file("labels.json") as labels, open_file("data.json") as data:
        labels.write(f"{{\"classes\": {json.dumps(classes)}, \"labels\": {{")
        data.write("{")
        for row in rows:
            key = json.dumps(sample_key(row["id"]))
            separator = "," if count else ""
            labels.write(f"{separator}\n{key}: {json.dumps({'label': row['label'], 'confidence': row['score']})}")
            data.write(f"{separator}\n{key}: {json.dumps(image(row))}")
            count += 1
        labels.write("\n}}\n")
        data.write("\n}\n")
    return count


def write_csv(rows: Iterator[dict], open_file: Callable[[str], TextIO], image: ImageReference,
              source: Provenance, classes: list[str]) -> int:
    count = 0
    with open_file("") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "image": image(row)})
            count += 1
    return count


WRITERS = {"labelstudio": write_labelstudio, "fiftyone": write_fiftyone, "csv": write_csv}


def class_names(con: duckdb.DuckDBPyConnection, source: Provenance) -> list[str]:
    """The run's classes, then any label of the output they lack (a run record may be missing)."""
    names = list(source.classes)
    seen = set(names)
    found = con.execute(f"SELECT DISTINCT unnest(topk_labels) AS name FROM {SELECTED_VIEW} "
                        "WHERE status = 'ok' ORDER BY name").fetchall()
    return names + [name for (name,) in found if name not in seen]


def export(output: str, fmt: str, target: str, storage: StorageConfig, where: str = "", band: Band | None = None,
           presign: int | None = None) -> tuple[int, int]:
    """Write the selected ok rows of ``output`` to ``target`` in ``fmt``; returns the rows
    written and how many of them are images inside tar or Parquet inputs."""
    con = connect(output, storage)
    try:
        select_rows(con, where, band)
        source = provenance(output, storage, Output(output, storage).runs())
        classes = class_names(con, source)
        image = ImageReference(storage, presign)

        def open_file(name: str) -> TextIO:
            return open_output(f"{target.rstrip('/')}/{name}" if name else target, storage, "w", newline="")

        count = WRITERS[fmt](review_rows(con), open_file, image, source, classes)
    except duckdb.Error as exc:
        raise QueryError(str(exc)) from None
    finally:
        con.close()
    return count, image.inside_shards


def _export(args: argparse.Namespace) -> int:
    band = Band.parse(args.review_band) if args.review_band else None
    if args.presign is not None and args.presign < 1:
        raise QueryError("--presign must be a number of seconds, at least 1")
    storage = StorageConfig(**given_options(args, STORAGE_FLAGS)["storage"])
    count, inside = export(args.output, args.format, args.output_file, storage, args.where, band, args.presign)
    print(f"{args.output_file}: {count} rows ({args.format})")
    if inside:
        print(f"note: {inside} of them are images inside tar or Parquet inputs; their image reference is their id, "
              "which a review tool cannot open: extract those images to files first", file=sys.stderr)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand to the ``lgca`` parser."""
    parser = commands.add_parser("export", help="write an output's labels as a Label Studio, FiftyOne or CSV "
                                                "review set")
    parser.add_argument("output", help="output folder or prefix written by lgca label (local or s3://)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="labelstudio (folder: tasks.json, config.xml), fiftyone (folder: labels.json, "
                             "data.json) or csv (one file)")
    parser.add_argument("-o", "--output-file", required=True, help="folder (labelstudio, fiftyone) or file (csv) "
                                                                   "to write, local path or URL")
    parser.add_argument("--where", default="", help="only rows matching this DuckDB condition over the view "
                                                    "'labels', e.g. \"label = 'cat'\"")
    parser.add_argument("--review-band", default="", metavar="LOW,HIGH",
                        help="only rows whose margin (top-1 minus top-2 score) is in [LOW, HIGH]")
    parser.add_argument("--presign", type=int, default=None, metavar="SECONDS",
                        help="reference s3:// images by presigned HTTPS URLs valid this long")
    add_option_arguments(parser, STORAGE_FLAGS)
    parser.set_defaults(handler=_export)
