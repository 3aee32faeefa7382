"""``lgca search SOURCE "text"`` (or ``--image FILE``): the exact top N images of a labelled
output by cosine between a query vector and the image states it kept. Ray-free: the data files
are streamed with pyarrow and a running top-N is kept with numpy (memory flat in the number
of images); only the rows that make the top N are read again for their id, uri and label.

The query is encoded by the source's model (from its manifest): a text by the text tower, as
given (no template), an image by the image tower's full view (``k_0``, decoded as ``lgca
label`` decodes it). ``--vector full`` ranks by ``cos(k_0, q)``, ``wca`` by ``cos(p_0, q)``,
``lgca`` by ``sum_t a_t cos(p_t, q)`` with the source's aggregation (LGCA's score of a class
whose vector is ``q``).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from typing import TextIO

import numpy as np
import pyarrow as pa

from pipeline.config import ConfigError, ModelConfig, ScoringParams, StorageConfig, parse_aggregation
from pipeline.data.decode import DecodeLimits, decode_image
from pipeline.data.output import Output, manifest_form
from pipeline.data.retry import readable_files
from pipeline.data.states import StateSpec
from pipeline.data.stored import Ranked, VECTORS, ranked_rows, search_files
from pipeline.options import add_option_arguments, given_options
from pipeline.storage import filesystem, full_uri

FORMATS = ("table", "csv", "json")
COLUMNS = ("id", "uri", "label")
STORAGE_FLAGS = ("endpoint-url", "anon", "profile", "region")


@dataclass(frozen=True)
class SearchSource:
    """What a search needs of the source's manifest: its model and weights, its states, and the
    step weights of ``--vector lgca``."""

    model: str
    pretrained: str
    spec: StateSpec
    weights: np.ndarray | None  # None: rank k_0; else the weights of p_0.. p_{len-1}


def search_source(source: str, vector: str, storage: StorageConfig) -> SearchSource:
    """Read and check the source's manifest for ``vector``; ConfigError says what to use instead."""
    manifest = Output(source, storage).read_manifest()
    if manifest is None:
        raise ConfigError(f"source: {source} has no _lgca/manifest.json: give the output of an lgca label run")
    form = manifest_form(manifest)
    if form.get("states") is None:
        raise ConfigError(f"source: {source} keeps no image states (labelled with --states none, before lgca "
                          "label kept them, or an lgca relabel output); search the output of an lgca label run "
                          "that keeps them (--states keep, the default)")
    spec, image = StateSpec.from_json(form["states"]), form["image"]
    weights = None
    if vector == "wca" and spec.steps >= 1:
        weights = np.ones(1, np.float32)
    elif vector == "lgca" and spec.steps >= 2:
        weights = np.array(parse_aggregation(form["text"].get("aggregation", "mean"), spec.steps - 1), np.float32)
    elif vector != "full":
        kept = "k_0 only (a clip/cupl run)" if spec.steps == 0 else "k_0 and p_0 only (a wca run)"
        raise ConfigError(f"vector: {source} keeps {kept}; search it with --vector full"
                          f"{' or --vector wca' if spec.steps else ''}")
    return SearchSource(image["model"], image["pretrained"], spec, weights)


def query_vector(args: argparse.Namespace, source: SearchSource, storage: StorageConfig) -> np.ndarray:
    """The normalised ``[D]`` query: the text through the model's text tower, or the image's ``k_0``."""
    from pipeline.method.engine import ImageEncoder, ImageInput
    from pipeline.method.textbank import encode_texts
    from pipeline.model.loading import load_model, random_weights_note, random_weights_said_elsewhere

    device = given_options(args, ("device",))["model"].get("device", "auto")  # where the query is encoded
    with random_weights_said_elsewhere():  # said once below, on stderr (stdout may be CSV or JSON)
        loaded = load_model(ModelConfig(name=source.model, pretrained=source.pretrained, device=device), storage)
    if source.pretrained.lower() == "none":
        print(f"note: {random_weights_note(loaded.name)}", file=sys.stderr)
    if args.image is None:
        return encode_texts(loaded.model, loaded.tokenizer, [args.text], 1, loaded.device)[0].cpu().numpy()
    fs, path = filesystem(args.image, storage)
    try:
        with fs.open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError(f"image: cannot read {args.image} ({type(exc).__name__}: {exc})") from None
    clip = ScoringParams(method="clip")
    decoded = decode_image(data, DecodeLimits.for_model(loaded.preprocess.image_size, clip))
    if decoded.error:
        raise ConfigError(f"image: {args.image} cannot be encoded: {decoded.error}")
    image = ImageInput(full_uri(fs, path), decoded.pixels, decoded.height, decoded.width)
    encoder = ImageEncoder(loaded.model, clip, loaded.preprocess, loaded.device, loaded.dtype)
    return encoder.encode([image]).full[0].float().cpu().numpy()


def search(args: argparse.Namespace, storage: StorageConfig) -> tuple[pa.Table, Ranked]:
    """The top ``args.top`` rows of ``args.source`` for the query of ``args``, and the ranking."""
    source = search_source(args.source, args.vector, storage)
    output = Output(args.source, storage)
    paths = readable_files(output)  # without the files a --retry-errors run is replacing
    if not paths:
        raise ConfigError(f"source: no labels under {output.data}; run lgca label first")
    query = query_vector(args, source, storage).astype(np.float32)
    if len(query) != source.spec.dim:
        raise ConfigError(f"model: {source.model} gives {len(query)} values per vector, but the states of "
                          f"{args.source} hold {source.spec.dim}: the source's manifest does not match its model")
    fs, _ = filesystem(output.data, storage)
    ranked = search_files(fs, paths, query, source.spec, source.weights, args.top)
    return ranked_rows(fs, paths, ranked, COLUMNS), ranked


def print_rows(table: pa.Table, fmt: str, out: TextIO) -> None:
    """The ranked rows as an aligned table, CSV with a header, or JSON Lines."""
    rows = [{"rank": i + 1, **row} for i, row in enumerate(table.select([*COLUMNS, "score"]).to_pylist())]
    if fmt == "json":
        out.writelines(json.dumps(row) + "\n" for row in rows)
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=["rank", *COLUMNS, "score"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        cells = [["rank", "score", "label", "id", "uri"]] + [
            [str(r["rank"]), f"{r['score']:.4f}", str(r["label"]), str(r["id"]), str(r["uri"])] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(4)]
        out.writelines("  ".join([*(c.ljust(w) for c, w in zip(row[:4], widths)), row[4]]).rstrip() + "\n"
                       for row in cells)


def _search(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.image is None):
        raise ConfigError("give a query: a TEXT or --image FILE (one of them)")
    if args.top < 1:
        raise ConfigError(f"top: must be at least 1, got {args.top}")
    storage = StorageConfig(**given_options(args, STORAGE_FLAGS)["storage"])
    table, ranked = search(args, storage)
    print_rows(table, args.format, sys.stdout)
    if ranked.skipped:
        print(f"lgca search: {ranked.skipped} of {ranked.searched + ranked.skipped} rows hold no usable states "
              "(error rows, or rows labelled before states were kept) and were not searched", file=sys.stderr)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``search`` subcommand to the ``lgca`` command line."""
    parser = commands.add_parser("search", help="the top N images of a labelled output for a text or an image "
                                                "(exact, over the kept image states)")
    parser.add_argument("source", metavar="SOURCE", help="an lgca label output that kept its image states")
    parser.add_argument("text", nargs="?", help="the query text, encoded as given (e.g. 'a photo of a red car')")
    parser.add_argument("--image", help="query by an image file or URL instead of a text")
    parser.add_argument("--top", type=int, default=10, help="rows to show (default: 10)")
    parser.add_argument("--vector", choices=VECTORS, default="full",
                        help="the image vector ranked: full (k_0, default), wca (p_0) or lgca (sum_t a_t p_t)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="table (default), csv or json (lines)")
    add_option_arguments(parser, ("device", *STORAGE_FLAGS))
    parser.set_defaults(handler=_search)
