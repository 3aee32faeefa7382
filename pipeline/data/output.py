"""The output: its explicit Parquet schema, result rows, and the output folder's layout.

Layout of an output folder (local or any fsspec URL)::

    OUTPUT/data/<run id>_<write uuid>_<task>-<i>.parquet   labels, one row per input image
    OUTPUT/_lgca/manifest.json                    what every row was scored with
    OUTPUT/_lgca/runs/<run id>.json               metadata of each run
    OUTPUT/_lgca/shards/<run id>.parquet          the shards (uri, version) a finished run read whole
    OUTPUT/_lgca/reading/<run id>/<digest>[.broken]  a running run's marks: shards read to their end, or not

docs/output-schema.md documents every column.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import ConfigError, SourceError, StorageConfig
from pipeline.storage import filesystem, list_folder, read_json, remove_folder, write_json


log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class OutputLayout:
    """Paths inside one output folder."""

    root: str

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def data(self) -> str:
        return self.path("data")

    @property
    def manifest(self) -> str:
        return self.path("_lgca", "manifest.json")

    def run(self, run_id: str) -> str:
        return self.path("_lgca", "runs", f"{run_id}.json")

    @property
    def shards(self) -> str:
        return self.path("_lgca", "shards")

    def reading(self, run_id: str) -> str:
        return self.path("_lgca", "reading", run_id)


READ_THREADS = 16  # output files read at once by _read_each


def data_files(layout: OutputLayout, storage: StorageConfig, run_id: str = "") -> list[str]:
    """Paths of the output's Parquet files (of one run when ``run_id`` is given)."""
    fs, path = filesystem(layout.data, storage)
    names = [p for p in list_folder(fs, path) if p.endswith(".parquet")]
    return [p for p in names if not run_id or p.rsplit("/", 1)[-1].startswith(f"{run_id}_")]


def _read_columns(fs: Any, path: str, columns: Sequence[str]) -> pa.Table:
    """``columns`` of one data file. A file that is not (yet) Parquet raises ArrowInvalid; a
    Parquet file without these columns is no file of this pipeline: SourceError."""
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise SourceError(f"{path}: a Parquet file without the column(s) {', '.join(missing)} of this "
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
               removed: list[str] | None = None, threads: int = READ_THREADS) -> Iterator[T]:
    """``read(fs, path)`` of each of ``paths``, in order. ``threads`` files are read at once (on
    object storage each read is a few requests; an output of a billion images has hundreds of
    thousands of files) and at most twice as many are held ahead of the caller (see
    :func:`_read_or_remove` for unreadable files)."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lgca-output-read")
    try:
        ahead: deque[tuple[str, Future]] = deque()
        for path in paths:
            ahead.append((path, pool.submit(read, fs, path)))
            if len(ahead) >= 2 * threads:
                yield from _read_or_remove(fs, *ahead.popleft(), then, removed)
        while ahead:
            yield from _read_or_remove(fs, *ahead.popleft(), then, removed)
    finally:  # on an error or an early stop, drop the queued reads instead of waiting for them
        pool.shutdown(wait=False, cancel_futures=True)


def _read_or_remove(fs: Any, path: str, read: Future, then: str, removed: list[str] | None) -> Iterator:
    """What was read from ``path``. A file that is not (yet) Parquet is a partial write of a
    killed run (a cut file has no closing magic bytes): it is deleted (logged with ``then``,
    appended to ``removed`` when given) and nothing is yielded. Any other error (the network,
    permissions) says nothing about the file: it is kept and a SourceError names it."""
    try:
        values = read.result()
    except pa.ArrowInvalid as exc:
        log.warning("removing incomplete output file %s (%s); %s", path, exc, then)
        fs.rm(path)
        if removed is not None:
            removed.append(path)
        return
    except OSError as exc:
        raise SourceError(f"{path}: cannot read this output file ({type(exc).__name__}: {exc}); nothing was "
                          "removed: check access to the output and run again") from exc
    yield values


def iter_files(layout: OutputLayout, storage: StorageConfig, read: Callable[[Any, str], T], run_id: str = "",
               removed: list[str] | None = None) -> Iterator[T]:
    """``read(fs, path)`` of each complete data file (of one run when ``run_id`` is given), in
    file order, several at once (see :func:`_read_each`). Unreadable files (partial writes of
    a killed run) are deleted so their images are labelled again."""
    fs, _ = filesystem(layout.data, storage)
    return _read_each(fs, data_files(layout, storage, run_id), read, "its images will be labelled again", removed)


def iter_column(layout: OutputLayout, storage: StorageConfig, column: str, run_id: str = "",
                removed: list[str] | None = None) -> Iterator[pa.ChunkedArray]:
    """One column of each complete data file, in file order (see :func:`iter_files`)."""
    read = functools.partial(_read_columns, columns=[column])
    return (table.column(column) for table in iter_files(layout, storage, read, run_id, removed=removed))


def id_digests(ids: Sequence[str]) -> np.ndarray:
    """128-bit digests of image ids (collisions are out of reach at any realistic scale)."""
    return np.array([hashlib.blake2b(i.encode(), digest_size=16).digest() for i in ids], dtype="S16")


CONTAINS_CHUNK = 1 << 20  # ids digested at a time by DoneIds.contains


@dataclass(frozen=True)
class DoneIds:
    """A set of ids (the images already in the output; or shard versions, see
    :func:`completed_shards`) as a sorted array of digests (16 bytes an id)."""

    digests: np.ndarray

    @classmethod
    def load(cls, layout: OutputLayout, storage: StorageConfig, removed: list[str] | None = None) -> DoneIds:
        """Digest the output's ids file by file and sort the digests in place: the driver holds
        about 16 bytes per labelled id (32 while the files' digests are joined), never all the
        ids themselves. Partial files removed on the way are appended to ``removed``."""
        ids = iter_column(layout, storage, "id", removed=removed)
        return cls.joined([id_digests(values.to_pylist()) for values in ids])

    @classmethod
    def joined(cls, parts: list[np.ndarray]) -> DoneIds:
        """The set of the digests in ``parts`` (emptied as they are joined)."""
        digests = np.concatenate(parts) if parts else id_digests([])
        parts.clear()
        digests.sort()
        first = np.ones(len(digests), dtype=bool)  # False on repeats of the previous digest
        first[1:] = digests[1:] != digests[:-1]
        return cls(digests if first.all() else digests[first])

    def __len__(self) -> int:
        return len(self.digests)

    def contains(self, ids: Sequence[str]) -> np.ndarray:
        """A boolean mask: which of ``ids`` are already labelled (digested CONTAINS_CHUNK ids at
        a time, so a listing of many millions of files is never digested at once)."""
        mask = np.zeros(len(ids), dtype=bool)
        if len(self.digests) == 0:
            return mask
        for start in range(0, len(ids), CONTAINS_CHUNK):
            query = id_digests(ids[start:start + CONTAINS_CHUNK])
            pos = np.minimum(np.searchsorted(self.digests, query), len(self.digests) - 1)
            mask[start:start + len(query)] = self.digests[pos] == query
        return mask


def shard_key(uri: str, version: str | None) -> str:
    """One version of one shard, as :class:`DoneIds` holds it."""
    return f"{uri}\n{version}"


def record_shards(layout: OutputLayout, storage: StorageConfig, run_id: str,
                  shards: Sequence[tuple[str, str | None]]) -> None:
    """Record that every row of these shards (uri, :func:`~pipeline.data.sources.file_version`)
    is in the output. Called once a run has written all its rows, so a run that stopped
    early records nothing and its shards are read again (their labelled rows dropped).
    Shards without a version are not recorded: nothing would tell a change."""
    shards = [(uri, version) for uri, version in shards if version is not None]
    if not shards:
        return
    fs, path = filesystem(layout.shards, storage)
    fs.makedirs(path, exist_ok=True)
    table = pa.table({"uri": [uri for uri, _ in shards], "version": [version for _, version in shards]})
    with fs.open(f"{path}/{run_id}.parquet", "wb") as handle:
        pq.write_table(table, handle)


@dataclass(frozen=True)
class ShardMarks:
    """One run's proof that a shard was read to its end.

    A read task writes ``<digest>`` after a shard's last row, or ``<digest>.broken`` as soon as
    its reading breaks off (the shard's ``<uri>#`` error row), before that row leaves the task.
    Nothing removes a mark during the run, and a shard counts as read whole only with a
    whole mark and no broken one: whichever attempts Ray makes of a read task (a retry after a
    lost worker, or a re-run to rebuild a lost block), the rows of an attempt that broke off may
    be the ones in the output, so one break is enough to read the shard again next run.
    The driver creates the folder, records the whole shards (:func:`record_shards`) and
    removes the folder when the run ends.
    """

    folder: str  # OutputLayout.reading(run_id)

    @staticmethod
    def name(uri: str) -> str:
        """The mark's file name for shard ``uri`` (a digest: URIs hold '/' and can be long)."""
        return hashlib.sha256(uri.encode()).hexdigest()[:32]

    def path(self, uri: str) -> str:
        return f"{self.folder}/{self.name(uri)}"

    def create(self, storage: StorageConfig) -> None:
        """Make the folder (on the driver, once: read tasks then only write files)."""
        fs, path = filesystem(self.folder, storage)
        fs.makedirs(path, exist_ok=True)

    def mark(self, uri: str, storage: StorageConfig, whole: bool) -> None:
        """Mark ``uri`` read to its end (``whole``) or broken off; the file holds the URI, for a
        person looking. A whole mark that cannot be written is logged (the shard is only read
        again next run); a broken one raises, as another attempt's whole mark would vouch alone."""
        fs, path = filesystem(self.path(uri) + ("" if whole else ".broken"), storage)
        try:
            with fs.open(path, "wb") as handle:
                handle.write(uri.encode())
        except OSError as exc:
            if not whole:
                raise
            log.warning("could not mark %s read whole (%s): the next run reads it again", uri, exc)

    def marked(self, uris: Sequence[str], storage: StorageConfig) -> list[bool]:
        """Which of ``uris`` were read to their end and never broke off (one folder listing)."""
        fs, path = filesystem(self.folder, storage)
        names = {name.rsplit("/", 1)[-1] for name in list_folder(fs, path)}
        return [self.name(uri) in names and f"{self.name(uri)}.broken" not in names for uri in uris]

    def remove(self, storage: StorageConfig) -> None:
        """Remove the run's marks (when it ends, done or not). A failure only leaves the folder
        behind (no run reads it): it is logged, not raised over the run's own outcome."""
        try:
            remove_folder(self.folder, storage)
        except OSError as exc:
            log.warning("could not remove %s (%s); it is not used again and can be deleted", self.folder, exc)


def forget_shards(layout: OutputLayout, storage: StorageConfig) -> None:
    """Remove every shard record, when they vouch for rows the output may no longer hold (see
    :func:`pipeline.distributed.job.run_label_job`): done before any work, so that a run which then
    fails leaves no record for the next run to trust."""
    if remove_folder(layout.shards, storage):
        log.warning("removed the shard records in %s, not trusted now: every shard will be read again",
                    layout.shards)


def completed_shards(layout: OutputLayout, storage: StorageConfig) -> DoneIds:
    """The shard versions earlier runs read whole (see :func:`record_shards`), as digests of
    :func:`shard_key`: a shard listed again with the same version is not read again. The
    records (one file per run) are read READ_THREADS at a time; a cut one (a run killed while
    writing it) is removed, which costs only a second reading of its shards."""
    fs, path = filesystem(layout.shards, storage)
    names = [p for p in list_folder(fs, path) if p.endswith(".parquet")]
    read = functools.partial(_read_columns, columns=["uri", "version"])
    return DoneIds.joined([id_digests([shard_key(uri, version) for uri, version in
                                       zip(table.column("uri").to_pylist(), table.column("version").to_pylist())])
                           for table in _read_each(fs, names, read, "its shards will be read again")])


def check_manifest(layout: OutputLayout, fingerprint: dict[str, Any], storage: StorageConfig,
                   overwrite: bool) -> None:
    """Refuse to add rows scored differently from the output's existing rows (unless
    ``overwrite``: :func:`start_output` then removes them). Changes nothing."""
    existing = read_json(layout.manifest, storage)
    labelled = existing is not None and bool(data_files(layout, storage))
    if labelled and existing != fingerprint and not overwrite:
        changed = sorted(k for k in set(existing) | set(fingerprint) if existing.get(k) != fingerprint.get(k))
        details = "; ".join(f"{k}: {existing.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
        raise ConfigError(
            f"output: {layout.root} was labelled with other settings ({details}). Use a new --output, "
            "or pass --overwrite to relabel everything")


def start_output(layout: OutputLayout, fingerprint: dict[str, Any], storage: StorageConfig,
                 overwrite: bool) -> None:
    """Write the output's manifest, before any cluster resource is used; with ``overwrite``,
    first remove the existing rows and records. Called once the inputs are listed, so a
    wrong input never costs the existing labels."""
    if overwrite:
        remove_folder(layout.data, storage)
        remove_folder(layout.path("_lgca"), storage)
    write_json(layout.manifest, fingerprint, storage)
