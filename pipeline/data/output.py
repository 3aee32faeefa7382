"""The output folder: its layout and its ledger, behind one :class:`Output` object.

Layout of an output folder (local or any fsspec URL)::

    OUTPUT/data/<run id>_<write uuid>_<task>-<i>.parquet   labels, one row per input image
    OUTPUT/_lgca/manifest.json                    what every row was scored with
    OUTPUT/_lgca/runs/<run id>.json               the record of each run
    OUTPUT/_lgca/shards/<run id>.parquet          the shards (uri, version) a finished run read whole
    OUTPUT/_lgca/reading/<run id>/<digest>[.broken]  a running run's marks: shards read to their end, or not
    OUTPUT/_lgca/retry/<run id>.json              while a run replaces data files: its journal (data/retry.py)

The ledger is what makes runs incremental and exactly-once: the ids already labelled, the
manifest a later run must match, the shard records and marks, and the run records.
The rows themselves are :mod:`pipeline.data.rows`; docs/output-schema.md documents both.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import ConfigError, OutputError, StorageConfig
from pipeline.storage import (filesystem, full_uri, list_folder, read_ahead, read_json, remove_folder, write_json,
                              write_whole)

log = logging.getLogger(__name__)
T = TypeVar("T")

READ_THREADS = 16  # output files read at once (each read is a few requests on object storage)
CONTAINS_CHUNK = 1 << 20  # ids digested at a time by IdSet.contains


def id_digests(ids: Sequence[str]) -> np.ndarray:
    """128-bit digests of ids (collisions are out of reach at any realistic scale)."""
    return np.array([hashlib.blake2b(i.encode(), digest_size=16).digest() for i in ids], dtype="S16")


@dataclass(frozen=True)
class IdSet:
    """A set of strings (image ids, or :func:`shard_key` shard versions) as a sorted array of
    16-byte digests: the driver never holds the strings themselves."""

    digests: np.ndarray

    @classmethod
    def joined(cls, parts: list[np.ndarray]) -> IdSet:
        """The set of the digests in ``parts`` (emptied as they are joined)."""
        digests = np.concatenate(parts) if parts else id_digests([])
        parts.clear()
        digests.sort()
        first = np.ones(len(digests), dtype=bool)  # False on repeats of the previous digest
        first[1:] = digests[1:] != digests[:-1]
        return cls(digests if first.all() else digests[first])

    @classmethod
    def empty(cls) -> IdSet:
        return cls.joined([])

    def __len__(self) -> int:
        return len(self.digests)

    def without(self, ids: Sequence[str]) -> IdSet:
        """The set less ``ids``."""
        if not len(ids) or not len(self.digests):
            return self
        return IdSet(self.digests[~IdSet.joined([id_digests(ids)]).has(self.digests)])

    def has(self, digests: np.ndarray) -> np.ndarray:
        """A boolean mask: which of ``digests`` (16-byte, see :func:`id_digests`) are in the set."""
        if len(self.digests) == 0:
            return np.zeros(len(digests), dtype=bool)
        pos = np.minimum(np.searchsorted(self.digests, digests), len(self.digests) - 1)
        return self.digests[pos] == digests

    def contains(self, ids: Sequence[str]) -> np.ndarray:
        """A boolean mask: which of ``ids`` are in the set (digested CONTAINS_CHUNK at a time, so
        a listing of many millions of files is never digested at once)."""
        mask = np.zeros(len(ids), dtype=bool)
        if len(self.digests) == 0:
            return mask
        for start in range(0, len(ids), CONTAINS_CHUNK):
            query = id_digests(ids[start:start + CONTAINS_CHUNK])
            mask[start:start + len(query)] = self.has(query)
        return mask


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"scoring.crops": 60, ...}``."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


MISSING_SETTING = "(none)"
DIGESTS = ("classes", "descriptions", "templates")  # the text side's file digests (ClassSet.digests)


def shard_key(uri: str, version: str | None) -> str:
    """One version of one shard, as an :class:`IdSet` holds it."""
    return f"{uri}\n{version}"


def read_columns(fs: Any, path: str, columns: Sequence[str]) -> pa.Table:
    """``columns`` of one data file. A file that is not (yet) Parquet raises ArrowInvalid; a
    Parquet file without these columns is no file of this pipeline: OutputError."""
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise OutputError(f"{path}: a Parquet file without the column(s) {', '.join(missing)} of this "
                              "pipeline's output; only the pipeline's own files belong in this folder: move "
                              "it elsewhere and run again")
        return parquet.read(columns=list(columns))


def error_rows(fs: Any, path: str) -> tuple[int, pa.Table]:
    """One data file's row count (from its footer) and its error rows' ``error``. Row groups
    without an error are skipped by their statistics, not read."""
    with fs.open(path, "rb") as handle:
        rows = pq.ParquetFile(handle).metadata.num_rows
        errors = pq.read_table(handle, columns=["error"], filters=pc.field("error").is_valid())
    return rows, errors


def _read_each(fs: Any, paths: Sequence[str], read: Callable[[Any, str], T], then: str,
               removed: list[str] | None = None) -> Iterator[T]:
    """``read(fs, path)`` of each of ``paths``, in order, READ_THREADS at once (an output of a
    billion images has hundreds of thousands of files). A file that is not (yet) Parquet is a
    partial write of a killed run (a cut file has no closing magic bytes): it is deleted
    (logged with ``then``, appended to ``removed`` when given) and nothing is yielded for it.
    Any other error (the network, permissions) says nothing about the file: it is kept and an
    OutputError names it."""
    for path, result in read_ahead(functools.partial(read, fs), paths, READ_THREADS):
        try:
            values = result.result()
        except pa.ArrowInvalid as exc:
            log.warning("removing incomplete output file %s (%s); %s", path, exc, then)
            fs.rm(path)
            if removed is not None:
                removed.append(path)
            continue
        except OSError as exc:
            raise OutputError(f"{path}: cannot read this output file ({type(exc).__name__}: {exc}); nothing "
                              "was removed: check access to the output and run again") from exc
        yield values


# The manifest's two sides (docs/output-schema.md): what the image states depend on, and what
# only the text side does (relabel may change those without encoding an image again).
IMAGE_SETTINGS = ("crops", "alpha", "beta", "lambda_v", "steps", "expand_top", "expand_ratio", "seed")
TEXT_SETTINGS = ("method", "lambda_t", "aggregation", "top_k")


def make_manifest(model: str, pretrained: str, scoring: dict[str, Any], digests: dict[str, str],
                  states: dict[str, Any] | None, source: str = "") -> dict[str, Any]:
    """What every row of an output depends on: ``image`` (model, weights, N, alpha, beta,
    lambda_v, T, K, r, seed), ``text`` (method, lambda_t, aggregation, top-k and the digests of
    the classes, descriptions and templates), ``states`` (the kept states' dtype, dim and steps,
    or None) and, for ``lgca relabel`` outputs, the ``source`` output they were scored from."""
    manifest = {"image": {"model": model, "pretrained": pretrained, **{k: scoring[k] for k in IMAGE_SETTINGS}},
                "text": {**{k: scoring[k] for k in TEXT_SETTINGS}, **digests}, "states": states}
    if source:
        manifest["source"] = source
    return manifest


def manifest_form(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` in the form of :func:`make_manifest`. The earlier flat form (model, pretrained,
    scoring, text digests) is read into its two sides, without ``states``: its rows hold none."""
    if "scoring" not in manifest:
        return manifest
    scoring = manifest["scoring"]
    image = {"model": manifest.get("model"), "pretrained": manifest.get("pretrained"),
             **{k: scoring[k] for k in IMAGE_SETTINGS if k in scoring}}
    return {"image": image, "text": {**{k: scoring[k] for k in TEXT_SETTINGS if k in scoring},
                                     **manifest.get("text", {})}}


def manifest_changes(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``side.key: old -> new`` for every setting that differs between two manifests (either
    form), e.g. ``image.crops: 60 -> 8``; the digests of the class, description and template
    files say ``changed``. ``states`` counts only where the existing manifest records it: an
    output written before states were kept accepts a run that keeps them (its older rows just
    have none)."""
    old, new = _flat(manifest_form(existing)), _flat(manifest_form(wanted))
    if not any(key == "states" or key.startswith("states.") for key in old):
        new = {key: value for key, value in new.items() if key != "states" and not key.startswith("states.")}
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, MISSING_SETTING), new.get(key, MISSING_SETTING)
        if before == after:
            continue
        digest = key.split(".")[-1] in DIGESTS
        lines.append(f"{key}: changed" if digest else f"{key}: {before} -> {after}")
    return lines


@dataclass(frozen=True)
class ShardMarks:
    """One run's proof that a shard was read to its end.

    A read task writes ``<digest>`` after a shard's last row, or ``<digest>.broken`` as soon as
    its reading breaks off (the shard's ``<uri>#`` error row), before that row leaves the task.
    Nothing removes a mark during the run, and a shard counts as read whole only with a
    whole mark and no broken one: whichever attempts Ray makes of a read task (a retry after a
    lost worker, or a re-run to rebuild a lost block), the rows of an attempt that broke off may
    be the ones in the output, so one break is enough to read the shard again next run.
    The driver creates the folder, records the whole shards (:meth:`Output.record_shards`) and
    removes the folder when the run ends.
    """

    folder: str  # Output.reading(run_id)
    storage: StorageConfig

    @staticmethod
    def name(uri: str) -> str:
        """The mark's file name for shard ``uri`` (a digest: URIs hold '/' and can be long)."""
        return hashlib.sha256(uri.encode()).hexdigest()[:32]

    def path(self, uri: str) -> str:
        return f"{self.folder}/{self.name(uri)}"

    def create(self) -> None:
        """Make the folder (on the driver, once: read tasks then only write files)."""
        fs, path = filesystem(self.folder, self.storage)
        fs.makedirs(path, exist_ok=True)

    def mark(self, uri: str, whole: bool) -> None:
        """Mark ``uri`` read to its end (``whole``) or broken off; the file holds the URI, for a
        person looking. A whole mark that cannot be written is logged (the shard is only read
        again next run); a broken one raises, as another attempt's whole mark would vouch alone."""
        fs, path = filesystem(self.path(uri) + ("" if whole else ".broken"), self.storage)
        try:
            with fs.open(path, "wb") as handle:
                handle.write(uri.encode())
        except OSError as exc:
            if not whole:
                raise
            log.warning("could not mark %s read whole (%s): the next run reads it again", uri, exc)

    def marked(self, uris: Sequence[str]) -> list[bool]:
        """Which of ``uris`` were read to their end and never broke off (one folder listing)."""
        fs, path = filesystem(self.folder, self.storage)
        names = {name.rsplit("/", 1)[-1] for name in list_folder(fs, path)}
        return [self.name(uri) in names and f"{self.name(uri)}.broken" not in names for uri in uris]

    def remove(self) -> None:
        """Remove the run's marks (when it ends, done or not). A failure only leaves the folder
        behind (no run reads it): it is logged, not raised over the run's own outcome."""
        try:
            remove_folder(self.folder, self.storage)
        except OSError as exc:
            log.warning("could not remove %s (%s); it is not used again and can be deleted", self.folder, exc)


@dataclass(frozen=True)
class Output:
    """One output folder (local or any fsspec URL) and its ledger."""

    root: str
    storage: StorageConfig = StorageConfig()

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def data(self) -> str:
        return self.path("data")

    @property
    def manifest(self) -> str:
        return self.path("_lgca", "manifest.json")

    @property
    def runs_folder(self) -> str:
        return self.path("_lgca", "runs")

    def run(self, run_id: str) -> str:
        return f"{self.runs_folder}/{run_id}.json"

    @property
    def shards(self) -> str:
        return self.path("_lgca", "shards")

    def reading(self, run_id: str) -> str:
        return self.path("_lgca", "reading", run_id)

    @property
    def journals(self) -> str:
        """The folder of the journal of a run replacing data files (see :mod:`pipeline.data.retry`)."""
        return self.path("_lgca", "retry")

    # -- data files -------------------------------------------------------------------------

    def data_files(self, run_id: str = "") -> list[str]:
        """Paths of the output's Parquet files (of one run when ``run_id`` is given)."""
        fs, path = filesystem(self.data, self.storage)
        names = [p for p in list_folder(fs, path) if p.endswith(".parquet")]
        return [p for p in names if not run_id or p.rsplit("/", 1)[-1].startswith(f"{run_id}_")]

    def read_files(self, read: Callable[[Any, str], T], run_id: str = "",
                   removed: list[str] | None = None) -> Iterator[T]:
        """``read(fs, path)`` of each complete data file (of one run when ``run_id`` is given), in
        file order, several at once. Unreadable files (partial writes of a killed run) are
        deleted so their images are labelled again (see :func:`_read_each`)."""
        fs, _ = filesystem(self.data, self.storage)
        return _read_each(fs, self.data_files(run_id), read, "its images will be labelled again", removed)

    def read_column(self, column: str, run_id: str = "", removed: list[str] | None = None) -> Iterator[pa.ChunkedArray]:
        """One column of each complete data file, in file order (see :meth:`read_files`)."""
        read = functools.partial(read_columns, columns=[column])
        return (table.column(column) for table in self.read_files(read, run_id, removed=removed))

    def labelled_ids(self, removed: list[str] | None = None) -> IdSet:
        """The ids in the output, digested file by file: the driver holds about 16 bytes per
        labelled id (32 while the files' digests are joined). Partial files removed on the way
        are appended to ``removed``."""
        return IdSet.joined([id_digests(values.to_pylist()) for values in self.read_column("id", removed=removed)])

    def run_outcome(self, run_id: str, removed: list[str]) -> tuple[int, list[str]]:
        """One run's row count and its error rows' messages (only those become Python objects),
        from its own data files; an unreadable one is removed and appended to ``removed``."""
        rows, errors = 0, []
        for count, failed in self.read_files(error_rows, run_id, removed=removed):
            rows += count
            errors += failed.column("error").to_pylist()
        return rows, errors

    # -- manifest ---------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any] | None:
        return read_json(self.manifest, self.storage)

    def first_missing(self) -> str | None:
        """The folder that writing the output would create first: the output itself, or on a local
        disk its outermost missing parent; None when the output exists. What a run removes when
        it stops before writing any row."""
        fs, path = filesystem(self.root, self.storage)
        if fs.exists(path):
            return None
        if not isinstance(fs, LocalFileSystem):
            return self.root
        missing = Path(path)
        while not missing.parent.exists() and missing.parent != missing:
            missing = missing.parent
        return str(missing)

    def check_folder(self) -> None:
        """Refuse a local output that is a file (every output is a folder of data and records)."""
        fs, path = filesystem(self.root, self.storage)
        if isinstance(fs, LocalFileSystem) and fs.isfile(path):
            raise OutputError(f"output: {self.root} is a file; give a folder to write the labels to "
                              "(a new one is created)")

    def check_manifest(self, fingerprint: dict[str, Any], overwrite: bool) -> None:
        """Refuse to add rows scored differently from the output's existing rows (unless
        ``overwrite``: :meth:`start` then removes them). Changes nothing. A manifest of the
        earlier flat form is compared in the current form (:func:`manifest_changes`)."""
        existing = self.read_manifest()
        labelled = existing is not None and bool(self.data_files())
        changes = manifest_changes(existing, fingerprint) if labelled else []
        if changes and not overwrite:
            raise ConfigError(
                f"output: {self.root} was labelled with other settings ({'; '.join(changes)}). Use a new --output, "
                "or pass --overwrite to relabel everything")

    def start(self, fingerprint: dict[str, Any], overwrite: bool) -> None:
        """Write the manifest, before any cluster resource is used; with ``overwrite``, first
        remove the existing rows and records. Called once the inputs are listed, so a wrong
        input never costs the existing labels."""
        if overwrite:
            remove_folder(self.data, self.storage)
            remove_folder(self.path("_lgca"), self.storage)
        write_json(self.manifest, fingerprint, self.storage)

    # -- shard records ----------------------------------------------------------------------

    def shards_read_whole(self) -> IdSet:
        """The shard versions earlier runs read whole (see :meth:`record_shards`), as digests of
        :func:`shard_key`: a shard listed again with the same version is not read again. A cut
        record (a run killed while writing it) is removed, which costs only a second reading
        of its shards."""
        fs, path = filesystem(self.shards, self.storage)
        names = [p for p in list_folder(fs, path) if p.endswith(".parquet")]
        read = functools.partial(read_columns, columns=["uri", "version"])
        return IdSet.joined([id_digests([shard_key(uri, version) for uri, version in
                                         zip(table.column("uri").to_pylist(), table.column("version").to_pylist())])
                             for table in _read_each(fs, names, read, "its shards will be read again")])

    def forget_shards(self) -> None:
        """Remove every shard record, when they vouch for rows the output may no longer hold (see
        :func:`pipeline.distributed.job.run_label_job`): done before any work, so that a run
        which then fails leaves no record for the next run to trust."""
        if remove_folder(self.shards, self.storage):
            log.warning("removed the shard records in %s, not trusted now: every shard will be read again",
                        self.shards)

    def record_shards(self, run_id: str, shards: Sequence[tuple[str, str | None]]) -> None:
        """Record that every row of these shards (uri, :func:`~pipeline.storage.file_version`)
        is in the output. Called once a run has written all its rows, so a run that stopped
        early records nothing and its shards are read again (their labelled rows dropped).
        Shards without a version are not recorded: nothing would tell a change."""
        shards = [(uri, version) for uri, version in shards if version is not None]
        if not shards:
            return
        fs, path = filesystem(self.shards, self.storage)
        fs.makedirs(path, exist_ok=True)
        table = pa.table({"uri": [uri for uri, _ in shards], "version": [version for _, version in shards]})
        with fs.open(f"{path}/{run_id}.parquet", "wb") as handle:
            pq.write_table(table, handle)

    def forget_shards_of(self, uris: Collection[str]) -> None:
        """Drop the records of the shards ``uris``, whose rows are about to leave the output to be
        labelled again: a record that names one is written again without it (or removed). A
        record cut by a killed run is removed (its shards are read again, as always)."""
        if not uris:
            return
        fs, path = filesystem(self.shards, self.storage)
        names = [p for p in list_folder(fs, path) if p.endswith(".parquet")]

        def read(fs: Any, name: str) -> tuple[str, pa.Table]:
            return name, read_columns(fs, name, ["uri", "version"])

        for name, table in _read_each(fs, names, read, "its shards will be read again"):
            keep = pc.invert(pc.is_in(table.column("uri"), pa.array(list(uris), pa.string())))
            if pc.all(keep).as_py():
                continue
            if not pc.any(keep).as_py():
                fs.rm(name)
                continue
            kept = table.filter(keep)
            write_whole(full_uri(fs, name), lambda handle: pq.write_table(kept, handle), self.storage)

    def marks(self, run_id: str) -> ShardMarks:
        """The marks folder of run ``run_id`` (see :class:`ShardMarks`)."""
        return ShardMarks(self.reading(run_id), self.storage)

    # -- run records ------------------------------------------------------------------------

    def write_run(self, run_id: str, record: dict[str, Any]) -> None:
        write_json(self.run(run_id), record, self.storage)

    def runs(self) -> list[dict[str, Any]]:
        """The run records, oldest first (run ids sort by start time)."""
        fs, path = filesystem(self.runs_folder, self.storage)
        names = sorted(p.rsplit("/", 1)[-1] for p in list_folder(fs, path) if p.endswith(".json"))
        records = []
        for name in names:
            try:
                records.append(read_json(f"{self.runs_folder}/{name}", self.storage))
            except json.JSONDecodeError as exc:  # cut by a kill before records were written whole
                log.warning("skipping the run record %s/%s, which is not whole JSON (%s)", self.runs_folder, name, exc)
        return [record for record in records if record is not None]
