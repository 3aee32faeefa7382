"""One ``lgca label`` run: validate on the driver, plan, run on Ray, record the run.

Everything that can be wrong with a job (config, class files, model name, weights,
inputs, a mismatched output) is found before Ray starts.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Sequence

from pipeline.config import ConfigError, LabelJob, to_dict
from pipeline.data.output import IdSet, Output, ShardMarks, make_manifest, shard_key
from pipeline.data.rows import error_reason
from pipeline.data.sources import check_parquet_columns, detect_kind, list_image_files, list_shard_versions
from pipeline.data.states import StateSpec, steps_for
from pipeline.distributed import plan
from pipeline.model.classes import ClassSet, load_class_set
from pipeline.model.loading import check_weights, model_embed_dim, model_input_size

log = logging.getLogger(__name__)

PACKAGES = ("lgca-pipeline", "torch", "open_clip_torch", "ray", "pyarrow", "fsspec", "s3fs")


@dataclass(frozen=True)
class RunSummary:
    """What a run did, for the closing summary and the run metadata."""

    run_id: str
    output: str
    ok: int  # rows labelled in this run
    errors: int  # error rows written in this run
    skipped: int  # input image files already in the output, not labelled again
    seconds: float
    error_reasons: dict[str, int]
    skipped_shards: int = 0  # tar/Parquet shards an earlier run read whole, unchanged since: not read

    @property
    def images_per_second(self) -> float:
        return (self.ok + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        reasons = "".join(f"\n  {count:>8}  {reason}" for reason, count in self.error_reasons.items())
        shards = f", {self.skipped_shards} shards read whole before" if self.skipped_shards else ""
        return (f"run {self.run_id}: {self.ok} ok, {self.errors} error rows, {self.skipped} already labelled{shards}; "
                f"{self.images_per_second:.2f} images/s over {self.seconds:.1f} s\n"
                f"output: {self.output}" + (f"\nerror reasons:{reasons}" if reasons else ""))


def new_run_id() -> str:
    """A sortable unique run id: UTC time and 6 random hex digits."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def fingerprint(job: LabelJob, classes: ClassSet, dim: int) -> dict[str, Any]:
    """What the output's rows depend on (image side, text side, kept states of D = ``dim``
    values per vector); a re-run must match it (else --overwrite)."""
    scoring = job.scoring
    states = (StateSpec(job.states.dtype, dim, steps_for(scoring.method, scoring.steps)).to_json()
              if job.states.kept else None)
    return make_manifest(job.model.name, job.model.pretrained, dataclasses.asdict(scoring), classes.digests(), states)


@dataclass(frozen=True)
class Listing:
    """What the driver found at the inputs, against what the output holds."""

    work: plan.WorkList
    skipped_files: int  # loose image files already labelled
    skipped_shards: int  # shards an earlier run read whole, with the same version now
    shards: tuple[tuple[str, str | None], ...]  # (uri, version) of shards in ``work``, recorded once read to their end


def _first_per_uri(shards: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """Each shard once, with the version of its first listing, in listing order."""
    first: dict[str, str | None] = {}
    for uri, version in shards:
        first.setdefault(uri, version)
    return list(first.items())


def collect_work(job: LabelJob, done: IdSet, read_whole: IdSet) -> Listing:
    """List the inputs on the driver, leaving out labelled files and shards read whole before."""
    files, shards = [], {"tar": [], "parquet": []}
    for uri in job.inputs.uris:
        kind = job.inputs.format if job.inputs.format != "auto" else detect_kind(uri)
        if kind == "files":
            files.extend(list_image_files(uri, job.storage))
        else:
            shards[kind].extend(list_shard_versions(uri, kind, job.storage))
    files = list(dict.fromkeys(files))  # a file or shard named by two inputs is read once
    shards = {kind: _first_per_uri(found) for kind, found in shards.items()}
    new = [f for f, seen in zip(files, done.contains(files)) if not seen]
    unread = {kind: [s for s, seen in zip(found, read_whole.contains([shard_key(*s) for s in found])) if not seen]
              for kind, found in shards.items()}
    if unread["parquet"]:
        check_parquet_columns(unread["parquet"][0][0], job.storage, job.inputs.image_column, job.inputs.id_column)
    work = plan.WorkList(tuple(new), tuple(u for u, _ in unread["tar"]), tuple(u for u, _ in unread["parquet"]))
    return Listing(work, skipped_files=len(files) - len(new),
                   skipped_shards=sum(len(found) - len(unread[kind]) for kind, found in shards.items()),
                   shards=tuple(unread["tar"] + unread["parquet"]))


def record_whole_shards(output: Output, run_id: str, shards: Sequence[tuple[str, str | None]],
                        marks: ShardMarks) -> None:
    """Record the ``shards`` that ``marks`` show read to their end. Once the rows are written,
    a store error here is logged, not raised: unrecorded shards are only read again next run."""
    try:
        whole = marks.marked([uri for uri, _ in shards])
        output.record_shards(run_id, [s for s, read in zip(shards, whole) if read])
    except OSError as exc:
        log.warning("could not record the shards read whole (%s): the next run reads them again", exc)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def prepare(job: LabelJob) -> tuple[ClassSet, int, int]:
    """Driver-side validation that needs files: classes, model name and weights. Returns the
    classes, the model's input size and its embedding size."""
    classes = load_class_set(job.text, job.storage)
    check_weights(job.model, job.storage)
    return classes, model_input_size(job.model.name), model_embed_dim(job.model.name)


def ray_address(job: LabelJob) -> str:
    """``--address``, else ``RAY_ADDRESS``, else ``local``: a new Ray on this machine, never a
    cluster someone else started here."""
    return job.address or os.environ.get("RAY_ADDRESS", "") or "local"


def check_local_resources(job: LabelJob) -> None:
    """On a local Ray, the first model actors (``actors_min``) and one read/decode task must fit
    this machine, or the run would wait forever."""
    if ray_address(job) != "local":
        return
    res, cpus = job.resources, os.cpu_count() or 1
    actors = res.actors_min
    if actors * res.cpus_per_actor + 1 > cpus:
        fit = (cpus - 1) / actors
        fix = (f"use --cpus-per-actor {fit:g} or less (and --threads-per-actor {cpus} to let torch use every "
               "core), fewer actors, or " if fit > 0 else "")
        raise ConfigError(
            f"actors, cpus_per_actor: {actors} actor(s) of {res.cpus_per_actor} CPUs leave none of this "
            f"machine's {cpus} CPUs for reading and decoding; {fix}run on a cluster (--address)")
    if res.gpus_per_actor > 0:
        import torch

        gpus = torch.cuda.device_count()
        if actors * res.gpus_per_actor > gpus:
            raise ConfigError(f"actors, gpus_per_actor: {actors} actor(s) of {res.gpus_per_actor} GPUs but this "
                              f"machine has {gpus} GPUs; use --gpus-per-actor 0 to run on CPUs, fewer actors, "
                              "or run on a cluster (--address)")


def start_ray(job: LabelJob) -> None:
    """Connect to the job's Ray (see :func:`ray_address`) unless this process already is."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address(job))


def run_label_job(job: LabelJob) -> RunSummary:
    """Label every image of ``job`` not yet in its output; returns what was done."""
    started, clock = datetime.now(timezone.utc), time.monotonic()
    check_local_resources(job)
    classes, image_size, dim = prepare(job)
    output = Output(job.output, job.storage)
    manifest = fingerprint(job, classes, dim)
    output.check_manifest(manifest, job.overwrite)
    lost: list[str] = []  # partial data files removed while the output's ids are read
    done = IdSet.empty() if job.overwrite else output.labelled_ids(lost)
    # shard records vouch for rows in the output: not trusted when it has no data (deleted by
    # hand) or just lost a file (whose rows may belong to recorded shards); all are read then
    if len(done) and not lost:
        read_whole = output.shards_read_whole()
    else:
        read_whole = IdSet.empty()
        if not job.overwrite:
            output.forget_shards()
    listing = collect_work(job, done, read_whole)
    output.start(manifest, job.overwrite)
    run_id = new_run_id()
    marks = output.marks(run_id) if listing.shards else None
    try:
        if not listing.work.empty:
            if marks is not None:
                marks.create()
            start_ray(job)
            dataset = plan.build(listing.work, job, classes, done, run_id, image_size, marks)
            plan.write(dataset, output, job, run_id)
        own_lost: list[str] = []
        rows, errors = output.run_outcome(run_id, own_lost)
        # every row is written now; only shards read to their end are recorded, and none if a
        # file of this run could not be read (it may hold any shard's rows)
        if marks is not None and not own_lost:
            record_whole_shards(output, run_id, listing.shards, marks)
    finally:
        if marks is not None:
            marks.remove()
    reasons = dict(Counter(error_reason(message) for message in errors))
    summary = RunSummary(run_id=run_id, output=job.output, ok=rows - len(errors), errors=len(errors),
                         skipped=listing.skipped_files, seconds=time.monotonic() - clock, error_reasons=reasons,
                         skipped_shards=listing.skipped_shards)
    output.write_run(run_id, run_metadata(job, classes, summary, started))
    return summary


def run_metadata(job: LabelJob, classes: ClassSet, summary: RunSummary, started: datetime) -> dict[str, Any]:
    """The run's record: settings, text digests, versions, times and counts."""
    return {
        "run_id": summary.run_id, "name": job.name,
        "started_at": started.isoformat(), "finished_at": datetime.now(timezone.utc).isoformat(),
        "inputs": list(job.inputs.uris), "output": job.output,
        "model": to_dict(job.model), "scoring": to_dict(job.scoring), "resources": to_dict(job.resources),
        "states": to_dict(job.states),
        "seed": job.scoring.seed, "classes": list(classes.names), "templates": list(classes.templates),
        "text_digests": classes.digests(), "versions": package_versions(),
        "counts": {"ok": summary.ok, "error": summary.errors, "skipped": summary.skipped,
                   "skipped_shards": summary.skipped_shards},
        "error_reasons": summary.error_reasons, "seconds": summary.seconds,
        "images_per_second": summary.images_per_second,
    }

