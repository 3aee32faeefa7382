"""One ``lgca label`` run: validate on the driver, plan, run on Ray, record the run.

Everything that can be wrong with a job (config, class files, model name, weights -- found
in the local cache or downloaded first --, inputs, an output that is a file or was labelled
with other settings) is found before Ray starts. A run that stops early (Ctrl-C, an error)
still gets a record with what it labelled, marked ``interrupted`` or ``failed``; one that
stops before labelling anything leaves no output folder behind that it created.
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
from typing import Any, Collection, Sequence

from pipeline.config import ConfigError, LabelJob, LgcaError, OutputError, to_dict
from pipeline.data.output import IdSet, Output, ShardMarks, make_manifest, shard_key
from pipeline.data.retry import ErrorRows, find_error_rows, finish_replacement, parse_stages, take_out_listed
from pipeline.data.rows import error_reason
from pipeline.data.sources import check_parquet_columns, detect_kind, list_image_files, list_shard_versions
from pipeline.data.states import StateSpec, steps_for
from pipeline.distributed import plan
from pipeline.distributed.console import Display, configure_ray_output, core_worker_noise_dropped, init_options
from pipeline.distributed.progress import counter_reporter, start_counter
from pipeline.model.classes import ClassSet, load_class_set
from pipeline.model.loading import check_weights, model_embed_dim, model_input_size, random_weights_note
from pipeline.storage import redact, remove_folder

log = logging.getLogger(__name__)

PACKAGES = ("lgca-pipeline", "torch", "open_clip_torch", "ray", "pyarrow", "fsspec", "s3fs")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run after its record was written; the message is what ``lgca label`` prints."""

    def __init__(self, images: int | None):
        done = "" if images is None else f" after {images} image{'' if images == 1 else 's'}"
        super().__init__(f"interrupted{done}; rerun the same command to resume")
        self.images = images  # None where the run's rows could not be counted


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
    retried: int = 0  # error rows taken out of the output to be labelled again (--retry-errors)

    @property
    def images_per_second(self) -> float:
        return (self.ok + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        reasons = "".join(f"\n  {count:>8}  {reason}" for reason, count in self.error_reasons.items())
        shards = f", {self.skipped_shards} shards read whole before" if self.skipped_shards else ""
        shards += f", {self.retried} error rows labelled again" if self.retried else ""
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


def collect_work(job: LabelJob, done: IdSet, read_whole: IdSet, reread: Collection[str] = ()) -> Listing:
    """List the inputs on the driver, leaving out labelled files and shards read whole before
    (unless in ``reread``: shards with error rows to label again)."""
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
    unread = {kind: [s for s, seen in zip(found, read_whole.contains([shard_key(*s) for s in found]))
                     if not seen or s[0] in reread] for kind, found in shards.items()}
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
    """Driver-side validation that needs files: classes, model name and weights (a tag's weights
    fetched now, see :func:`~pipeline.model.loading.check_weights`). Returns the classes, the
    model's input size and its embedding size."""
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


def start_ray(job: LabelJob, display: Display = Display()) -> None:
    """Connect to the job's Ray (see :func:`ray_address`) unless this process already is; what
    Ray prints is set by ``display`` (see :mod:`pipeline.distributed.console`)."""
    import ray

    configure_ray_output(display, local=ray_address(job) == "local")
    if not ray.is_initialized():
        ray.init(address=ray_address(job), **init_options(display))


@dataclass(frozen=True)
class Run:
    """One run's fixed facts, shared by its steps and its record."""

    job: LabelJob
    run_id: str
    output: Output
    classes: ClassSet
    started: datetime
    clock: float  # time.monotonic() at the start
    retry_stages: tuple[str, ...] = ()  # the error stages labelled again (--retry-errors)
    retried: int = 0  # error rows taken out of the output to be labelled again


def known_rows(job: LabelJob, output: Output, retryable: ErrorRows) -> tuple[IdSet, IdSet]:
    """The ids in the output but ``retryable``'s, and the shard versions read whole before (none
    with --overwrite)."""
    lost: list[str] = []  # partial data files removed while the output's ids are read
    done = IdSet.empty() if job.overwrite else output.labelled_ids(lost)
    done = done.without(retryable.ids)
    # shard records vouch for rows in the output: not trusted when it has no data (deleted by
    # hand) or just lost a file (whose rows may belong to recorded shards); all are read then
    if len(done) and not lost:
        return done, output.shards_read_whole()
    if not job.overwrite:
        output.forget_shards()
    return done, IdSet.empty()


def label_on_ray(run: Run, work: plan.WorkList, done: IdSet, image_size: int, marks: ShardMarks | None,
                 display: Display) -> None:
    """Label ``work`` on Ray into the output, showing progress unless ``display`` is quiet."""
    model = run.job.model
    if model.pretrained.lower() == "none":  # said here once, not by every model actor
        log.warning("%s", random_weights_note(model.name))
    start_ray(run.job, display)
    progress = None if display.quiet else start_counter()
    dataset = plan.build(work, run.job, run.classes, done, run.run_id, image_size, marks, progress)
    with core_worker_noise_dropped(not display.verbose) as terminal:
        reporter = None if progress is None else counter_reporter(
            progress, len(work.files), len(work.tars) + len(work.parquets), terminal)
        if reporter is not None:
            reporter.start()
        finished = False
        try:
            plan.write(dataset, run.output, run.job, run.run_id)
            finished = True
        except OSError as exc:  # also a Ray task's error: Ray's wrapper subclasses the task's own
            raise OutputError(storage_failure(exc)) from exc
        finally:
            if reporter is not None:
                reporter.stop(finished)


def execute(run: Run, listing: Listing, done: IdSet, image_size: int, display: Display) -> tuple[int, list[str]]:
    """Label the listed work and record the shards read whole; returns the run's row count and
    its error messages, read from its own files."""
    marks = run.output.marks(run.run_id) if listing.shards else None
    try:
        if not listing.work.empty:
            work = listing.work
            shards = f" and the new rows of {len(work.tars) + len(work.parquets)} shard(s)" if listing.shards else ""
            log.info("labelling %d image file(s)%s; %d already labelled", len(work.files), shards,
                     listing.skipped_files)
            if marks is not None:
                marks.create()
            label_on_ray(run, listing.work, done, image_size, marks, display)
        own_lost: list[str] = []
        rows, errors = run.output.run_outcome(run.run_id, own_lost)
        # every row is written now; only shards read to their end are recorded, and none if a
        # file of this run could not be read (it may hold any shard's rows)
        if marks is not None and not own_lost:
            record_whole_shards(run.output, run.run_id, listing.shards, marks)
        return rows, errors
    finally:
        if marks is not None:
            marks.remove()


def summarize_run(run: Run, listing: Listing, rows: int, errors: list[str]) -> RunSummary:
    reasons = dict(Counter(error_reason(message) for message in errors))
    return RunSummary(run_id=run.run_id, output=run.job.output, ok=rows - len(errors), errors=len(errors),
                      skipped=listing.skipped_files, seconds=time.monotonic() - run.clock, error_reasons=reasons,
                      skipped_shards=listing.skipped_shards, retried=run.retried)


def stopped_early(run: Run, listing: Listing, created: str | None, exc: BaseException) -> BaseException:
    """After Ctrl-C or an error: record the run with what it wrote (``interrupted`` or ``failed``),
    or, when it wrote nothing into an output it created (``created``: the outermost folder it
    made, see :meth:`Output.first_missing`), remove that. Returns what to raise:
    :class:`Interrupted` for Ctrl-C, else ``exc``."""
    interrupted = isinstance(exc, KeyboardInterrupt)
    if interrupted:
        stop_ray()  # no write task may add a file after the rows are counted
    try:
        rows, errors = run.output.run_outcome(run.run_id, [])
        if created is not None and not run.output.data_files():
            remove_folder(created, run.job.storage)
        else:
            status = "interrupted" if interrupted else "failed"
            record = run_metadata(run, summarize_run(run, listing, rows, errors), status,
                                  None if interrupted else redact(f"{type(exc).__name__}: {exc}"))
            run.output.write_run(run.run_id, record)
    except (OSError, LgcaError) as err:  # the store failed too: the original stop is what matters
        log.warning("could not record the stopped run %s (%s)", run.run_id, err)
        return Interrupted(None) if interrupted else exc
    return Interrupted(rows) if interrupted else exc


def stop_ray() -> None:
    """Disconnect from Ray (stopping a Ray this run started, and with it every task of the run)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run_label_job(job: LabelJob, display: Display = Display()) -> RunSummary:
    """Label every image of ``job`` not yet in its output; returns what was done. Ctrl-C raises
    :class:`Interrupted` once the run's record says how far it got."""
    started, clock = datetime.now(timezone.utc), time.monotonic()
    check_local_resources(job)
    classes, image_size, dim = prepare(job)
    output = Output(job.output, job.storage)
    output.check_folder()
    manifest = fingerprint(job, classes, dim)
    output.check_manifest(manifest, job.overwrite)
    stages = retry_stages(job)
    if not job.overwrite:
        finish_replacement(output)  # of a run killed while it replaced data files (--retry-errors)
    retryable = find_error_rows(output, stages) if stages else ErrorRows((), (), ())
    done, read_whole = known_rows(job, output, retryable)
    listing = collect_work(job, done, read_whole, reread=frozenset(retryable.uris))
    created = output.first_missing()
    output.start(manifest, job.overwrite)
    run_id, work = new_run_id(), listing.work
    retried = take_out_listed(output, retryable, work.files, work.tars + work.parquets, run_id)
    run = Run(job, run_id, output, classes, started, clock, stages, retried)
    try:
        rows, errors = execute(run, listing, done, image_size, display)
    except BaseException as exc:
        stop = stopped_early(run, listing, created, exc)
        if stop is exc:
            raise
        raise stop from None
    summary = summarize_run(run, listing, rows, errors)
    output.write_run(run.run_id, run_metadata(run, summary))
    return summary


def storage_failure(exc: OSError) -> str:
    """What to say when storage failed the run, every retry of a request spent."""
    cause = getattr(exc, "cause", None) or exc  # a Ray task error carries the task's exception
    return (f"the run stopped: storage failed after every retry of a request ({type(cause).__name__}: {cause}). "
            "The rows written before are kept and nothing is labelled twice: run the same command again to "
            "label the rest (--retries sets the attempts per request; docs/reliability.md)")


def retry_stages(job: LabelJob) -> tuple[str, ...]:
    """The stages of the error rows to label again (``--retry-errors``); none when not given."""
    if not job.retry_errors:
        return ()
    if job.overwrite:
        raise ConfigError("retry_errors: --overwrite labels every image again already; drop one of the two")
    return parse_stages(job.retry_errors)


def run_metadata(run: Run, summary: RunSummary, status: str = "done", error: str | None = None) -> dict[str, Any]:
    """The run's record: settings, text digests and sources (bundled sets by name), versions,
    times and counts; ``status`` is ``done``, ``interrupted`` (Ctrl-C) or ``failed`` (with ``error``)."""
    job, classes = run.job, run.classes
    record = {
        "run_id": summary.run_id, "name": job.name, "status": status, "error": error,
        "started_at": run.started.isoformat(), "finished_at": datetime.now(timezone.utc).isoformat(),
        "inputs": list(job.inputs.uris), "output": job.output,
        "model": to_dict(job.model), "scoring": to_dict(job.scoring), "resources": to_dict(job.resources),
        "states": to_dict(job.states),
        "seed": job.scoring.seed, "classes": list(classes.names), "templates": list(classes.templates),
        "text_digests": classes.digests(), "text_sources": to_dict(classes.sources), "versions": package_versions(),
        "counts": {"ok": summary.ok, "error": summary.errors, "skipped": summary.skipped,
                   "skipped_shards": summary.skipped_shards},
        "error_reasons": summary.error_reasons, "seconds": summary.seconds,
        "images_per_second": summary.images_per_second,
    }
    if run.retry_stages:
        record["retry_errors"] = {"stages": list(run.retry_stages), "rows": run.retried}
    return record
