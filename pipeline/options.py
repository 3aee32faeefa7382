"""Job specs: one table of options per job kind feeds its flags and its YAML job files.

Two kinds: ``label`` (:class:`~pipeline.config.LabelJob`, ``lgca label``) and ``relabel``
(:class:`~pipeline.config.RelabelJob`, ``lgca relabel``). A YAML job file uses the flag names
as keys (``gpus-per-actor`` or ``gpus_per_actor``) and says its kind with ``kind: relabel``
(no ``kind`` means label); flags given on the command line win over the file.
:func:`build_job` turns the merged options into a validated job.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

from pipeline.config import ConfigError, LabelJob, RelabelJob, StorageConfig
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
    const: Any = None  # the value of the flag given without one; None: the flag needs a value

    @property
    def described(self) -> str:
        """The help text with the default, as ``--help`` shows it."""
        if self.default is None:
            return f"{self.help} (required)"
        if self.kind is bool:
            return self.help
        shown = f"{self.default:.6g}" if isinstance(self.default, float) else repr(self.default)
        return f"{self.help} (default: {shown})"


def options_of(cls: type, section: str) -> list[Option]:
    """The options of the fields of config class ``cls`` that carry ``option()`` metadata (a
    command's own fields: pass them to :func:`add_option_arguments` beside the job's flags)."""
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
                            item.metadata["help"], multiple, default, item.metadata.get("const")))
    return found


def _job_options(job: type) -> tuple[Option, ...]:
    """Every option of job class ``job``, in the order ``--help`` lists them: where the rows come
    from (inputs, source) and the output, then each config section, then the job's other fields."""
    own = {option.field: option for option in options_of(job, "")}
    hints = typing.get_type_hints(job)
    sections = [options_of(hints[item.name], item.name) for item in dataclasses.fields(job)
                if dataclasses.is_dataclass(hints[item.name])]
    inputs = [o for found in sections for o in found if o.section == "inputs"]
    rest = [o for found in sections for o in found if o.section != "inputs"]
    lead = [own.pop(name) for name in ("source", "output") if name in own]
    return tuple(inputs + lead + rest + list(own.values()))


@dataclass(frozen=True)
class JobKind:
    """One kind of job: its config class, command (also the job file's ``kind``) and options."""

    name: str  # 'label' or 'relabel'
    job: type  # LabelJob or RelabelJob
    options: tuple[Option, ...]
    required: tuple[str, ...]  # flags without a default

    @property
    def by_key(self) -> dict[str, Option]:
        return {option.flag: option for option in self.options}


OPTIONS = _job_options(LabelJob)
BY_KEY = {option.flag: option for option in OPTIONS}
KINDS = {"label": JobKind("label", LabelJob, OPTIONS, ("input", "output", "classes")),
         "relabel": JobKind("relabel", RelabelJob, _job_options(RelabelJob), ("source", "output", "classes"))}
# The options that shape one image's scores (text, model, scoring without method and top-k,
# storage): what `lgca explain` and `lgca eval` take from `lgca label`.
SCORING_FLAGS = tuple(option.flag for option in OPTIONS if option.section in ("text", "model", "scoring", "storage")
                      and option.flag not in ("method", "top-k"))
# The object-storage options (`--endpoint-url` ...): what the commands reading an output take.
STORAGE_FLAGS = tuple(option.flag for option in OPTIONS if option.section == "storage")


def add_label_arguments(parser: argparse.ArgumentParser, kind: str = "label", skip: Sequence[str] = ()) -> None:
    """Add every option of job kind ``kind`` (but ``skip``) as a flag; unset flags stay ``None``
    so the YAML file can fill them."""
    parser.add_argument("--config", help=f"YAML job file (kind: {kind}); flags given here win over it")
    for option in KINDS[kind].options:
        if option.flag in skip:
            continue
        if option.kind is bool:
            parser.add_argument(f"--{option.flag}", action="store_const", const=True, default=None,
                                help=option.described)
        elif option.const is not None:
            parser.add_argument(f"--{option.flag}", nargs="?", const=option.const, help=option.described)
        else:
            parser.add_argument(f"--{option.flag}", action="append" if option.multiple else "store",
                                help=option.described)


def add_option_arguments(parser: argparse.ArgumentParser, flags: Sequence[str | Option],
                         required: Sequence[str] = ()) -> None:
    """Add some ``lgca label`` options (by flag name) and a command's own options (``Option``
    objects, from :func:`options_of`) to another command: same names, types and help; unset
    flags stay ``None`` (read them back with :func:`given_options`)."""
    for item in flags:
        option = BY_KEY[item] if isinstance(item, str) else item
        if option.kind is bool:
            parser.add_argument(f"--{option.flag}", action="store_const", const=True, default=None,
                                help=option.described)
        else:
            parser.add_argument(f"--{option.flag}", type=option.kind, required=option.flag in required,
                                action="append" if option.multiple else "store", help=option.described)


def given_options(args: argparse.Namespace, flags: Sequence[str | Option]) -> dict[str, dict[str, Any]]:
    """The flags among ``flags`` that were given, as ``{section: {field: value}}`` (every
    section of OPTIONS is present, possibly empty; '' holds the job's or command's own fields);
    a repeatable flag's values as a tuple."""
    sections: dict[str, dict[str, Any]] = {option.section: {} for option in OPTIONS}
    for item in flags:
        option = BY_KEY[item] if isinstance(item, str) else item
        value = getattr(args, option.flag.replace("-", "_"))
        if value is not None:
            sections[option.section][option.field] = tuple(value) if option.multiple else value
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


def read_job_spec(uri: str) -> tuple[str, dict[str, Any]]:
    """Read a YAML job file into its kind and ``{flag: value}``; unknown, repeated and empty keys are errors."""
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
    kind = data.pop("kind", "label")
    if kind not in KINDS:
        raise ConfigError(f"config: kind {kind!r} in {uri} is not one of {', '.join(KINDS)}")
    known = KINDS[kind].by_key
    keys: dict[str, Any] = {}  # flag -> the key that gives it
    for key, value in data.items():
        flag = str(key).replace("_", "-")
        if flag not in known:
            raise ConfigError(f"config: unknown key {key!r} in {uri}; known keys: kind, {', '.join(known)}")
        if flag in keys:
            raise ConfigError(f"config: {keys[flag]!r} and {key!r} in {uri} both give {flag}; keep one")
        if value is None:
            raise ConfigError(f"config: job file key {key!r} is empty; give a value or remove the key")
        keys[flag] = key
    return kind, {flag: data[key] for flag, key in keys.items()}


def read_job_file(uri: str, kind: str = "label") -> dict[str, Any]:
    """The options of a job file of kind ``kind``; a file of another kind is refused with the
    command that runs it."""
    found, options = read_job_spec(uri)
    if found != kind:
        raise ConfigError(f"config: {uri} is a {found} job (kind: {found}); run it with lgca {found} --config {uri}")
    return options


def merge_options(file_options: dict[str, Any], flags: dict[str, Any], kind: str = "label") -> dict[str, Any]:
    """File options overridden by every job flag that was given (not ``None``)."""
    merged = dict(file_options)
    given = {key.replace("_", "-"): value for key, value in flags.items() if value is not None}
    merged.update({flag: value for flag, value in given.items() if flag in KINDS[kind].by_key})
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


def build_job(options: dict[str, Any], kind: str = "label") -> Any:
    """Build and validate a job of ``kind`` (a :class:`LabelJob` or :class:`RelabelJob`) from
    merged options (flag names as keys)."""
    spec = KINDS[kind]
    hints = typing.get_type_hints(spec.job)
    sections: dict[str, dict[str, Any]] = {option.section: {} for option in spec.options}
    for flag, value in options.items():
        option = spec.by_key.get(flag)
        if option is None:
            raise ConfigError(f"unknown option {flag!r}; known: {', '.join(spec.by_key)}")
        if flag == "actors":
            low, high = parse_actors(value)
            sections["resources"].update(actors_min=low, actors_max=high)
            continue
        sections[option.section][option.field] = _convert(option, value)
    for required in spec.required:
        if required not in options:
            flag = "SOURCE" if required == "source" else f"--{required}"  # lgca relabel's positional argument
            raise ConfigError(f"{required}: missing; give {flag} or '{required}:' in the job file")
    top = sections.pop("")
    return spec.job(**{name: hints[name](**values) for name, values in sections.items()}, **top)


def job_from_args(args: argparse.Namespace, kind: str = "label") -> Any:
    """The job described by parsed ``lgca label`` (or ``relabel``) arguments and their ``--config`` file."""
    file_options = read_job_file(args.config, kind) if args.config else {}
    return build_job(merge_options(file_options, vars(args), kind), kind)


def job_to_options(job: LabelJob | RelabelJob) -> dict[str, Any]:
    """The options that rebuild ``job`` (the inverse of :func:`build_job`), for job files; a
    relabel job's include ``kind: relabel``."""
    kind = "relabel" if isinstance(job, RelabelJob) else "label"
    out: dict[str, Any] = {"kind": kind} if kind != "label" else {}
    for option in KINDS[kind].options:
        if option.flag == "actors":
            res = job.resources
            out["actors"] = f"{res.actors_min}-{res.actors_max}"
            continue
        holder = getattr(job, option.section) if option.section else job
        value = getattr(holder, option.field)
        out[option.flag] = list(value) if option.multiple else value
    return out

