"""Class names, prompt templates and class descriptions, loaded from data files.

Everything here is data, not code: a class list (text, JSON or inline), a JSON list of
``'{}'`` templates and an optional JSON file of per-class descriptions (CuPL sentences or
Menon & Vondrick descriptors). :func:`load_class_set` reads and checks them into one
frozen :class:`ClassSet`, whose digests key caches and whose JSON goes into the run
metadata. Every problem raises :class:`ConfigError` naming the file and what to fix.
Files are opened with ``fsspec``, so any fsspec URI (``s3://...``) works.

Six benchmark sets ship in ``descriptions/`` beside this module (BUNDLED_SETS; from WCA's
released code, MIT, LICENSE-WCA.md). A bare set name given for the classes, descriptions or
templates selects that set's file (:func:`bundled_set` has the rule).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import BUNDLED_SETS, ConfigError, StorageConfig, TextConfig
from pipeline.storage import filesystem

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
DESCRIPTION_FORMATS = ("cupl", "descriptors")
# Content sniffing for descriptions_format='auto': descriptors are short phrases without a
# final period, CuPL entries are sentences. Both signals must agree, otherwise it is an error.
SHORT_PHRASE_WORDS = 6.0  # mean words per entry below this counts as short phrases
SENTENCE_FRACTION = 0.5  # fraction of entries ending in '.' from which they count as sentences
_SHOWN = 5  # how many offending items an error message lists
BUNDLED_FOLDER = Path(__file__).with_name("descriptions")  # one folder per name of BUNDLED_SETS
# Bundled sets whose class list is the keys of their cupl.json, in order: eurosat has no
# classes.json, and place365's names 19 categories more than once (refused as a class list);
# its cupl.json keys are those names once each, in classes.json's order.
CLASSES_FROM_CUPL_KEYS = ("eurosat", "place365")


@dataclass(frozen=True)
class TextSources:
    """What a class set was read from, for the run record. A file is named as it was given, a
    bundled one as ``bundled:<set>/<file>`` (the files of the installed lgca-pipeline version)."""

    classes: str  # a file or URI, 'bundled:<set>/classes.json', 'bundled:<set>/cupl.json keys' or 'inline'
    descriptions: str = ""  # a file, URI or 'bundled:<set>/<file>'; '' = none
    descriptions_format: str = ""  # how the descriptions were read: 'cupl' or 'descriptors' ('' = none)
    templates: str = ""  # a file, URI or 'bundled:<set>/templates.json'; '' = DEFAULT_TEMPLATES


@dataclass(frozen=True)
class ClassSet:
    """The classes to score, their prompt templates and their descriptions.

    ``descriptions[i]`` belongs to ``names[i]`` and may be empty (the engine then uses
    ``prompts(i)``). Build one with :func:`load_class_set`.
    """

    names: tuple[str, ...]  # class names in the order of the class list
    templates: tuple[str, ...]  # prompt templates, each with at least one '{}'
    descriptions: tuple[tuple[str, ...], ...]  # per class, same order as names
    sources: TextSources | None = dataclasses.field(default=None, compare=False)  # set by load_class_set

    def __post_init__(self) -> None:
        if not self.names:
            raise ConfigError("classes: the class set has no classes")
        if len(self.descriptions) != len(self.names):
            raise ConfigError(f"descriptions: {len(self.descriptions)} description lists for "
                              f"{len(self.names)} classes; give one list per class")
        if not self.templates:
            raise ConfigError("templates: the class set has no templates")
        for template in self.templates:
            _check_template(template, "templates")

    def prompts(self, index: int) -> tuple[str, ...]:
        """Every template filled with ``names[index]``, underscores read as spaces.

        Labels keep the name as given (``apple_pie``); prompts read "apple pie".
        """
        return tuple(_fill(template, self.names[index].replace("_", " ")) for template in self.templates)

    def digests(self) -> dict[str, str]:
        """SHA-256 hex digests of the canonical JSON of classes, descriptions and templates."""
        return {
            "classes": _digest(list(self.names)),
            "descriptions": _digest([list(d) for d in self.descriptions]),
            "templates": _digest(list(self.templates)),
        }

    def to_json(self) -> dict:
        """A JSON-ready record of the whole class set, its digests and sources, for run metadata."""
        return {
            "names": list(self.names),
            "templates": list(self.templates),
            "descriptions": [list(d) for d in self.descriptions],
            "digests": self.digests(),
            "sources": None if self.sources is None else dataclasses.asdict(self.sources),
        }


def _digest(value: object) -> str:
    """SHA-256 of a canonical JSON encoding (no spaces, UTF-8, key order kept)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalize_name(name: str) -> str:
    """The key used to match class names: '_' as space, whitespace collapsed, case folded.

    ``normalize_name(" Apple_Pie ") == normalize_name("apple pie") == "apple pie"``.
    """
    return " ".join(name.replace("_", " ").split()).casefold()


def _read_text(path: str, storage: StorageConfig) -> str:
    """The UTF-8 text of a local file or fsspec URI; ConfigError if it cannot be read."""
    fs, where = filesystem(path, storage)
    try:
        with fs.open(where, "rt", encoding="utf-8-sig") as handle:
            return handle.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; check the path or URI") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; give the path of a file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                          "save the file as UTF-8") from None


def _read_json(path: str, storage: StorageConfig) -> object:
    """The parsed JSON of a file; invalid JSON names the line and column."""
    text = _read_text(path, storage)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: "
                          f"{err.msg}") from None


def _string_list(value: object, path: str, what: str) -> list[str]:
    """Check that ``value`` is a JSON list of non-blank strings."""
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected a JSON list of {what}, got a JSON "
                          f"{_json_type(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{path}: entry {index} is a JSON {_json_type(item)} "
                              f"({item!r}); every entry must be a string ({what})")
        if not item.strip():
            raise ConfigError(f"{path}: entry {index} is blank; remove it or fill it in")
    return value


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean",
             int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _is_path(spec: str) -> bool:
    """Whether a class spec names a file: a URI, an existing path, or a .txt/.json name."""
    return "://" in spec or os.path.exists(spec) or spec.lower().endswith((".txt", ".json"))


def parse_class_list(spec: str, storage: StorageConfig = StorageConfig()) -> tuple[str, ...]:
    """Class names from a file or an inline comma-separated list.

    ``spec`` is a file when it is a URI (``s3://...``), an existing path, or ends in
    ``.txt``/``.json``; otherwise it is inline, e.g. ``"cat,dog"``. A ``.json`` file
    holds a list of non-blank strings; any other file has one class a line. Surrounding
    whitespace, blank lines and empty inline items are ignored. Names must stay unique after
    :func:`normalize_name`, since they are matched to descriptions that way.
    """
    if _is_path(spec):
        source = spec
        if spec.lower().endswith(".json"):
            items = _string_list(_read_json(spec, storage), spec, "class names")
        else:
            items = _read_text(spec, storage).splitlines()
    else:
        source, items = "classes (inline list)", spec.split(",")
    names = tuple(item.strip() for item in items if item.strip())
    if not names:
        raise ConfigError(f"{source}: the class list is empty; give at least one class name")
    _check_unique(names, source)
    return names


def _check_unique(names: tuple[str, ...], source: str) -> None:
    """ConfigError listing every duplicated class name and its 0-based positions."""
    positions: dict[str, list[int]] = defaultdict(list)
    for index, name in enumerate(names):
        positions[normalize_name(name)].append(index)
    duplicates = {key: where for key, where in positions.items() if len(where) > 1}
    if not duplicates:
        return
    listed = "; ".join(
        f"{' / '.join(sorted({names[i] for i in where}))!r} at positions "
        f"{', '.join(map(str, where))}" for where in duplicates.values())
    raise ConfigError(
        f"{source}: {len(duplicates)} class names occur more than once (positions are "
        f"0-based; case, '_' and spaces are ignored): {listed}. Class names must be unique: "
        "rename the duplicates to say which category each is, e.g. 'arena hockey', "
        "'arena performance' and 'arena rodeo' instead of 'arena' three times")


def _field_count(template: str) -> int:
    """How many replacement fields a template has (``str.format`` syntax)."""
    return sum(1 for _, field, _, _ in string.Formatter().parse(template) if field is not None)


def _fill(template: str, name: str) -> str:
    """The template with every '{}' replaced by ``name``."""
    return template.format(*([name] * _field_count(template)))


def _check_template(template: str, source: str) -> None:
    """ConfigError unless the template's only replacement fields are bare '{}'."""
    try:
        fields = [(field, spec, conv) for _, field, spec, conv in
                  string.Formatter().parse(template) if field is not None]
    except ValueError as err:
        raise ConfigError(f"{source}: template {template!r} is not valid format syntax "
                          f"({err}); write literal braces as '{{{{' and '}}}}'") from None
    if not fields:
        raise ConfigError(f"{source}: template {template!r} has no '{{}}'; every template "
                          "needs a '{}' where the class name goes")
    for field, spec, conversion in fields:
        if (field, spec, conversion) != ("", "", None):
            shown = "{" + field + (f"!{conversion}" if conversion else "")
            shown += (f":{spec}" if spec else "") + "}"
            raise ConfigError(f"{source}: template {template!r} has the field {shown!r}; use "
                              "only bare '{}' where the class name goes")


def load_templates(path: str, storage: StorageConfig = StorageConfig()) -> tuple[str, ...]:
    """Prompt templates from a JSON list of strings, each with at least one bare '{}'."""
    templates = _string_list(_read_json(path, storage), path, "templates")
    if not templates:
        raise ConfigError(f"{path}: the template list is empty; give at least one template "
                          "such as \"a photo of a {}.\"")
    for template in templates:
        _check_template(template, path)
    return tuple(templates)


def make_descriptor_sentence(name: str, descriptor: str) -> str:
    """A Menon & Vondrick descriptor turned into a sentence about class ``name``.

    Their ``make_descriptor_sentence`` rule, kept exactly (prefix tests on the raw text):
    a descriptor starting with ``'a'`` (so also ``'an '``, but also ``'aircraft'``) gives
    ``"{name}, which is {descriptor}"``; one starting with ``'has'``, ``'often'``,
    ``'typically'``, ``'may'`` or ``'can'`` gives ``"{name}, which {descriptor}"``; one
    starting with ``'used'`` gives ``"{name}, which is {descriptor}"``; any other gives
    ``"{name}, which has {descriptor}"``. ``name`` has '_' replaced by spaces, as their
    ``wordify`` does.
    """
    if descriptor.startswith("a"):
        link = "which is"
    elif descriptor.startswith(("has", "often", "typically", "may", "can")):
        link = "which"
    elif descriptor.startswith("used"):
        link = "which is"
    else:
        link = "which has"
    return f"{name.replace('_', ' ')}, {link} {descriptor}"


def detect_description_format(path: str, data: dict[str, list[str]]) -> str:
    """'cupl' or 'descriptors' for a descriptions file, from its name, else its content.

    A file named ``descriptors*.json`` is descriptors, ``cupl*.json`` is CuPL. Otherwise
    entries averaging fewer than SHORT_PHRASE_WORDS words, fewer than SENTENCE_FRACTION of
    them ending in '.', are descriptors; longer entries, mostly ending in '.', are CuPL.
    Anything else is ambiguous and raises ConfigError.
    """
    base = posixpath.basename(path.replace("\\", "/")).lower()
    if base.endswith(".json"):
        for fmt in DESCRIPTION_FORMATS:
            if base.startswith(fmt):
                return fmt
    entries = [entry for entries in data.values() for entry in entries]
    if entries:
        mean_words = sum(len(entry.split()) for entry in entries) / len(entries)
        sentences = sum(entry.rstrip().endswith(".") for entry in entries) / len(entries)
        if mean_words < SHORT_PHRASE_WORDS and sentences < SENTENCE_FRACTION:
            return "descriptors"
        if mean_words >= SHORT_PHRASE_WORDS and sentences >= SENTENCE_FRACTION:
            return "cupl"
        found = f"entries average {mean_words:.1f} words and {sentences:.0%} end in '.'"
    else:
        found = "every description list is empty"
    raise ConfigError(f"{path}: cannot tell whether this is a CuPL or a descriptors file "
                      f"({found}); set descriptions_format to 'cupl' or 'descriptors'")


def _read_descriptions(path: str, storage: StorageConfig) -> dict[str, list[str]]:
    """A descriptions file as ``{class name: [text, ...]}``, with its types checked."""
    data = _read_json(path, storage)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object {{\"class name\": [\"text\", ...]}}, "
                          f"got a JSON {_json_type(data)}")
    for key, value in data.items():
        _string_list(value, f"{path}: class {key!r}", "descriptions")
    return data


def _index_keys(path: str, data: dict[str, list[str]]) -> dict[str, str]:
    """Map normalized key -> original key; keys that collide with different lists fail."""
    index: dict[str, str] = {}
    for key, value in data.items():
        norm = normalize_name(key)
        other = index.setdefault(norm, key)
        if other != key and data[other] != value:
            raise ConfigError(f"{path}: keys {other!r} and {key!r} name the same class (case, "
                              "'_' and spaces are ignored) but have different lists; keep one")
    return index


def load_descriptions(path: str, names: Sequence[str], fmt: str,
                      storage: StorageConfig = StorageConfig()) -> tuple[tuple[tuple[str, ...], ...], str]:
    """Descriptions for each class in ``names``, in that order, and the format they were read in.

    ``fmt`` is 'cupl' (entries used as they are), 'descriptors' (each phrase becomes a
    sentence by :func:`make_descriptor_sentence`) or 'auto' (see
    :func:`detect_description_format`). Names match keys ignoring case, '_' versus space
    and surrounding whitespace. Every class needs a key (its list may be empty); keys
    matching no class are ignored and counted in a log warning.
    """
    if fmt not in ("auto",) + DESCRIPTION_FORMATS:
        raise ConfigError(f"descriptions_format: {fmt!r} is not 'auto', 'cupl' or 'descriptors'")
    data = _read_descriptions(path, storage)
    if fmt == "auto":
        fmt = detect_description_format(path, data)
    index = _index_keys(path, data)
    missing = [name for name in names if normalize_name(name) not in index]
    if missing:
        raise ConfigError(
            f"{path}: {len(missing)} of {len(names)} classes have no descriptions, e.g. "
            f"{', '.join(map(repr, missing[:_SHOWN]))}; add them to the file (an empty list is "
            "allowed) or check the class list")
    wanted = {normalize_name(name) for name in names}
    unused = [key for norm, key in index.items() if norm not in wanted]
    if unused:
        logger.warning("%s: %d keys match no class and are ignored, e.g. %s", path,
                       len(unused), ", ".join(map(repr, unused[:_SHOWN])))
    lists = [data[index[normalize_name(name)]] for name in names]
    if fmt == "descriptors":
        return tuple(tuple(make_descriptor_sentence(name, phrase) for phrase in phrases)
                     for name, phrases in zip(names, lists)), fmt
    return tuple(tuple(entries) for entries in lists), fmt


def bundled_set(spec: str, option: str) -> str | None:
    """The bundled set that ``spec`` names, or None where ``spec`` is a file, a URI or (for the
    classes) an inline list.

    A spec is a set name when it is exactly one of BUNDLED_SETS (so it has no path separator
    and no extension). A file of that name in the working folder makes the spec ambiguous:
    ConfigError, which says how to write either one.
    """
    if spec not in BUNDLED_SETS:
        return None
    if os.path.isfile(spec):
        raise ConfigError(f"{option}: {spec!r} names both the bundled {spec} set and the file ./{spec} in this "
                          f"folder; write ./{spec} for the file, or {BUNDLED_FOLDER / spec} for the bundled set")
    return spec


def _bundled_file(spec: str, option: str, file: str) -> tuple[str, str]:
    """(path to read, name to record) of a templates or descriptions spec: the bundled set's
    ``file`` for a set name, else the spec itself."""
    name = bundled_set(spec, option)
    if name is None:
        return spec, spec
    return str(BUNDLED_FOLDER / name / file), f"bundled:{name}/{file}"


def _class_names(spec: str, storage: StorageConfig) -> tuple[tuple[str, ...], str]:
    """The class names of ``spec`` (see :func:`parse_class_list`, or a bundled set's classes)
    and the name to record for them."""
    name = bundled_set(spec, "classes")
    if name is None:
        return parse_class_list(spec, storage), spec if _is_path(spec) else "inline"
    if name in CLASSES_FROM_CUPL_KEYS:
        path = str(BUNDLED_FOLDER / name / "cupl.json")
        names = tuple(_read_descriptions(path, storage))
        _check_unique(names, path)
        return names, f"bundled:{name}/cupl.json keys"
    path = str(BUNDLED_FOLDER / name / "classes.json")
    return parse_class_list(path, storage), f"bundled:{name}/classes.json"


def load_class_set(cfg: TextConfig, storage: StorageConfig = StorageConfig()) -> ClassSet:
    """Read the class list, templates and descriptions that ``cfg`` names.

    No templates file gives DEFAULT_TEMPLATES; no descriptions file gives every class an
    empty description list. Each file is opened with ``storage``'s options for its own URI.
    A bundled set's name (:func:`bundled_set`) selects its files: its class list, its
    ``templates.json``, and its ``cupl.json``, or its ``descriptors.json`` with
    ``descriptions_format='descriptors'``. :attr:`ClassSet.sources` records what was read.
    """
    names, classes_from = _class_names(cfg.classes, storage)
    templates, templates_from = DEFAULT_TEMPLATES, ""
    if cfg.templates:
        path, templates_from = _bundled_file(cfg.templates, "templates", "templates.json")
        templates = load_templates(path, storage)
    descriptions, fmt, descriptions_from = tuple(() for _ in names), "", ""
    if cfg.descriptions:
        file = "descriptors.json" if cfg.descriptions_format == "descriptors" else "cupl.json"
        path, descriptions_from = _bundled_file(cfg.descriptions, "descriptions", file)
        descriptions, fmt = load_descriptions(path, names, cfg.descriptions_format, storage)
    sources = TextSources(classes=classes_from, descriptions=descriptions_from, descriptions_format=fmt,
                          templates=templates_from)
    return ClassSet(names=names, templates=templates, descriptions=descriptions, sources=sources)
