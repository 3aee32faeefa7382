"""The Ray Data plan: read bytes -> decode on CPUs -> score on model actors -> Parquet.

The only module that calls ``map_batches``. Data streams through: the driver lists
file URIs (or shard URIs) only; bytes, pixels and scores live in Ray's object store.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import reduce

import numpy as np
import pyarrow.fs as pafs
import ray
from ray.data.datasource import FilenameProvider

from .actor import LabelActor
from .config import LabelJob
from .decode import DecodeLimits, decode_batch
from .prompts import ClassSet
from .sink import DoneIds, OutputLayout, open_fs
from .sources import read_files_batch, read_parquet_batch, read_tar_batch

FILES_PER_READ = 32  # file URIs per read task batch
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


def drop_done(batch: dict[str, np.ndarray], done: DoneIds | ray.ObjectRef) -> dict[str, np.ndarray]:
    """Remove rows whose id is already in the output (shard inputs are filtered after reading).

    ``done`` comes as an object-store reference, so every task shares one copy of the digests.
    """
    if isinstance(done, ray.ObjectRef):
        done = ray.get(done)
    keep = ~done.contains(list(batch["id"]))
    return {name: np.asarray(values)[keep] for name, values in batch.items()}


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


def _items(uris: tuple[str, ...], per_block: int) -> ray.data.Dataset:
    return ray.data.from_items([{"uri": u} for u in uris],
                               override_num_blocks=max(1, math.ceil(len(uris) / per_block)))


def read_stage(work: WorkList, job: LabelJob, done: DoneIds) -> ray.data.Dataset:
    """Rows ``id, uri, bytes, error`` of every image still to label."""
    storage, remote = job.storage, worker_env()
    done_ref = ray.put(done) if len(done) else None
    parts = []
    if work.files:
        parts.append(_items(work.files, FILES_PER_READ).map_batches(
            read_files_batch, fn_kwargs={"storage": storage}, batch_size=FILES_PER_READ, **remote))
    shard_readers = [(work.tars, read_tar_batch, {}),
                     (work.parquets, read_parquet_batch, {"image_column": job.inputs.image_column,
                                                          "id_column": job.inputs.id_column})]
    for shards, reader, extra in shard_readers:
        if shards:
            rows = _items(shards, 1).map_batches(reader, fn_kwargs={"storage": storage, **extra},
                                                 batch_size=1, **remote)
            parts.append(rows.map_batches(drop_done, fn_kwargs={"done": done_ref}, **remote)
                         if done_ref is not None else rows)
    return reduce(lambda a, b: a.union(b), parts)


def build(work: WorkList, job: LabelJob, classes: ClassSet, done: DoneIds, run_id: str,
          image_size: int) -> ray.data.Dataset:
    """The whole plan up to (not including) the write."""
    scoring, res = job.scoring, job.resources
    short_side = math.ceil(image_size / scoring.alpha) if scoring.needs_crops else image_size
    limits = DecodeLimits(max_short_side=short_side, max_pixels=res.max_pixels)
    remote = worker_env()
    decoded = read_stage(work, job, done).map_batches(
        decode_batch, fn_kwargs={"limits": limits}, batch_size=DECODE_BATCH, **remote)
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
    dataset.write_parquet(path, filesystem=filesystem, filename_provider=RunFiles(run_id),
                          min_rows_per_file=job.resources.batch_size, ray_remote_args=worker_env())

