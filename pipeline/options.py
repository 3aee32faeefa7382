"""Job specs: one table of options feeds the ``lgca label`` flags and the YAML job files.

A YAML job file uses the flag names as keys (``gpus-per-actor`` or ``gpus_per_actor``);
flags given on the command line win over the file. :func:`build_job` turns the merged
options into a validated :class:`~pipeline.config.LabelJob`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Sequence

import fsspec
import yaml

from pipeline.config import (ConfigError, InputConfig, LabelJob, ModelConfig, ResourceConfig, ScoringParams,
                             StorageConfig, TextConfig)


@dataclass(frozen=True)
class Option:
    """One job option: its flag, the config section and field it fills, and its type."""

    flag: str  # the command-line flag without dashes, also the YAML key
    section: str  # LabelJob field holding the config object ('' for LabelJob itself)
    field: str  # field name inside that section
    kind: type = str  # str, int, float, or bool for an on/off flag (a flag without a value)
    help: str = ""
    multiple: bool = False  # may be given several times (a YAML list)


OPTIONS = (
    Option("input", "inputs", "uris", help="folder, prefix, glob or file to label (repeatable)", multiple=True),
    Option("input-format", "inputs", "format", help="files, tar, parquet or auto"),
    Option("image-column", "inputs", "image_column", help="Parquet column with image bytes"),
    Option("id-column", "inputs", "id_column", help="Parquet column with image ids"),
    Option("output", "", "output", help="folder or prefix for the Parquet labels"),
    Option("classes", "text", "classes", help="class file (.txt/.json) or inline 'cat,dog'"),
    Option("descriptions", "text", "descriptions", help="CuPL or descriptor JSON file"),
    Option("descriptions-format", "text", "descriptions_format", help="cupl, descriptors or auto"),
    Option("templates", "text", "templates", help="JSON list of '{}' prompt templates"),
    Option("model", "model", "name", help="open_clip model name or model-config JSON"),
    Option("pretrained", "model", "pretrained", help="open_clip tag, checkpoint path or URI, or none"),
    Option("device", "model", "device", help="auto, cpu, cuda or cuda:N"),
    Option("precision", "model", "precision", help="fp32, fp16 or bf16"),
    Option("cache-dir", "model", "cache_dir", help="where remote checkpoints are cached"),
    Option("method", "scoring", "method", help="clip, cupl, wca or lgca (default lgca)"),
    Option("crops", "scoring", "crops", int, "crops per image (N)"),
    Option("alpha", "scoring", "alpha", float, "smallest crop side / min(H, W)"),
    Option("beta", "scoring", "beta", float, "largest crop side / min(H, W)"),
    Option("lambda-v", "scoring", "lambda_v", float, "crop-weight temperature"),
    Option("lambda-t", "scoring", "lambda_t", float, "description-weight temperature"),
    Option("steps", "scoring", "steps", int, "LGCA expansion steps (T)"),
    Option("expand-top", "scoring", "expand_top", int, "crops expanded per step (K)"),
    Option("expand-ratio", "scoring", "expand_ratio", float, "side growth per expansion (r)"),
    Option("aggregation", "scoring", "aggregation", help="mean, last or T+1 comma-separated weights"),
    Option("top-k", "scoring", "top_k", int, "labels kept per image and step"),
    Option("seed", "scoring", "seed", int, "run seed for the crops"),
    Option("encode-batch-size", "scoring", "encode_batch_size", int,
           "crops per encoder pass (0 = auto: 32 on a CPU, 256 on a GPU)"),
    Option("batch-size", "resources", "batch_size", int, "images per model-actor call"),
    Option("rows-per-file", "resources", "rows_per_file", int,
           "rows per output Parquet file (0 = auto: one actor call on CPUs, 4096 with GPUs)"),
    Option("actors", "resources", "actors", help="model actors: N or MIN-MAX"),
    Option("gpus-per-actor", "resources", "gpus_per_actor", float, "GPUs per model actor"),
    Option("cpus-per-actor", "resources", "cpus_per_actor", float, "CPUs per model actor"),
    Option("threads-per-actor", "resources", "threads_per_actor", int,
           "torch threads per model actor (default: its CPUs)"),
    Option("max-pixels", "resources", "max_pixels", int, "larger images become error rows"),
    Option("endpoint-url", "storage", "endpoint_url", help="S3-compatible endpoint URL"),
    Option("anon", "storage", "anon", bool, "anonymous object-storage access"),
    Option("profile", "storage", "profile", help="AWS profile"),
    Option("region", "storage", "region", help="AWS region"),
    Option("overwrite", "", "overwrite", bool, "relabel everything, replacing the output"),
    Option("address", "", "address", help="Ray address (default: RAY_ADDRESS or a local Ray)"),
    Option("name", "", "name", help="job name"),
)
BY_KEY = {option.flag: option for option in OPTIONS}
# The options that shape one image's scores (text, model, scoring without method and top-k,
# storage): what `lgca explain` and `lgca eval` take from `lgca label`.
SCORING_FLAGS = tuple(option.flag for option in OPTIONS if option.section in ("text", "model", "scoring", "storage")
                      and option.flag not in ("method", "top-k"))


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every job option as a flag; unset flags stay ``None`` so the YAML file can fill them."""
    parser.add_argument("--config", help="YAML job file; flags given here win over it")
    for option in OPTIONS:
        if option.kind is bool:
            parser.add_argument(f"--{option.flag}", action="store_const", const=True, default=None,
                                help=option.help)
        else:
            parser.add_argument(f"--{option.flag}", action="append" if option.multiple else "store",
                                help=option.help)


def add_option_arguments(parser: argparse.ArgumentParser, flags: Sequence[str], required: Sequence[str] = ()) -> None:
    """Add some ``lgca label`` options to another command: same names, types and help; unset
    flags stay ``None`` (read them back with :func:`given_options`)."""
    for flag in flags:
        option = BY_KEY[flag]
        if option.kind is bool:
            parser.add_argument(f"--{flag}", action="store_const", const=True, default=None, help=option.help)
        else:
            parser.add_argument(f"--{flag}", type=option.kind, required=flag in required, help=option.help)


def given_options(args: argparse.Namespace, flags: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The flags among ``flags`` that were given, as ``{section: {field: value}}`` (every
    section of OPTIONS is present, possibly empty; '' holds the job's own fields)."""
    sections: dict[str, dict[str, Any]] = {option.section: {} for option in OPTIONS}
    for flag in flags:
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            sections[BY_KEY[flag].section][BY_KEY[flag].field] = value
    return sections


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key, _ in node.value:
            spelled = (key.tag, key.value) if isinstance(key, yaml.ScalarNode) else id(key)
            if spelled in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key.value!r} is given twice; keep one",
                                                        key.start_mark)
            seen.add(spelled)
        return super().construct_mapping(node, deep)


def read_job_file(uri: str) -> dict[str, Any]:
    """Read a YAML job file into ``{flag: value}``; unknown, repeated and empty keys are errors."""
    try:
        with fsspec.open(uri, "r") as handle:
            data = yaml.load(handle, Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ConfigError(f"config: job file {uri} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {uri} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {uri} must hold a mapping of option: value, got {type(data).__name__}")
    keys: dict[str, Any] = {}  # flag -> the key that gives it
    for key, value in data.items():
        flag = str(key).replace("_", "-")
        if flag not in BY_KEY:
            raise ConfigError(f"config: unknown key {key!r} in {uri}; known keys: {', '.join(BY_KEY)}")
        if flag in keys:
            raise ConfigError(f"config: {keys[flag]!r} and {key!r} in {uri} both give {flag}; keep one")
        if value is None:
            raise ConfigError(f"config: job file key {key!r} is empty; give a value or remove the key")
        keys[flag] = key
    return {flag: data[key] for flag, key in keys.items()}


def merge_options(file_options: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """File options overridden by every job flag that was given (not ``None``)."""
    merged = dict(file_options)
    given = {key.replace("_", "-"): value for key, value in flags.items() if value is not None}
    merged.update({flag: value for flag, value in given.items() if flag in BY_KEY})
    return merged


# Per option kind: the types a value may have (a flag's is a string; a YAML value keeps its
# own type) and what an error says is expected. A bool is an int in Python: refused apart.
ACCEPTED = {str: ((str,), "a string"), int: ((str, int), "a whole number"),
            float: ((str, int, float), "a number"), bool: ((bool,), "true or false")}


def _convert_one(option: Option, value: Any) -> Any:
    """One value in the option's type; a value of another type is refused, never forced into it
    (a YAML number given for text could lose digits: 1.10 reads as 1.1)."""
    types, expected = ACCEPTED[option.kind]
    if option.kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, types) and (option.kind is bool or not isinstance(value, bool)):
        try:
            return option.kind(value)
        except ValueError:
            pass
    hint = (f"; put it in quotes if it is meant as text ({option.flag}: \"{value}\")"
            if option.kind is str and isinstance(value, (int, float)) and not isinstance(value, bool) else "")
    raise ConfigError(f"{option.flag}: {value!r} is not valid; expected {expected} for {option.help}{hint}")


def _convert(option: Option, value: Any) -> Any:
    """A flag string or YAML value in the option's type; a list only for a repeatable option."""
    if option.multiple:
        return tuple(_convert_one(option, v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return _convert_one(option, value)


def parse_actors(value: str) -> tuple[int, int]:
    """``'4'`` -> (4, 4); ``'1-8'`` -> (1, 8)."""
    text = str(value).strip()
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise ConfigError(f"actors: {value!r} is not N or MIN-MAX (for example 4 or 1-8)") from None


def build_job(options: dict[str, Any]) -> LabelJob:
    """Build and validate a :class:`LabelJob` from merged options (flag names as keys)."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in
                                           ("inputs", "text", "model", "scoring", "resources", "storage", "")}
    for flag, value in options.items():
        option = BY_KEY.get(flag)
        if option is None:
            raise ConfigError(f"unknown option {flag!r}; known: {', '.join(BY_KEY)}")
        if flag == "actors":
            low, high = parse_actors(value)
            sections["resources"].update(actors_min=low, actors_max=high)
            continue
        sections[option.section][option.field] = _convert(option, value)
    for required in ("input", "output", "classes"):
        if required not in options:
            raise ConfigError(f"{required}: missing; give --{required} or '{required}:' in the job file")
    top = sections[""]
    return LabelJob(
        inputs=InputConfig(**sections["inputs"]), output=top.pop("output"),
        text=TextConfig(**sections["text"]), model=ModelConfig(**sections["model"]),
        scoring=ScoringParams(**sections["scoring"]), resources=ResourceConfig(**sections["resources"]),
        storage=StorageConfig(**sections["storage"]), **top)


def job_from_args(args: argparse.Namespace) -> LabelJob:
    """The job described by parsed ``lgca label`` arguments and their ``--config`` file."""
    file_options = read_job_file(args.config) if args.config else {}
    return build_job(merge_options(file_options, vars(args)))


def job_to_options(job: LabelJob) -> dict[str, Any]:
    """The options that rebuild ``job`` (the inverse of :func:`build_job`), for job files."""
    out: dict[str, Any] = {}
    for option in OPTIONS:
        if option.flag == "actors":
            res = job.resources
            out["actors"] = f"{res.actors_min}-{res.actors_max}"
            continue
        holder = getattr(job, option.section) if option.section else job
        value = getattr(holder, option.field)
        out[option.flag] = list(value) if option.multiple else value
    return out

