"""One ``lgca relabel`` run: a labelled output's image states, scored with another text side.

Validated on the driver before Ray starts: the source's manifest (states kept, the model and
weights, a method and T its states can give), its first data file's states, the classes; then
the text bank is built here, once, from the model's text tower (the image tower is never run)
and shared with every scoring task through Ray's object store. Incremental like ``lgca label``:
the new output's ids are skipped, and the source's data files a finished run read whole are
recorded in the new output's shard records (``_lgca/shards``) and not read again, so a relabel
scheduled after a label reads only the label run's new files.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipeline.config import ConfigError, RelabelJob, ScoringParams, to_dict
from pipeline.data.output import IdSet, Output, ShardMarks, make_manifest, manifest_form, shard_key
from pipeline.data.retry import readable_files
from pipeline.data.rows import error_reason
from pipeline.data.sources import list_shard_versions
from pipeline.data.states import StateSpec
from pipeline.data.stored import SourceRead, read_source_file
from pipeline.distributed import plan
from pipeline.distributed.actor import RelabelContext
from pipeline.distributed.job import RunSummary, new_run_id, package_versions, start_ray
from pipeline.method.engine import Scorer
from pipeline.model.classes import ClassSet, load_class_set
from pipeline.model.loading import (check_weights, load_model, model_embed_dim, random_weights_note,
                                     random_weights_said_elsewhere)
from pipeline.storage import filesystem

log = logging.getLogger(__name__)
CHECKED_FILES = 3  # source files tried for a first readable row before Ray starts


@dataclass(frozen=True)
class SourceStates:
    """What a source output's manifest says its rows were encoded with, and what a relabel reads."""

    image: dict[str, Any]  # the manifest's image side: model, pretrained, N, alpha, beta, lambda_v, T, K, r, seed
    spec: StateSpec
    scoring: ScoringParams  # the source's image side with the relabel's text side
    read: SourceRead


def label_command(job: RelabelJob, image: dict[str, Any], method: str) -> str:
    """The ``lgca label`` command that labels the source's images with the relabel's settings."""
    flags = " ".join(f"--{key.replace('_', '-')} {image[key]}" for key in ("crops", "steps", "expand_top", "seed")
                     if key in image)
    return (f"lgca label --input <the source's inputs> --output {job.output} --classes {job.text.classes} "
            f"--model {image.get('model')} --pretrained {image.get('pretrained')} --method {method} {flags}")


def source_states(job: RelabelJob) -> SourceStates:
    """Read and check the source's manifest against the job; ConfigError says what to run instead."""
    manifest = Output(job.source, job.storage).read_manifest()
    if manifest is None:
        raise ConfigError(f"source: {job.source} has no _lgca/manifest.json: give the output of an lgca label run")
    form = manifest_form(manifest)
    image, states = form["image"], form.get("states")  # the source's text side plays no part
    if states is None and form.get("source"):
        raise ConfigError(f"source: {job.source} is an lgca relabel output, which keeps no image states; relabel "
                          f"its source {form['source']} instead")
    if states is None:
        raise ConfigError(f"source: {job.source} keeps no image states (labelled with --states none, or before "
                          f"lgca label kept them); label the images with these classes instead: "
                          f"{label_command(job, image, job.scoring.method)}")
    for given, stored, flag in ((job.model.name, image["model"], "model"),
                                (job.model.pretrained, image["pretrained"], "pretrained")):
        if given and given != stored:
            raise ConfigError(f"{flag}: {job.source} was encoded with {flag} {stored!r}, not {given!r}: its states "
                              f"are that model's embeddings; drop --{flag} (the source's is used)")
    spec = StateSpec.from_json(states)
    dim = model_embed_dim(image["model"])
    if dim != spec.dim:
        raise ConfigError(f"source: {job.source}'s manifest says its states hold {spec.dim} values per vector, but "
                          f"model {image['model']!r} embeds {dim}: the source was not written by that model; "
                          f"label the images again: {label_command(job, image, job.scoring.method)}")
    source_steps = max(spec.steps - 1, 0)  # T of the states kept (an lgca source's; 0 for others)
    steps = image["steps"] if job.scoring.steps < 0 else job.scoring.steps  # the source's T as configured
    method = job.scoring.method
    needed = {"lgca": steps + 1, "wca": 1}.get(method, 0)
    if needed > spec.steps:
        have = {0: "k_0 only (a clip/cupl run)", 1: "k_0 and p_0 only (a wca run)"}.get(
            spec.steps, f"p_0..p_{source_steps} (T = {source_steps})")
        raise ConfigError(f"method: {method} with T = {steps} needs {needed} pooled vectors per image, but "
                          f"{job.source} keeps {have}; relabel with a method and T it can give (clip, cupl"
                          f"{', wca' if spec.steps else ''}{f', lgca with --steps {source_steps} or less' if spec.steps > 1 else ''}), "
                          f"or label the images: {label_command(job, image, method)}")
    settings = {key: image[key] for key in ("crops", "alpha", "beta", "lambda_v", "expand_top", "expand_ratio",
                                            "seed")}
    scoring = ScoringParams(method=method, steps=steps, aggregation=job.scoring.aggregation,
                            lambda_t=job.scoring.lambda_t, top_k=job.scoring.top_k, **settings)
    read = SourceRead(spec, needed, steps if method == "lgca" else 0, image["expand_top"])
    return SourceStates(image, spec, scoring, read)


def check_first_file(job: RelabelJob, files: list[tuple[str, str | None]], source: SourceStates) -> None:
    """Read the first rows of the source's first readable data file: states of another length than
    the manifest says mean another model or a damaged source, refused before Ray starts. (An
    unreadable file, say a killed label run's partial write, is left to the run, which reports it.)"""
    if not files:
        raise ConfigError(f"source: no labels under {Output(job.source, job.storage).data}; run lgca label first")
    for uri, _ in files[:CHECKED_FILES]:
        fs, path = filesystem(uri, job.storage)
        try:
            first = next(read_source_file(fs, path, source.read), None)
        except (OSError, ValueError):  # ArrowInvalid is a ValueError
            continue
        wrong = [] if first is None else [e for e in first.column("error").to_pylist()
                                          if e and e.startswith("states: state_")]
        if wrong:
            raise ConfigError(f"source: {uri}: {wrong[0]} ({source.spec.dim} values of {source.spec.dtype} per "
                              "vector): the source is damaged or was not written by lgca label with its manifest; "
                              f"relabel another output, or label the images again: "
                              f"{label_command(job, source.image, job.scoring.method)}")
        return


@dataclass(frozen=True)
class Prepared:
    """The driver's checks of a relabel, done before anything is written or Ray starts."""

    source: SourceStates
    classes: ClassSet
    manifest: dict[str, Any]
    files: list[tuple[str, str | None]]  # every data file of the source, with its version


def prepare_relabel(job: RelabelJob) -> Prepared:
    """Check the source, its first file, the classes and the model's name and weights."""
    source = source_states(job)
    where = Output(job.source, job.storage)
    readable = {path.rsplit("/", 1)[-1] for path in readable_files(where)}  # less what a retry replaces
    files = [file for file in list_shard_versions(where.data, "parquet", job.storage)
             if file[0].rsplit("/", 1)[-1] in readable] if readable else []
    check_first_file(job, files, source)
    classes = load_class_set(job.text, job.storage)
    check_weights(job.model.config(source.image["model"], source.image["pretrained"]), job.storage)
    image = {**source.image, "steps": source.scoring.steps}  # p_0..p_T' are the states of a T'-step run
    manifest = make_manifest(image["model"], image["pretrained"], {**dataclasses.asdict(source.scoring), **image},
                             classes.digests(), None, source=job.source)
    return Prepared(source, classes, manifest, files)


def text_context(job: RelabelJob, prepared: Prepared, run_id: str) -> RelabelContext:
    """The shared scoring context: the text bank, built here from the model's text tower (the whole
    model is loaded, as open_clip builds it, but its image tower is never run; it is freed once
    the bank is built)."""
    image, clock = prepared.source.image, time.monotonic()
    with random_weights_said_elsewhere():  # said once below, as lgca label says it
        loaded = load_model(job.model.config(image["model"], image["pretrained"]), job.storage)
    if str(image["pretrained"]).lower() == "none":
        log.warning("%s", random_weights_note(loaded.name))
    bank = Scorer.for_classes(loaded, prepared.classes, prepared.source.scoring).bank
    log.info("text bank of %d classes from %s (%s) in %.1f s", len(prepared.classes.names), loaded.name,
             image["pretrained"], time.monotonic() - clock)
    return RelabelContext.of(bank, prepared.source.scoring, prepared.source.read, run_id)


def run_relabel_job(job: RelabelJob) -> RunSummary:
    """Score every source row not yet in the job's output; returns what was done."""
    started, clock = datetime.now(timezone.utc), time.monotonic()
    prepared = prepare_relabel(job)
    output = Output(job.output, job.storage)
    output.check_manifest(prepared.manifest, job.overwrite)
    lost: list[str] = []
    done = IdSet.empty() if job.overwrite else output.labelled_ids(lost)
    if len(done) and not lost:  # as lgca label: records are trusted only beside intact data
        read_whole = output.shards_read_whole()
    else:
        read_whole = IdSet.empty()
        if not job.overwrite:
            output.forget_shards()
    files = [f for f, seen in zip(prepared.files, read_whole.contains([shard_key(*f) for f in prepared.files]))
             if not seen]
    run_id = new_run_id()
    context = text_context(job, prepared, run_id) if files else None
    output.start(prepared.manifest, job.overwrite)
    marks = output.marks(run_id)
    try:
        if files:
            marks.create()
            start_ray(job)
            import ray

            dataset = plan.build_relabel(files, job, prepared.source.read, ray.put(context), done, marks)
            plan.write(dataset, output, job, run_id)
        own_lost: list[str] = []
        rows, errors = output.run_outcome(run_id, own_lost)
        unread = record_files(output, run_id, files, marks, record=not own_lost) if files else []
    finally:
        marks.remove()
    reasons = dict(Counter(error_reason(message) for message in errors))
    summary = RunSummary(run_id=run_id, output=job.output, ok=rows - len(errors), errors=len(errors), skipped=0,
                         seconds=time.monotonic() - clock, error_reasons=reasons,
                         skipped_shards=len(prepared.files) - len(files))
    output.write_run(run_id, relabel_record(job, prepared, summary, started, unread))
    for uri in unread:
        log.warning("source file %s could not be read to its end; its rows are scored by the next run", uri)
    return summary


def record_files(output: Output, run_id: str, files: list[tuple[str, str | None]], marks: ShardMarks,
                 record: bool) -> list[str]:
    """Record (when ``record``: no file of this run was lost) the source files this run read to
    their end, so that no later run reads them again; returns those it could not read to their
    end. Once the rows are written, a store error here is logged, not raised: unrecorded files
    are only read again next run."""
    try:
        whole = marks.marked([uri for uri, _ in files])
        if record:
            output.record_shards(run_id, [file for file, read in zip(files, whole) if read])
    except OSError as exc:
        log.warning("could not record the source files read whole (%s): the next run reads them again", exc)
        return []
    return [uri for (uri, _), read in zip(files, whole) if not read]


def relabel_record(job: RelabelJob, prepared: Prepared, summary: RunSummary, started: datetime,
                   unread: list[str]) -> dict[str, Any]:
    """The run's record: like ``lgca label``'s, with the source and the source files not read."""
    return {
        "run_id": summary.run_id, "name": job.name, "kind": "relabel", "source": job.source,
        "started_at": started.isoformat(), "finished_at": datetime.now(timezone.utc).isoformat(),
        "inputs": [job.source], "output": job.output, "model": prepared.source.image,
        "scoring": to_dict(prepared.source.scoring), "resources": to_dict(job.resources),
        "seed": prepared.source.scoring.seed, "classes": list(prepared.classes.names),
        "templates": list(prepared.classes.templates), "text_digests": prepared.classes.digests(),
        "versions": package_versions(),
        "counts": {"ok": summary.ok, "error": summary.errors, "skipped": 0,
                   "skipped_shards": summary.skipped_shards},
        "unread_source_files": unread, "error_reasons": summary.error_reasons, "seconds": summary.seconds,
        "images_per_second": summary.images_per_second,
    }
