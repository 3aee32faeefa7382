"""Job specs: one table of options feeds the ``lgca label`` flags and the YAML job files.

A YAML job file uses the flag names as keys (``gpus-per-actor`` or ``gpus_per_actor``);
flags given on the command line win over the file. :func:`build_job` turns the merged
options into a validated :class:`~pipeline.config.LabelJob`.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

from pipeline.config import (ConfigError, InputConfig, LabelJob, ModelConfig, ResourceConfig, ScoringParams,
                             StatesConfig, StorageConfig, TextConfig)
from pipeline.storage import filesystem


@dataclass(frozen=True)
class Option:
    """One job option: its flag, the config section and field it fills, its type and default."""

    flag: str  # the command-line flag without dashes, also the YAML key
    section: str  # LabelJob field holding the config object ('' for LabelJob itself)
    field: str  # field name inside that section
    kind: type = str  # str, int, float, or bool for an on/off flag (a flag without a value)
    help: str = ""
    multiple: bool = False  # may be given several times (a YAML list)
    default: Any = None  # the config's default; None where the option is required

    @property
    def described(self) -> str:
        """The help text with the default, as ``--help`` shows it."""
        if self.default is None:
            return f"{self.help} (required)"
        if self.kind is bool:
            return self.help
        shown = f"{self.default:.6g}" if isinstance(self.default, float) else repr(self.default)
        return f"{self.help} (default: {shown})"


def _options_of(cls: type, section: str) -> list[Option]:
    """The options of the fields of config class ``cls`` that carry ``option()`` metadata."""
    hints = typing.get_type_hints(cls)
    found = []
    for item in dataclasses.fields(cls):
        if "help" not in item.metadata:
            continue
        kind, multiple = hints[item.name], False
        if typing.get_origin(kind) is tuple:
            kind, multiple = typing.get_args(kind)[0], True
        default = None if item.default is dataclasses.MISSING else item.default
        if item.name == "actors_min":
            kind, default = str, "1"
        found.append(Option(item.metadata["flag"] or item.name.replace("_", "-"), section, item.name, kind,
                            item.metadata["help"], multiple, default))
    return found


def _job_options() -> tuple[Option, ...]:
    """Every option of :class:`LabelJob`, in the order ``--help`` lists them: inputs and output,
    then each config section, then the job's other fields."""
    own = {option.field: option for option in _options_of(LabelJob, "")}
    hints = typing.get_type_hints(LabelJob)
    sections = [_options_of(hints[item.name], item.name) for item in dataclasses.fields(LabelJob)
                if dataclasses.is_dataclass(hints[item.name])]
    return tuple(sections[0] + [own.pop("output")] + [o for found in sections[1:] for o in found] + list(own.values()))


OPTIONS = _job_options()
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
                                help=option.described)
        else:
            parser.add_argument(f"--{option.flag}", action="append" if option.multiple else "store",
                                help=option.described)


def add_option_arguments(parser: argparse.ArgumentParser, flags: Sequence[str], required: Sequence[str] = ()) -> None:
    """Add some ``lgca label`` options to another command: same names, types and help; unset
    flags stay ``None`` (read them back with :func:`given_options`)."""
    for flag in flags:
        option = BY_KEY[flag]
        if option.kind is bool:
            parser.add_argument(f"--{flag}", action="store_const", const=True, default=None, help=option.described)
        else:
            parser.add_argument(f"--{flag}", type=option.kind, required=flag in required, help=option.described)


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
        fs, path = filesystem(uri, StorageConfig())
        with fs.open(path, "r") as handle:
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
                                           ("inputs", "text", "model", "scoring", "resources", "storage", "states",
                                            "")}
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
        storage=StorageConfig(**sections["storage"]), states=StatesConfig(**sections["states"]), **top)


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

