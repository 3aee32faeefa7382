"""Typed, validated, frozen configuration.

Every knob of a run lives in one of these dataclasses. Each validates itself in
``__post_init__`` and raises :class:`ConfigError` with the field name and what to
change, so a bad config fails on the driver before any cluster resource is used.
The CLI and job files only fill these objects.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

from dataclasses import MISSING, dataclass, field
from typing import Any

import fsspec

METHODS = ("clip", "cupl", "wca", "lgca")
PRECISIONS = ("fp32", "fp16", "bf16")
S3_PROTOCOLS = ("s3", "s3a")
GLOB_CHARS = ("*", "?", "[")  # what fsspec expands in a path (glob, and s3fs's deletes)


# fp16 is refused wherever the model would run on a CPU: a job without GPUs (LabelJob), and a
# model whose device resolves to the CPU (model/loading.py)
FP16_ON_CPU = "fp16 needs GPUs (set gpus_per_actor > 0 for a job); use fp32 or bf16 on CPUs"


class LgcaError(Exception):
    """An error the user can act on: ``lgca`` prints its message as one line and exits with
    ``exit_code``; the message says what is wrong and what to do."""

    exit_code = 2


class ConfigError(LgcaError, ValueError):
    """A configuration value is invalid; the message says which and how to fix it."""


class SourceError(LgcaError, ValueError):
    """An input location or its layout is unusable; the message names the URI and the fix."""


class OutputError(LgcaError, ValueError):
    """An output folder holds something this pipeline cannot use or reach; the message says what."""


class QueryError(LgcaError, ValueError):
    """An output cannot be queried, or DuckDB rejected the SQL; the message says why."""


class SubmitError(LgcaError, RuntimeError):
    """The cluster could not be reached or refused the job; the message says what to do."""

    exit_code = 1


def option(help: str, default: Any = MISSING, flag: str = "", const: Any = None) -> Any:
    """A config field that is also a command-line flag and a YAML job-file key.

    ``help`` is its one-line description (shown by ``--help`` with the default); ``flag``
    is its name there when it is not the field's name with '-' for '_'; ``const``, when
    given, is the value of the flag given without one. :mod:`pipeline.options` builds every
    flag and key from these fields.
    """
    metadata = {"help": help, "flag": flag, "const": const}
    return field(metadata=metadata) if default is MISSING else field(default=default, metadata=metadata)


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def parse_aggregation(value: str, steps: int) -> tuple[float, ...]:
    """Turn an aggregation spec into step weights ``a_0 .. a_T``.

    ``mean`` gives ``1/(T+1)`` each, ``last`` puts all weight on step T, and a
    comma-separated list of T+1 numbers gives explicit weights.
    """
    if value == "mean":
        return tuple(1.0 / (steps + 1) for _ in range(steps + 1))
    if value == "last":
        return tuple(0.0 for _ in range(steps)) + (1.0,)
    try:
        weights = tuple(float(part) for part in value.split(","))
    except ValueError:
        raise ConfigError(
            f"aggregation: {value!r} is not 'mean', 'last' or a comma-separated list of numbers"
        ) from None
    _require(len(weights) == steps + 1, "aggregation",
             f"{len(weights)} weights given, but steps={steps} needs {steps + 1} (one per step 0..T)")
    _require(all(math.isfinite(w) for w in weights), "aggregation", "weights must be finite numbers")
    return weights


@dataclass(frozen=True)
class ScoringParams:
    """Parameters of the four scoring methods (symbols of METHOD.md in comments)."""

    method: str = option("which method's score gives the label: clip, cupl, wca or lgca", "lgca")
    crops: int = option("N, random square crops per image", 60)
    alpha: float = option("smallest crop side as a fraction of min(H, W)", 0.5)
    beta: float = option("largest crop side as a fraction of min(H, W)", 0.9)
    lambda_v: float = option("temperature of the crop weights w_i (e^4)", math.e ** 4)
    lambda_t: float = option("temperature of the description weights v_cj (e^2)", math.e ** 2)
    steps: int = option("T, LGCA expansion steps", 3)
    expand_top: int = option("K, crops expanded per step", 6)
    expand_ratio: float = option("r, side-length growth per expansion", 1.25)
    aggregation: str = option("how steps add up: mean, last, or T+1 comma-separated step weights", "mean")
    top_k: int = option("labels and scores kept per image and per step", 5)
    seed: int = option("run seed; the crops of an image depend only on (seed, image id)", 0)
    encode_batch_size: int = option("crops per image-encoder pass; 0 = auto: 32 on a CPU, 256 on a GPU", 0)

    def __post_init__(self) -> None:
        _require(self.method in METHODS, "method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        _require(self.crops >= 1, "crops", f"must be at least 1, got {self.crops}")
        _require(0.0 < self.alpha <= self.beta <= 1.0, "alpha/beta",
                 f"need 0 < alpha <= beta <= 1, got alpha={self.alpha}, beta={self.beta}")
        _require(self.lambda_v > 0 and math.isfinite(self.lambda_v), "lambda_v", "must be a positive number")
        _require(self.lambda_t > 0 and math.isfinite(self.lambda_t), "lambda_t", "must be a positive number")
        _require(self.steps >= 0, "steps", f"must be 0 or more, got {self.steps}")
        _require(1 <= self.expand_top <= self.crops, "expand_top",
                 f"must be between 1 and crops={self.crops}, got {self.expand_top}")
        _require(self.expand_ratio >= 1.0, "expand_ratio", f"must be at least 1, got {self.expand_ratio}")
        _require(self.top_k >= 1, "top_k", f"must be at least 1, got {self.top_k}")
        _require(self.seed >= 0, "seed", f"must be a non-negative integer, got {self.seed}")
        _require(self.encode_batch_size >= 0, "encode_batch_size", "must be 0 (auto) or more")
        parse_aggregation(self.aggregation, self.steps)

    @property
    def step_weights(self) -> tuple[float, ...]:
        """The aggregation weights ``a_0 .. a_T``."""
        return parse_aggregation(self.aggregation, self.steps)

    @property
    def needs_crops(self) -> bool:
        """wca and lgca score crops; clip and cupl need only the full view."""
        return self.method in ("wca", "lgca")

    def encoder_inputs_per_image(self) -> int:
        """Image-encoder inputs per image: 1 (clip/cupl), 1+N (wca), 1+N+T*K (lgca)."""
        if self.method == "lgca":
            return 1 + self.crops + self.steps * self.expand_top
        return 1 + self.crops if self.method == "wca" else 1


@dataclass(frozen=True)
class ModelConfig:
    """Which CLIP model to load and how to run it."""

    name: str = option("open_clip model name, or an open_clip model-config JSON file", "ViT-B-32", flag="model")
    pretrained: str = option("weights: an open_clip tag, a checkpoint file or URI, or none (random)", "openai")
    device: str = option("auto (CUDA when present), cpu, cuda or cuda:N", "auto")
    precision: str = option("fp32, fp16 (GPUs only) or bf16", "fp32")
    cache_dir: str = option("where remote checkpoints are cached; '' = ~/.cache/lgca", "")

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "model", "must name an open_clip model or a config JSON")
        _require(bool(self.pretrained.strip()), "pretrained",
                 "must be a tag, a checkpoint path or URI, or 'none' for random weights")
        _require(self.precision in PRECISIONS, "precision",
                 f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        ok_device = self.device in ("auto", "cpu", "cuda") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit())
        _require(ok_device, "device", f"{self.device!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'")


# The description sets shipped in pipeline/model/descriptions; a bare name selects one (docs/evaluation.md).
BUNDLED_SETS = ("cub", "dtd", "eurosat", "food101", "oxford_pet", "place365")
_SETS = ", ".join(BUNDLED_SETS)


@dataclass(frozen=True)
class TextConfig:
    """Where the class names, descriptions and prompt templates come from: files, or a bundled set by name."""

    classes: str = option(f"class names: a text file (one a line), a JSON list file, inline 'cat,dog', or a "
                          f"bundled set's classes by name ({_SETS})")
    descriptions: str = option("CuPL or descriptor JSON file, or a bundled set by name (its CuPL file; its "
                               "Menon-Vondrick descriptors with --descriptions-format descriptors); "
                               "'' uses the prompts as descriptions", "")
    descriptions_format: str = option("cupl, descriptors or auto (detected from the file; cupl for a bundled set)",
                                      "auto")
    templates: str = option("JSON list of '{}' prompt templates, or a bundled set by name; "
                            "'' = [\"a photo of a {}.\"]", "")

    def __post_init__(self) -> None:
        _require(bool(self.classes.strip()), "classes", "give a file of class names or a comma-separated list")
        _require(self.descriptions_format in ("auto", "cupl", "descriptors"), "descriptions_format",
                 f"{self.descriptions_format!r} is not 'auto', 'cupl' or 'descriptors'")


@dataclass(frozen=True)
class StorageConfig:
    """How to reach object storage; only S3 (s3fs) takes options today."""

    endpoint_url: str = option("S3-compatible endpoint URL; '' = AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS", "")
    anon: bool = option("anonymous object-storage access, for public buckets", False)
    retries: int = option("attempts per object-storage request, botocore's standard retry mode with backoff "
                          "(AWS_MAX_ATTEMPTS and AWS_RETRY_MODE win when set)", 10)
    profile: str = option("AWS profile; '' = the default chain (AWS_* variables, ~/.aws, instance role)", "")
    region: str = option("AWS region; '' = AWS_REGION, AWS_DEFAULT_REGION or the profile's", "")

    def __post_init__(self) -> None:
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint_url: {self.endpoint_url!r} must start with http:// or https://")
        if self.anon and self.profile:
            raise ConfigError("profile: anonymous access (anon=True) uses no credentials; drop profile or anon")
        _require(self.retries >= 1, "retries", f"must be at least 1 (one attempt, no retry), got {self.retries}")

    def storage_options(self, protocol: str) -> dict:
        """fsspec ``storage_options`` for ``protocol``: s3fs keyword arguments for s3/s3a, else ``{}``.

        The endpoint is read from the environment at call time when
        ``endpoint_url`` is empty, so the process that opens the files decides.
        """
        if protocol not in S3_PROTOCOLS:
            return {}
        options: dict = {"anon": self.anon}
        if self.profile:
            options["profile"] = self.profile
        client_kwargs = {}
        endpoint = (self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        if not (os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")):
            # botocore's default (legacy mode, 5 attempts within about 15 s) gives up inside a
            # short outage of the store; standard mode backs off up to 20 s between attempts
            options["config_kwargs"] = {"retries": {"mode": "standard", "max_attempts": self.retries}}
        return options


def to_dict(config: object) -> dict:
    """A JSON-ready dict of a config dataclass, for run metadata."""
    return dataclasses.asdict(config)  # type: ignore[arg-type]


INPUT_FORMATS = ("auto", "files", "tar", "parquet")


@dataclass(frozen=True)
class InputConfig:
    """What to label: image files, WebDataset tar shards or Parquet files."""

    uris: tuple[str, ...] = option("folder, prefix, glob or file to label, local or any fsspec URL (repeatable)", flag="input")
    format: str = option("files, tar, parquet, or auto (from each input's extension)", "auto", flag="input-format")
    image_column: str = option("Parquet: the column of encoded image bytes", "image")
    id_column: str = option("Parquet: the column of image ids; '' = <file uri>#<row number>", "id")

    def __post_init__(self) -> None:
        _require(len(self.uris) > 0, "input", "give at least one --input folder, prefix, glob or file")
        _require(all(u.strip() for u in self.uris), "input", "an --input value is empty")
        _require(self.format in INPUT_FORMATS, "input_format",
                 f"{self.format!r} is not one of {', '.join(INPUT_FORMATS)}")
        _require(bool(self.image_column), "image_column", "must name the Parquet column with image bytes")


DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's decompression-bomb limit; larger images become error rows
AUTO_ROWS_PER_FILE_GPU = 4096  # under 20 s of one H200's lgca output with ViT-B-32 (docs/benchmarks.md)


@dataclass(frozen=True)
class ResourceConfig:
    """How the job uses the cluster."""

    actors_min: int = option("model actors: N, or MIN-MAX to autoscale", 1, flag="actors")
    actors_max: int = 1  # model actors to scale up to (autoscaling when larger than actors_min); set by --actors
    gpus_per_actor: float = option("GPUs each model actor reserves; 0 runs the model on CPUs", 0.0)
    cpus_per_actor: float = option("CPUs each model actor reserves", 1.0)
    threads_per_actor: int = option("torch threads of a model actor; 0 = its CPU reservation", 0)
    batch_size: int = option("images per model-actor call", 32)
    rows_per_file: int = option("rows per output Parquet file; 0 = auto: one actor call on CPUs, 4096 with GPUs", 0)
    max_pixels: int = option("images with more pixels become error rows", DEFAULT_MAX_PIXELS)

    def __post_init__(self) -> None:
        _require(1 <= self.actors_min <= self.actors_max, "actors",
                 f"need 1 <= min <= max, got {self.actors_min}-{self.actors_max}")
        _require(0 <= self.gpus_per_actor < math.inf, "gpus_per_actor", "must be a number, 0 or more")
        _require(0 < self.cpus_per_actor < math.inf, "cpus_per_actor", "must be a number more than 0")
        _require(self.threads_per_actor >= 0, "threads_per_actor", "must be 0 (as reserved) or more")
        _require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        _require(self.rows_per_file >= 0, "rows_per_file", "must be 0 (auto) or more")
        _require(self.max_pixels >= 1, "max_pixels", "must be at least 1")

    @property
    def file_rows(self) -> int:
        """Rows written per Parquet file (the last file of a run may hold fewer).

        Rows are written once this many are labelled, so a killed run relabels at most this
        many per writer. Auto: one file per actor call on CPUs (a call takes minutes there),
        AUTO_ROWS_PER_FILE_GPU with GPUs (a call takes a fraction of a second: one file per
        call would mean millions of tiny files for a billion images).
        """
        if self.rows_per_file:
            return max(self.rows_per_file, self.batch_size)
        return AUTO_ROWS_PER_FILE_GPU if self.gpus_per_actor > 0 else self.batch_size


STATE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class StatesConfig:
    """Whether ``lgca label`` keeps each ok image's states (k_0, p_0..p_T) in its rows, for
    ``lgca relabel`` and ``lgca search`` (docs/output-schema.md)."""

    keep: str = option("keep each image's states (k_0, p_0..p_T) for lgca relabel and lgca search: keep or none",
                       "keep", flag="states")
    dtype: str = option("the kept states' number type: float16 (about 5 KB per image for ViT-B-32) or float32",
                        "float16", flag="state-dtype")

    def __post_init__(self) -> None:
        _require(self.keep in ("keep", "none"), "states", f"{self.keep!r} is not 'keep' or 'none'")
        _require(self.dtype in STATE_DTYPES, "state_dtype", f"{self.dtype!r} is not one of {', '.join(STATE_DTYPES)}")

    @property
    def kept(self) -> bool:
        return self.keep == "keep"


@dataclass(frozen=True)
class LabelJob:
    """Everything one ``lgca label`` run needs, validated as a whole before Ray starts."""

    inputs: InputConfig
    output: str = option("folder or prefix the Parquet labels and run records go to")
    text: TextConfig
    model: ModelConfig = ModelConfig()
    scoring: ScoringParams = ScoringParams()
    resources: ResourceConfig = ResourceConfig()
    storage: StorageConfig = StorageConfig()
    states: StatesConfig = StatesConfig()
    overwrite: bool = option("relabel everything, replacing the existing output", False)
    retry_errors: str = option("label again the ids whose error row has one of these stages, comma-separated "
                               "(the flag alone: read); docs/reliability.md", "", const="read")
    address: str = option("Ray address; '' = RAY_ADDRESS, else a new local Ray", "")
    name: str = option("job name, the start of its submission ids", "lgca-label")

    def __post_init__(self) -> None:
        _check_output_and_name(self.output, self.name)
        gpu = self.resources.gpus_per_actor > 0
        _require(not (gpu and self.model.device == "cpu"), "gpus_per_actor",
                 f"{self.resources.gpus_per_actor:g} with device cpu reserves GPUs the model never uses; "
                 "use --gpus-per-actor 0 or --device cuda/auto")
        _require(gpu or self.model.precision != "fp16", "precision", FP16_ON_CPU)
        _require(gpu or not self.model.device.startswith("cuda"), "device",
                 f"device {self.model.device!r} needs gpus_per_actor > 0")


def option_of(cls: type, name: str, **changes: Any) -> Any:
    """The option of field ``name`` of config class ``cls`` again (its help, default and flag), for
    another command's config that takes the same option; ``changes`` replace help or default."""
    found = cls.__dataclass_fields__[name]
    default = changes.get("default", found.default)
    return option(changes.get("help", found.metadata["help"]), default, found.metadata["flag"])


@dataclass(frozen=True)
class RelabelScoring:
    """The text side of ``lgca relabel``: what may change without encoding an image again.
    Defaults are those of ``lgca label``, except ``steps``; the aggregation is checked against
    T once the source's manifest is read."""

    method: str = option_of(ScoringParams, "method",
                            help="which method's score gives the label: clip, cupl, wca or lgca (lgca needs an "
                                 "lgca source, wca a wca or lgca one)")
    steps: int = option("T, LGCA steps scored: at most the source's (its p_0..p_T are a prefix); -1 = the source's", -1)
    aggregation: str = option_of(ScoringParams, "aggregation")
    lambda_t: float = option_of(ScoringParams, "lambda_t")
    top_k: int = option_of(ScoringParams, "top_k")

    def __post_init__(self) -> None:
        _require(self.method in METHODS, "method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        _require(self.steps >= -1, "steps", f"must be -1 (the source's) or 0 or more, got {self.steps}")
        _require(self.lambda_t > 0 and math.isfinite(self.lambda_t), "lambda_t", "must be a positive number")
        _require(self.top_k >= 1, "top_k", f"must be at least 1, got {self.top_k}")


@dataclass(frozen=True)
class RelabelModel:
    """The model whose text tower encodes the classes: the source's (checked), on this machine."""

    name: str = option("the source's model (from its manifest); given, it must be the same", "", flag="model")
    pretrained: str = option("the source's weights (from its manifest); given, it must be the same", "")
    device: str = option_of(ModelConfig, "device", help="where the driver encodes the class texts: auto, cpu, cuda or cuda:N")
    precision: str = option_of(ModelConfig, "precision", help="of the text tower: fp32, fp16 (GPUs only) or bf16")
    cache_dir: str = option_of(ModelConfig, "cache_dir")

    def config(self, name: str, pretrained: str) -> ModelConfig:
        """The :class:`ModelConfig` of the source's model and weights, run here."""
        return ModelConfig(name=name, pretrained=pretrained, device=self.device, precision=self.precision,
                           cache_dir=self.cache_dir)


@dataclass(frozen=True)
class RelabelResources:
    """How a relabel uses the cluster: CPU tasks that read the source's rows and score them."""

    batch_size: int = option("source rows per scoring call", 4096)
    cpus_per_task: float = option("CPUs each read-and-score task reserves (torch uses as many threads)", 1.0)
    rows_per_file: int = option("rows per output Parquet file; 0 = auto: 4 scoring calls", 0)

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        _require(0 < self.cpus_per_task < math.inf, "cpus_per_task", "must be a number more than 0")
        _require(self.rows_per_file >= 0, "rows_per_file", "must be 0 (auto) or more")

    @property
    def file_rows(self) -> int:
        """Rows written per Parquet file (the last file of a run may hold fewer)."""
        return max(self.rows_per_file, self.batch_size) if self.rows_per_file else 4 * self.batch_size


@dataclass(frozen=True)
class RelabelJob:
    """One ``lgca relabel`` run: a labelled output's image states, scored with another text side."""

    source: str = option("the lgca label output whose image states are scored (kept with --states keep)")
    output: str = option("folder or prefix the new labels and run records go to (not the source)")
    text: TextConfig
    scoring: RelabelScoring = RelabelScoring()
    model: RelabelModel = RelabelModel()
    resources: RelabelResources = RelabelResources()
    storage: StorageConfig = StorageConfig()
    overwrite: bool = option("score everything again, replacing the existing output", False)
    address: str = option("Ray address; '' = RAY_ADDRESS, else a new local Ray", "")
    name: str = option("job name, the start of its submission ids", "lgca-relabel")

    def __post_init__(self) -> None:
        _require(bool(self.source.strip()), "source", "give the lgca label output to relabel")
        _require(self.source.rstrip("/") != self.output.rstrip("/"), "output",
                 "must not be the source: relabel writes a new output and leaves the source as it is")
        _check_output_and_name(self.output, self.name)


def _check_output_and_name(output: str, name: str) -> None:
    """The checks of a job's output and name that ``LabelJob`` and ``RelabelJob`` share."""
    _require(bool(output.strip()), "output", "give the folder or prefix to write labels to")
    _require(fsspec.utils.get_protocol(output) in ("file", "local")
             or not any(char in output for char in GLOB_CHARS), "output",
             f"{output!r} holds a glob character (* ? [), which object-store deletes (--overwrite, "
             "partial files, shard records) would expand, removing other prefixes; use an output without them")
    _require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None, "name",
             f"{name!r} must start with a letter or digit and hold only ASCII letters, digits, "
             "'-', '_' and '.' (it starts the Ray submission id), for example lgca-pets")
