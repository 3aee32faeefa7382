"""Error rows labelled again (``lgca label --retry-errors``), and the journal that takes them out
of the output's data files so that every reader sees each id once.

A data file is immutable once written; to take rows out of one, it is replaced: its rewrite
without those rows is written under a new name, then the old file is removed. Object stores
have no rename and no multi-file transaction, so the replacement of a run's files is kept in
a journal, ``OUTPUT/_lgca/retry/<run id>.json``, which says what a reader must skip and what a
later run must finish:

1. the journal is written with state ``writing``: ``remove`` names the old files, ``add`` their
   rewrites, none of which is whole yet (a reader skips the ``add`` files);
2. the rewrites are written;
3. the journal is written again with state ``swapping`` and the rewrites that exist (a file
   whose every row leaves gets none): every ``add`` file is whole now (a reader skips the
   ``remove`` files);
4. the old files are removed;
5. the journal is removed.

A run that finds a journal (the one before was killed) finishes it before anything else
(:func:`finish_replacement`): in state ``writing`` it removes the ``add`` files, so the old
files stand as they were; in state ``swapping`` it removes the ``remove`` files. The rows
taken out are labelled by the same run, after the replacement; until then they are in no
file, and a run killed in between leaves them for the next run to label (their ids are not
in the output, and the records of their shards were dropped first).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Collection

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import ConfigError
from pipeline.data.output import IdSet, Output, id_digests
from pipeline.data.rows import ERROR_STAGES, error_reason
from pipeline.storage import filesystem, full_uri, list_folder, read_json, write_json, write_whole

log = logging.getLogger(__name__)

WRITING, SWAPPING = "writing", "swapping"
READER_TRIES = 3  # listings a reader makes to find the journal unchanged around one


def parse_stages(text: str) -> tuple[str, ...]:
    """The stages of ``--retry-errors`` (comma-separated), each one of ERROR_STAGES."""
    stages = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not stages:
        raise ConfigError("retry_errors: name one or more stages of error rows, for example read or read,score")
    unknown = [stage for stage in stages if stage not in ERROR_STAGES]
    if unknown:
        raise ConfigError(f"retry_errors: {', '.join(map(repr, unknown))} is no stage of an error row; the "
                          f"stages are {', '.join(ERROR_STAGES)}")
    return stages


@dataclass(frozen=True)
class ErrorRows:
    """Error rows of the output, one entry per row."""

    ids: tuple[str, ...]
    uris: tuple[str, ...]  # each row's input: the loose file itself, or the tar/Parquet shard
    files: tuple[str, ...]  # the data file holding each row (a path on the output's filesystem)

    def __len__(self) -> int:
        return len(self.ids)

    def of_inputs(self, inputs: Collection[str]) -> ErrorRows:
        """The rows whose input is one of ``inputs``."""
        keep = [i for i, uri in enumerate(self.uris) if uri in inputs]
        return ErrorRows(*(tuple(column[i] for i in keep) for column in (self.ids, self.uris, self.files)))


def _error_rows_of(fs: Any, path: str, stages: tuple[str, ...]) -> tuple[str, pa.Table]:
    """``id, uri`` of one data file's error rows of ``stages`` (row groups without errors are
    skipped by their statistics)."""
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle, columns=["id", "uri", "error"], filters=pc.field("error").is_valid())
    keep = pa.array([error_reason(message) in stages for message in table.column("error").to_pylist()], pa.bool_())
    return path, table.filter(keep)


def find_error_rows(output: Output, stages: tuple[str, ...]) -> ErrorRows:
    """The output's error rows whose stage is one of ``stages``. Their ids and inputs are held
    as strings on the driver (error rows are few; about 200 bytes each)."""
    ids, uris, files = [], [], []
    for path, table in output.read_files(functools.partial(_error_rows_of, stages=stages)):
        ids += table.column("id").to_pylist()
        uris += table.column("uri").to_pylist()
        files += [path] * table.num_rows
    return ErrorRows(tuple(ids), tuple(uris), tuple(files))


@dataclass(frozen=True)
class Journal:
    """One run's replacement of data files (names in the output's data folder)."""

    run_id: str
    state: str  # WRITING: the add files may be cut or missing; SWAPPING: they are whole
    remove: tuple[str, ...]
    add: tuple[str, ...]

    @property
    def hidden(self) -> set[str]:
        """The files a reader skips while this journal stands."""
        return set(self.add if self.state == WRITING else self.remove)


def journals(output: Output) -> list[Journal]:
    """The journals in the output (one at most: one run at a time writes an output)."""
    fs, path = filesystem(output.journals, output.storage)
    found = []
    for name in list_folder(fs, path):
        content = read_json(full_uri(fs, name), output.storage) if name.endswith(".json") else None
        if content is not None:
            found.append(Journal(content["run_id"], content["state"], tuple(content["remove"]), tuple(content["add"])))
    return found


def _save(output: Output, journal: Journal) -> None:
    write_json(f"{output.journals}/{journal.run_id}.json",
               {"run_id": journal.run_id, "state": journal.state, "remove": list(journal.remove),
                "add": list(journal.add)}, output.storage)


def _remove(fs: Any, path: str) -> None:
    """Remove one file; one removed already (before a kill) is fine."""
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


def _finish(output: Output, journal: Journal) -> None:
    """Steps 4 and 5 (or, in state WRITING, the undoing of steps 1 and 2)."""
    fs, data = filesystem(output.data, output.storage)
    for name in sorted(journal.hidden):
        _remove(fs, f"{data}/{name}")
    _remove(*filesystem(f"{output.journals}/{journal.run_id}.json", output.storage))


def finish_replacement(output: Output) -> None:
    """Finish the replacement a killed run left half done (see the module's description)."""
    for journal in journals(output):
        action = "undoing" if journal.state == WRITING else "finishing"
        log.warning("%s the replacement of %d data file(s) that run %s left unfinished", action,
                    len(journal.remove), journal.run_id)
        _finish(output, journal)


def rewrite_name(name: str, run_id: str, index: int) -> str:
    """The name of the rewrite of data file ``name`` by run ``run_id``: it keeps the run id
    that starts the old name (its rows are that run's) and is unique to the rewriting run."""
    return f"{name.split('_', 1)[0]}_retry-{run_id}-{index:06d}.parquet"


def _rewrite(output: Output, path: str, drop: IdSet, new_name: str) -> bool:
    """Write data file ``path`` without the rows whose id is in ``drop`` as ``new_name``;
    False (and nothing written) when no row stays."""
    fs, data = filesystem(output.data, output.storage)
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    kept = table.filter(pa.array(~drop.contains(table.column("id").to_pylist())))
    if kept.num_rows == 0:
        return False
    write_whole(full_uri(fs, f"{data}/{new_name}"), lambda handle: pq.write_table(kept, handle), output.storage)
    return True


def take_out(output: Output, rows: ErrorRows, run_id: str) -> None:
    """Take ``rows`` out of the output's data files, through a journal (see the module)."""
    if not len(rows):
        return
    paths = sorted(set(rows.files))
    names = tuple(path.rsplit("/", 1)[-1] for path in paths)
    journal = Journal(run_id, WRITING, names, tuple(rewrite_name(n, run_id, i) for i, n in enumerate(names)))
    _save(output, journal)
    drop = IdSet.joined([id_digests(list(rows.ids))])
    written = tuple(new for path, new in zip(paths, journal.add) if _rewrite(output, path, drop, new))
    journal = Journal(run_id, SWAPPING, names, written)
    _save(output, journal)
    _finish(output, journal)


def take_out_listed(output: Output, errors: ErrorRows, files: Collection[str], shards: Collection[str],
                    run_id: str) -> int:
    """Take out of the output the ``errors`` whose input was listed by this run (loose ``files``
    or ``shards``), which the run then labels again; returns how many. Rows of inputs no
    longer listed stay. The records of their shards go first, so that no later run skips a
    shard whose rows are not all in the output."""
    rows = errors.of_inputs(set(files) | set(shards))
    output.forget_shards_of(set(rows.uris) & set(shards))
    take_out(output, rows, run_id)
    return len(rows)


def readable_files(output: Output) -> list[str]:
    """The data files that make the output now, for a reader: the listing less the files the
    journal of a replacement in progress hides. The journal is read before and after the
    listing, and the listing made again when it changed in between."""
    for _ in range(READER_TRIES):
        before = journals(output)
        files = output.data_files()
        after = journals(output)
        if before == after:
            break
    hidden = set().union(*(journal.hidden for journal in after))
    return [path for path in files if path.rsplit("/", 1)[-1] not in hidden]
