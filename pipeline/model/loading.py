"""Load an open_clip model with its tokenizer and preprocessing.

A :class:`~pipeline.config.ModelConfig` names the architecture (an open_clip
model name, or a path to an open_clip model-config JSON) and the weights: an
open_clip pretrained tag, a local checkpoint file, an fsspec URI that is fetched
once into a local cache, or ``none`` for random weights. Everything the scoring
code needs to know about the model -- its input size, normalisation, tokenizer,
device and dtype -- is read from the loaded model and returned in one
:class:`LoadedModel`; nothing here copies preprocessing constants.

The builtin configs in ``pipeline/model/configs`` (``lgca-tiny``, a very small
ViT CLIP for tests) are registered with open_clip by
:func:`register_builtin_configs`, which the public functions call explicitly.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import pickle
import re
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import open_clip
import torch

from pipeline.config import ConfigError, FP16_ON_CPU, ModelConfig, StorageConfig
from pipeline.method.crops import Preprocess
from pipeline.model.checkpoints import fetch_checkpoint, sha256_file
from pipeline.model.tags import fetch_tag_weights
from pipeline.storage import filesystem

BUILTIN_CONFIG_DIR = Path(__file__).parent / "configs"
REQUIRED_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
# Our precision names -> open_clip's: the 'pure_' variants cast every weight.
OPEN_CLIP_PRECISION = {"fp32": "fp32", "fp16": "pure_fp16", "bf16": "pure_bf16"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_URI_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# torch.nn.init's in-place initialisers: what modules call to fill their weights at construction.
INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                  "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                  "sparse_")
# open_clip loads these (big_vision) checkpoints tensor by tensor, not with a strict load_state_dict
NOT_STRICT_SUFFIXES = (".npz", ".npy")
# What open_clip logs when create_model got no weights: wrong where a checkpoint file is loaded after
# it, and said once (by RandomWeightsWarning) where the weights are random
OPEN_CLIP_NO_WEIGHTS = "No pretrained weights loaded"
# Random weights (pretrained 'none') are drawn from this seed: the same model in every actor and run
RANDOM_WEIGHTS_SEED = 0
CLOSE_NAMES = 5  # model names a "did you mean" offers at most


class RandomWeightsWarning(UserWarning):
    """A model with random weights (pretrained 'none') was loaded: its labels mean nothing."""


def preprocess_from_model(model: torch.nn.Module) -> Preprocess:
    """Read the preprocessing open_clip stored on ``model`` (``get_model_preprocess_cfg``)."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    missing = [k for k in ("size", "mean", "std", "interpolation", "resize_mode") if k not in cfg]
    if missing:
        raise ConfigError(
            f"model: its preprocess config lacks {', '.join(missing)}; build it with open_clip.create_model")
    return Preprocess(
        image_size=_square_side(cfg["size"], "preprocess"),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg["interpolation"]),
        resize_mode=str(cfg["resize_mode"]),
    )


@dataclass
class LoadedModel:
    """A ready-to-use model and everything needed to feed it."""

    model: torch.nn.Module  # open_clip model in eval mode, on `device`, weights in `dtype`
    tokenizer: Callable[[list[str]], torch.Tensor]  # texts -> [n, context_length] token ids
    preprocess: Preprocess
    device: torch.device
    dtype: torch.dtype
    name: str  # open_clip model name as resolved (a config JSON path becomes its stem)
    pretrained: str  # the pretrained value as given
    checkpoint: Path | None = None  # the local checkpoint file loaded; None for tags and 'none'

    @property
    def checkpoint_sha256(self) -> str | None:
        """sha256 of the checkpoint file, read only when asked (it can be gigabytes)."""
        return sha256_file(self.checkpoint) if self.checkpoint is not None else None


@dataclass(frozen=True)
class _Weights:
    """Where the weights come from; neither field set means random weights."""

    tag: str | None  # open_clip pretrained tag, downloaded by open_clip
    checkpoint: Path | None  # local checkpoint file

    @property
    def random(self) -> bool:
        return self.tag is None and self.checkpoint is None

    @property
    def strict(self) -> bool:
        """Whether the load replaces every parameter and persistent buffer or fails."""
        return self.tag is not None or (
            self.checkpoint is not None and not self.checkpoint.name.lower().endswith(NOT_STRICT_SUFFIXES))


def _square_side(size: Any, where: str) -> int:
    """The side of a square image size given as an int or an (h, w) pair."""
    if isinstance(size, int):
        return size
    if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    raise ConfigError(f"{where}: model input size {size!r} is not square; only square inputs are supported")


def _register_config_file(path: Path) -> str:
    """Register one model-config JSON with open_clip and return its model name (the stem).

    Registering the same content twice is a no-op; a different architecture under
    an already registered name is refused rather than silently replacing it.
    """
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"model: {path} is not valid JSON: {err}") from err
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ConfigError(f"model: {path} is not an open_clip model config; missing keys: {', '.join(missing)}")
    name = path.stem
    registered = open_clip.get_model_config(name)
    if registered is None:
        open_clip.add_model_config(path)
    elif registered != config:
        raise ConfigError(
            f"model: {path} defines a different architecture for the already registered "
            f"model {name!r}; rename the file")
    return name


def register_builtin_configs() -> None:
    """Register ``pipeline/model/configs/*.json`` with open_clip (idempotent)."""
    for path in sorted(BUILTIN_CONFIG_DIR.glob("*.json")):
        _register_config_file(path)


def resolve_model_name(name: str) -> str:
    """The open_clip model name for ``name``: a registered name or a model-config JSON path.

    A JSON path is registered and its stem returned. ``ViT-B/32`` style names
    resolve like open_clip does (``/`` -> ``-``).
    """
    register_builtin_configs()
    if name.endswith(".json"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"model: config file {path} not found")
        return _register_config_file(path)
    available = open_clip.list_models()
    for candidate in (name, name.replace("/", "-")):
        if candidate in available:
            return candidate
    close = difflib.get_close_matches(name, available, n=CLOSE_NAMES, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(
        f"model: {name!r} not found; {hint}open_clip knows {len(available)} models (python -c \"import "
        "open_clip; print(open_clip.list_models())\" lists them), or give the path of an open_clip "
        "model-config JSON")


def model_input_size(name: str) -> int:
    """The square input side of model ``name``, from its config, without building it."""
    resolved = resolve_model_name(name)
    vision = open_clip.get_model_config(resolved)["vision_cfg"]
    if "image_size" not in vision:
        raise ConfigError(f"model: config of {resolved!r} has no vision_cfg.image_size")
    return _square_side(vision["image_size"], "model")


def model_embed_dim(name: str) -> int:
    """D, the embedding size of model ``name`` (the length of its image states), from its config."""
    resolved = resolve_model_name(name)
    config = open_clip.get_model_config(resolved)
    if "embed_dim" not in config:
        raise ConfigError(f"model: config of {resolved!r} has no embed_dim")
    return int(config["embed_dim"])


def resolve_device(device: str) -> torch.device:
    """``'auto'`` -> CUDA when available, else CPU; CUDA requests are checked to exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"device: {device!r} is not a torch device: {err}") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            available = ", ".join(f"cuda:{i}" for i in range(count))
            raise ConfigError(f"device: {device!r} not found; available: {available}")
    return resolved


def _resolve_weights(cfg: ModelConfig, name: str, storage: StorageConfig) -> _Weights:
    """Classify ``cfg.pretrained`` as none, URI (fetched now), open_clip tag or local file."""
    pretrained = cfg.pretrained
    if pretrained.lower() == "none":
        return _Weights(tag=None, checkpoint=None)
    if _URI_PATTERN.match(pretrained):
        return _Weights(tag=None, checkpoint=fetch_checkpoint(pretrained, cfg.cache_dir, storage))
    if open_clip.is_pretrained_cfg(name, pretrained):
        return _Weights(tag=pretrained, checkpoint=None)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return _Weights(tag=None, checkpoint=path)
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ConfigError(
        f"pretrained: {pretrained!r} not found: no checkpoint file at {path.absolute()} and not a "
        f"pretrained tag of {name!r} (available tags: {', '.join(tags) or 'none'}); "
        "give a checkpoint path, an fsspec URI such as s3://bucket/model.pt, or 'none' for random weights")


def check_weights(cfg: ModelConfig, storage: StorageConfig = StorageConfig()) -> str:
    """Check on the driver, without loading any weights, that ``cfg`` names a model and weights.

    Returns the resolved model name. A tag's weights must be in the local cache or be downloaded
    now (:func:`~pipeline.model.tags.fetch_tag_weights`, which fails within seconds without
    internet). A remote checkpoint must exist; a local one must be a file here (on a cluster it
    must also exist on every worker: prefer an s3:// URI) that fits the model, checked by
    :func:`check_checkpoint_fits`.
    """
    name = resolve_model_name(cfg.name)
    pretrained = cfg.pretrained
    if pretrained.lower() == "none":
        return name
    if open_clip.is_pretrained_cfg(name, pretrained):
        fetch_tag_weights(name, pretrained, cfg.cache_dir)
        return name
    if _URI_PATTERN.match(pretrained):
        fs, path = filesystem(pretrained, storage)
        if not fs.exists(path):
            raise ConfigError(f"pretrained: {pretrained} does not exist; check the URI and credentials")
        return name
    weights = _resolve_weights(cfg, name, storage)
    if weights.strict:
        check_checkpoint_fits(weights.checkpoint, name)
    return name


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz", ".npy")


def check_names(cfg: ModelConfig) -> None:
    """What can be checked of ``cfg`` away from the machine that runs it (``lgca submit``): an
    open_clip model name, and a ``pretrained`` that is neither a URI nor a file name must be
    one of its tags. Paths (a config JSON, a checkpoint) are resolved where the job runs."""
    if cfg.name.endswith(".json"):
        return
    name = resolve_model_name(cfg.name)
    pretrained = cfg.pretrained
    if (pretrained.lower() == "none" or _URI_PATTERN.match(pretrained) or "/" in pretrained
            or pretrained.lower().endswith(CHECKPOINT_SUFFIXES) or Path(pretrained).exists()
            or open_clip.is_pretrained_cfg(name, pretrained)):
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ConfigError(
        f"pretrained: {pretrained!r} is not a pretrained tag of {name!r} (available tags: "
        f"{', '.join(tags) or 'none'}) nor a file here, a checkpoint path or a URI; give a tag, a path "
        "such as ./weights/model.pt (./ for a file that only the cluster has) or s3://bucket/model.pt, "
        "or 'none' for random weights")


def check_checkpoint_fits(path: Path, name: str) -> None:
    """Load checkpoint ``path`` into model ``name`` built on the meta device: the checks of a real
    load, with the same errors, but no model tensor is allocated (0.05 s for ViT-B-32). A torch
    file is read onto the meta device too; safetensors cannot be, so its tensors are mapped from
    the file (not copied into memory)."""
    with torch.device("meta"), _root_messages_dropped(OPEN_CLIP_NO_WEIGHTS):
        model = open_clip.create_model(name, device=torch.device("meta"), pretrained_text=False)
    safetensors = path.name.lower().endswith(".safetensors")
    with warnings.catch_warnings():  # torch warns, per tensor, that a file tensor copied into a meta one is a no-op
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter", category=UserWarning)
        _load_checkpoint_file(model, path, name, map_location="cpu" if safetensors else "meta")


def is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive: a zip with a top-level ``constants.pkl`` record."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(PurePosixPath(record).parts[1:] == ("constants.pkl",) for record in archive.namelist())


def _load_checkpoint_file(model: torch.nn.Module, path: Path, name: str, map_location: str = "cpu") -> None:
    """Load a state_dict (or ``{'state_dict': ...}``) file into ``model``, tensors only."""
    if is_torchscript_archive(path):
        raise ConfigError(
            f"pretrained: {path} is a TorchScript archive (OpenAI's original CLIP format), refused because "
            "loading one runs the code it holds; use the pretrained tag 'openai' (the same weights as a "
            "state_dict), or, where you trust the file, convert it with python -c \"import open_clip, torch; "
            f"torch.save(open_clip.load_openai_model('{path}', device='cpu').state_dict(), 'state_dict.pt')\" "
            "and load that into the model's -quickgelu variant (OpenAI's models use QuickGELU)")
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True, device=map_location)
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"pretrained: {path} holds objects other than tensors and was refused by "
            f"torch.load(weights_only=True); re-save it as a plain state_dict: {err}") from err
    except RuntimeError as err:
        raise ConfigError(f"pretrained: checkpoint {path} does not fit model {name!r}: {err}") from err
    except AssertionError as err:  # open_clip's check of the positional embeddings it resizes
        raise ConfigError(
            f"pretrained: checkpoint {path} does not fit model {name!r}: its positional embedding cannot be "
            f"resized to the model's ({err})") from err


_INIT_LOCK = threading.Lock()


def _leave(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def weights_left_uninitialised() -> Iterator[None]:
    """Within: torch.nn.init's initialisers leave tensors as allocated. The patch is process-wide
    (a module another thread builds meanwhile is left uninitialised too) and held by one
    caller at a time; this package builds models in one thread only.

    Random initialisation is wasted on a model whose every weight a checkpoint then
    replaces (0.65 s of the 0.8 s ViT-B-32 takes to load on one CPU core here; more for
    larger models), so it is skipped there. Only with a *strict* load afterwards: it fails
    unless the checkpoint holds every parameter and persistent buffer, so no weight is
    left as uninitialised memory. Non-persistent buffers (open_clip's attention mask) are
    computed, not initialised, and are unaffected.
    """
    with _INIT_LOCK:  # one patch at a time, so that each restores the real functions
        saved = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS}
        try:
            for name in saved:
                setattr(torch.nn.init, name, _leave)
            yield
        finally:
            for name, function in saved.items():
                setattr(torch.nn.init, name, function)


@contextlib.contextmanager
def _root_messages_dropped(prefix: str) -> Iterator[None]:
    """Within: messages logged on the root logger (as open_clip logs) starting with ``prefix`` are dropped."""
    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _check_precision(precision: str, device: torch.device) -> None:
    """fp16 kernels are incomplete on the CPU; refuse early with what to use instead."""
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError(f"precision: the device is the CPU; {FP16_ON_CPU}")


@contextlib.contextmanager
def random_weights_said_elsewhere() -> Iterator[None]:
    """Models loaded inside do not warn of random weights: the caller says it once its own way."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        yield


def random_weights_note(name: str) -> str:
    """The one line a run's driver logs when ``--pretrained none`` gives ``name`` random weights."""
    return (f"pretrained none: {name} has random weights (drawn from seed {RANDOM_WEIGHTS_SEED}, the same in "
            "every run), so its labels and scores mean nothing; give a checkpoint file, a URI or a tag for real labels")


def load_model(cfg: ModelConfig, storage: StorageConfig = StorageConfig()) -> LoadedModel:
    """Build the model named by ``cfg``, load its weights and read its preprocessing.

    ``storage`` says how to reach ``cfg.pretrained`` when it is a URI.
    """
    name = resolve_model_name(cfg.name)
    device = resolve_device(cfg.device)
    _check_precision(cfg.precision, device)
    weights = _resolve_weights(cfg, name, storage)
    if weights.tag is not None:  # in the cache, or downloaded now: fails fast where it cannot be
        fetch_tag_weights(name, weights.tag, cfg.cache_dir)
    if weights.random:
        warnings.warn(f"pretrained='none': model {name!r} has random weights (drawn from seed "
                      f"{RANDOM_WEIGHTS_SEED}, the same in every run), so its labels and scores are "
                      "meaningless", RandomWeightsWarning, stacklevel=2)
    with contextlib.ExitStack() as stack:
        if weights.strict:  # a tag is loaded by open_clip, a file below: both strictly
            stack.enter_context(weights_left_uninitialised())
        if weights.tag is None:  # a file is loaded below, or the weights are random, as said above
            stack.enter_context(_root_messages_dropped(OPEN_CLIP_NO_WEIGHTS))
        if weights.random:  # one model in every process and run, not one per actor
            stack.enter_context(torch.random.fork_rng(devices=[]))
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model = open_clip.create_model(
            name, pretrained=weights.tag, precision=OPEN_CLIP_PRECISION[cfg.precision], device=device,
            cache_dir=cfg.cache_dir or None, require_pretrained=weights.tag is not None, weights_only=True,
            pretrained_text=False)  # no Hugging Face text weights: the tag or file holds them, 'none' wants none
    if weights.checkpoint is not None:
        _load_checkpoint_file(model, weights.checkpoint, name)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        preprocess=preprocess_from_model(model),
        device=device,
        dtype=DTYPES[cfg.precision],
        name=name,
        pretrained=cfg.pretrained,
        checkpoint=weights.checkpoint,
    )
