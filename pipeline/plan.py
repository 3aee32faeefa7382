"""The Ray Data plan: read bytes -> decode on CPUs -> score on model actors -> Parquet.

The only module that calls ``map_batches``. Data streams through: the driver lists
file URIs (or shard URIs) only; bytes, pixels and scores live in Ray's object store.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray
from ray.data.datasource import FilenameProvider

from .actor import LabelActor
from .config import LabelJob
from .decode import DecodeLimits, decode_batch
from .prompts import ClassSet
from .sink import DoneIds, OutputLayout, open_fs
from .sources import read_files_batch, read_parquet_batch, read_tar_batch

FILES_PER_READ = 32  # loose files per read task
DECODE_BATCH = 8  # images per decode call
FORWARDED_ENV_PREFIXES = ("AWS_",)  # object-storage settings the driver passes to every worker


def worker_env() -> dict:
    """Ray remote args that give tasks and actors the driver's AWS_* settings (endpoint,
    credentials, profile, region), so object storage is reached the same way everywhere."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
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


def drop_done(batch: dict[str, list], done: DoneIds) -> dict[str, list]:
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


def read_items(batch: dict, job: LabelJob, done: DoneIds | ray.ObjectRef | None) -> dict[str, list]:
    """Rows ``id, uri, bytes, error`` of the read tasks in ``batch`` (see :func:`work_items`)."""
    storage, inputs = job.storage, job.inputs
    columns: dict[str, list] = {name: [] for name in ("id", "uri", "bytes", "error")}
    for kind, uris in zip(batch["kind"], batch["uris"]):
        uris = {"uri": list(uris)}
        if kind == "files":
            rows = read_files_batch(uris, storage)
        elif kind == "tar":
            rows = read_tar_batch(uris, storage)
        else:
            rows = read_parquet_batch(uris, storage, inputs.image_column, inputs.id_column)
        for name in columns:
            columns[name].extend(rows[name])
    if done is not None:
        columns = drop_done(columns, ray.get(done) if isinstance(done, ray.ObjectRef) else done)
    return columns


def build(work: WorkList, job: LabelJob, classes: ClassSet, done: DoneIds, run_id: str,
          image_size: int) -> ray.data.Dataset:
    """The whole plan up to (not including) the write.

    On CPU-only runs the read and decode stages ask for the same CPUs as the model actor,
    so Ray fuses them into it: the actor's CPUs are the machine's, and no task waits for a
    CPU an actor holds. With GPUs they run as separate CPU tasks feeding the actors.
    """
    scoring, res = job.scoring, job.resources
    limits = DecodeLimits.for_model(image_size, scoring, res.max_pixels)
    remote = worker_env()
    stage = {"num_cpus": res.cpus_per_actor if res.gpus_per_actor == 0 else 1, **remote}
    items = work_items(work)
    done_ref = ray.put(done) if len(done) else None
    rows = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_items, fn_kwargs={"job": job, "done": done_ref}, batch_size=1, **stage)
    decoded = rows.map_batches(decode_batch, fn_kwargs={"limits": limits}, batch_size=DECODE_BATCH, **stage)
    return decoded.map_batches(
        LabelActor, batch_size=res.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=res.actors_min, max_size=res.actors_max),
        fn_constructor_kwargs={"model": job.model, "classes": classes, "scoring": scoring,
                               "storage": job.storage, "run_id": run_id},
        num_gpus=res.gpus_per_actor, num_cpus=res.cpus_per_actor, **remote)


def write(dataset: ray.data.Dataset, layout: OutputLayout, job: LabelJob, run_id: str) -> None:
    """Stream the labelled rows into the output's data folder."""
    fs, path = open_fs(layout.data, job.storage)
    fs.makedirs(path, exist_ok=True)
    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    # Writing is I/O: it asks for no CPU, so it never waits for one a model actor holds.
    dataset.write_parquet(path, filesystem=filesystem, filename_provider=RunFiles(run_id),
                          min_rows_per_file=job.resources.batch_size,
                          ray_remote_args={"num_cpus": 0, **worker_env()})

