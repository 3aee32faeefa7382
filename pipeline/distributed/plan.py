"""The Ray Data plans. ``lgca label``: read bytes -> decode on CPUs -> score on model actors ->
Parquet. ``lgca relabel``: read a source output's rows and states -> score them on CPUs with a
shared text bank -> Parquet.

The only module that calls ``map_batches``. Data streams through: the driver lists
file URIs (or shard URIs) only; bytes, pixels, states and scores live in Ray's object store.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.data.datasource import FilenameProvider

from pipeline.config import LabelJob
from pipeline.data.decode import DecodeLimits, decode_batch
from pipeline.data.output import IdSet, Output, ShardMarks
from pipeline.data.rows import parquet_options
from pipeline.data.sources import iter_parquet_rows, iter_tar_rows, read_files_batch
from pipeline.data.stored import SourceRead, read_source_file
from pipeline.distributed.progress import CountedLabelActor
from pipeline.model.classes import ClassSet
from pipeline.storage import filesystem, worker_env

FILES_PER_READ = 32  # loose files per read task
DECODE_BATCH = 8  # images per decode call
SOURCE_BYTES_PER_READ = 64 << 20  # a relabel read task takes source files up to this size in all
log = logging.getLogger(__name__)


def remote_env() -> dict:
    """Ray remote args that give tasks and actors the driver's object-storage settings
    (endpoint, region, retries: :func:`~pipeline.storage.worker_env`), never its credentials,
    which Ray would write to its logs: workers take those from their node (a local Ray started
    by the driver has the driver's environment)."""
    env = worker_env(os.environ)
    return {"runtime_env": {"env_vars": env}} if env else {}


@dataclass(frozen=True)
class WorkList:
    """What the driver found to label: new image files, and shards whose rows are filtered later."""

    files: tuple[str, ...]  # image file URIs not yet labelled
    tars: tuple[str, ...]  # WebDataset tar shard URIs
    parquets: tuple[str, ...]  # Parquet file URIs

    @property
    def empty(self) -> bool:
        return not (self.files or self.tars or self.parquets)


def drop_done(batch: dict[str, list], done: IdSet) -> dict[str, list]:
    """Remove rows whose id is already in the output (shard rows are known only once read)."""
    keep = ~done.contains(list(batch["id"]))
    return {name: [v for v, k in zip(values, keep) if k] for name, values in batch.items()}


class RunFiles(FilenameProvider):
    """Data file names ``<run id>_<write uuid>_<task index>-<i>.parquet``.

    Ray appends ``-<i>`` and requires the write's uuid in append mode; the run id
    prefix lets a run's files be found (and counted) after the write.
    """

    def __init__(self, run_id: str):
        super().__init__(file_format="parquet")
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.run_id}_{write_uuid}_{task_index:06d}.parquet"


def work_items(work: WorkList) -> list[dict]:
    """Read tasks: up to FILES_PER_READ loose files, or one tar or Parquet shard, each."""
    files = [{"kind": "files", "uris": list(work.files[i:i + FILES_PER_READ])}
             for i in range(0, len(work.files), FILES_PER_READ)]
    return files + [{"kind": "tar", "uris": [u]} for u in work.tars] + \
        [{"kind": "parquet", "uris": [u]} for u in work.parquets]


def _read(kind: str, uris: list[str], job: LabelJob) -> Iterator[dict[str, list]]:
    """Column batches ``id, uri, bytes, error`` of one read task, a shard streamed in pieces."""
    storage, inputs = job.storage, job.inputs
    if kind == "files":
        yield read_files_batch({"uri": uris}, storage)
        return
    for uri in uris:
        if kind == "parquet":
            yield from iter_parquet_rows(uri, storage, inputs.image_column, inputs.id_column, FILES_PER_READ)
        else:
            yield from iter_tar_rows(uri, storage, FILES_PER_READ)


def read_items(batch: dict, job: LabelJob, done: IdSet | ray.ObjectRef | None,
               marks: ShardMarks | None = None, progress: ray.actor.ActorHandle | None = None
               ) -> Iterator[dict[str, list]]:
    """Rows ``id, uri, bytes, error`` of the read tasks in ``batch`` (see :func:`work_items`),
    without the ids already in the output. With ``marks``, each shard is marked read to its
    end after its last row, or broken off before its ``<uri>#`` error row is passed on (see
    :class:`~pipeline.data.output.ShardMarks`). With ``progress`` (the run's
    :class:`~pipeline.distributed.progress.Counter`), the rows found in each shard and the shards
    read are counted (loose files were counted on the driver)."""
    if isinstance(done, ray.ObjectRef):
        done = ray.get(done)
    for kind, uris in zip(batch["kind"], batch["uris"]):
        shard = str(uris[0]) if kind != "files" else None  # one shard per read task
        broke = False
        for rows in _read(kind, list(uris), job):
            if shard is not None and marks is not None and not broke and f"{shard}#" in rows["id"]:
                broke = True
                marks.mark(shard, whole=False)
            # loose files were filtered on the driver already; shard rows are known only now
            rows = drop_done(rows, done) if done is not None and kind != "files" else rows
            if shard is not None and progress is not None and rows["id"]:
                progress.add.remote(found=len(rows["id"]))  # not waited for
            if rows["id"]:
                yield rows
        if shard is not None and progress is not None:
            progress.add.remote(shards_read=1)
        if shard is not None and marks is not None and not broke:
            marks.mark(shard, whole=True)


def decode_pieces(batch: dict, limits: DecodeLimits) -> Iterator[dict]:
    """:func:`~pipeline.data.decode.decode_batch` over ``DECODE_BATCH`` rows at a time, so a large
    read batch never sits decoded in memory at once."""
    count = len(batch["id"])
    for start in range(0, count, DECODE_BATCH):
        yield decode_batch({name: values[start:start + DECODE_BATCH] for name, values in batch.items()}, limits)


def build(work: WorkList, job: LabelJob, classes: ClassSet, done: IdSet, run_id: str,
          image_size: int, marks: ShardMarks | None = None,
          progress: ray.actor.ActorHandle | None = None) -> ray.data.Dataset:
    """The whole plan up to (not including) the write.

    Reading and decoding are CPU tasks spread over the cluster. The decoded rows are cut into
    blocks of ``batch_size`` rows, so that each model-actor call scores one block and its rows
    go to the write as soon as it returns (one file per call on CPUs, see
    ``ResourceConfig.file_rows``; uncut, a call would get a whole read task's rows, and a
    killed run lose them all). Ray fuses the cut into the decode tasks, and the read into them
    too unless the read carries the storage settings (``remote_env``; decoding needs none, and
    Ray fuses only stages with the same remote arguments); it never fuses the cut into the
    actors. With ``progress``, the read tasks and the model actors count what they do (see
    :mod:`pipeline.distributed.progress`).
    """
    scoring, res = job.scoring, job.resources
    limits = DecodeLimits.for_model(image_size, scoring, res.max_pixels)
    remote = remote_env()  # runtime_env, passed by name (Ray 2.60 deprecates the other remote args)
    items = work_items(work)
    done_ref = ray.put(done) if len(done) and (work.tars or work.parquets) else None
    rows = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_items, fn_kwargs={"job": job, "done": done_ref, "marks": marks, "progress": progress},
        batch_size=None, num_cpus=1, **remote)
    # batch_size=None on both: one read task per work item (Ray bundles inputs up to the
    # largest batch size of a fused chain), streamed through in pieces.
    decoded = rows.map_batches(decode_pieces, fn_kwargs={"limits": limits}, batch_size=None, num_cpus=1)
    return decoded.repartition(target_num_rows_per_block=res.batch_size).map_batches(
        CountedLabelActor, batch_size=res.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=res.actors_min, max_size=res.actors_max),
        fn_constructor_kwargs={"progress": progress, "model": job.model, "classes": classes, "scoring": scoring,
                               "storage": job.storage, "run_id": run_id, "batch_size": res.batch_size,
                               "threads": res.threads_per_actor, "states": job.states},
        num_gpus=res.gpus_per_actor, num_cpus=res.cpus_per_actor, **remote)


def source_items(files: Sequence[tuple[str, str | None]]) -> list[dict]:
    """Relabel read tasks: consecutive source files (uri, version) up to SOURCE_BYTES_PER_READ in
    all by their listed sizes (a CPU label run writes files of a few dozen rows; one task each
    would cost more than their scoring); a file of unknown size counts 1/32 of that."""
    items, group, size = [], [], 0
    for uri, version in files:
        known = version.split(":", 1)[0] if version else ""
        group.append(uri)
        size += int(known) if known.isdigit() else SOURCE_BYTES_PER_READ // 32
        if size >= SOURCE_BYTES_PER_READ:
            items.append({"uris": group})
            group, size = [], 0
    return items + ([{"uris": group}] if group else [])


def read_sources(batch: dict, read: SourceRead, storage: Any, done: IdSet | ray.ObjectRef | None,
                 marks: ShardMarks) -> Iterator[pa.Table]:
    """The rows of the source files of the read tasks in ``batch`` (:func:`source_items`), without
    the ids already in the output. Each file is marked read to its end, or broken off where it
    cannot be read (its rows are unknown: the next run reads it again)."""
    if isinstance(done, ray.ObjectRef):
        done = ray.get(done)
    for uris in batch["uris"]:
        for uri in uris:
            fs, path = filesystem(str(uri), storage)
            try:
                yield from read_source_file(fs, path, read, done)
            except (pa.ArrowException, OSError) as exc:
                log.warning("cannot read source file %s (%s: %s): its rows are scored by a later run",
                            uri, type(exc).__name__, exc)
                marks.mark(str(uri), whole=False)
                continue
            marks.mark(str(uri), whole=True)


def relabel_batch(batch: pa.Table, context: Any) -> pa.Table:
    """:func:`~pipeline.distributed.actor.score_source_rows` with the shared context (an ObjectRef:
    every task on a node reads the same text bank from the object store, without a copy)."""
    from pipeline.distributed.actor import score_source_rows  # torch only in the scoring workers

    return score_source_rows(batch, ray.get(context) if isinstance(context, ray.ObjectRef) else context)


def build_relabel(files: Sequence[tuple[str, str | None]], job: Any, read: SourceRead, context: ray.ObjectRef,
                  done: IdSet, marks: ShardMarks) -> ray.data.Dataset:
    """The relabel plan up to the write: read tasks over the source's files, fused by Ray with the
    CPU scoring of their rows (``job.resources.batch_size`` rows a call), no model anywhere."""
    remote = remote_env()
    stage = {"num_cpus": job.resources.cpus_per_task, **remote}
    items = source_items(files)
    done_ref = ray.put(done) if len(done) else None
    rows = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_sources, fn_kwargs={"read": read, "storage": job.storage, "done": done_ref, "marks": marks},
        batch_size=None, **stage)
    return rows.map_batches(relabel_batch, fn_kwargs={"context": context}, batch_size=job.resources.batch_size,
                            batch_format="pyarrow", **stage)


def write(dataset: ray.data.Dataset, output: Output, job: LabelJob, run_id: str) -> None:
    """Stream the labelled rows into the output's data folder."""
    fs, path = filesystem(output.data, job.storage)
    fs.makedirs(path, exist_ok=True)
    dataset.write_parquet(path, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)),
                          filename_provider=RunFiles(run_id), min_rows_per_file=job.resources.file_rows,
                          ray_remote_args=remote_env(), **parquet_options())

