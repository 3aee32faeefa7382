"""``lgca bench``: images per second of the engine alone and of the Ray pipeline, on one machine.

Engine: clip, wca and lgca on the same photos (scikit-image's samples as JPEG, decoded once
as the pipeline decodes them), in this process; lgca's encoder share from a timing wrapper on
``encode_image``, its crop share by cutting the engine's own crops again with ``cut_crops``.
Pipeline: ``run_label_job`` (lgca, same batch size) on the same JPEGs at 1x and 4x the images,
each in a fresh process with its own local Ray, so each peak RSS (driver: getrusage; model
actor: polled with psutil) is its own. docs/benchmarks.md explains every number.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import resource
import tempfile
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image

from pipeline.config import (ConfigError, InputConfig, LabelJob, ModelConfig, ResourceConfig, ScoringParams,
                             TextConfig)
from pipeline.data.decode import DecodeLimits, decode_image
from pipeline.distributed.bench_states import measure_states
from pipeline.method.boxes import full_view_box
from pipeline.method.crops import cut_crops, pad_batch
from pipeline.method.engine import BatchScores, Engine, ImageInput, crops_per_pass
from pipeline.model.classes import load_class_set
from pipeline.model.loading import LoadedModel, load_model
from pipeline.options import add_option_arguments, given_options

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera")
CLASSES = "astronaut,cat,coffee,rocket,galaxy,tissue,camera"  # one per photo; the default template
METHODS = ("clip", "wca", "lgca")
TARGET_SECONDS = 120.0  # what the default --images aims at for the whole bench
MAX_IMAGES, MAX_BATCH = 1024, 32
SIZES = (1, 4)  # pipeline runs at 1x and 4x the images
ACTOR_MARKER = "LabelActor"  # in the process title Ray gives the model actor's worker
POLL_SECONDS = 0.2
MEMORY_SPLIT_KNOWN = sys.platform.startswith("linux")  # psutil reports a process's shared pages on Linux only


@dataclass(frozen=True)
class BenchConfig:
    """What to measure; ``scoring.method`` is ignored (clip, wca and lgca are all timed)."""

    model: ModelConfig = ModelConfig(pretrained="none")
    scoring: ScoringParams = ScoringParams()
    images: int = 0  # images per engine measurement and 1x pipeline run; 0 = calibrate (~2 minutes)
    batch_size: int = 0  # images per engine call and per actor call; 0 = min(32, images)
    skip_pipeline: bool = False
    relabel_rows: int = 100_000  # source rows of the relabel and search measurements (the 1x run)
    skip_relabel: bool = False

    def __post_init__(self) -> None:
        if self.images < 0 or self.batch_size < 0:
            raise ConfigError("images, batch_size: must be positive (or 0 for the default)")
        if self.relabel_rows < 1:
            raise ConfigError(f"relabel_rows: must be at least 1, got {self.relabel_rows}")


@dataclass(frozen=True)
class Timing:
    """One method's engine run over all the images (seconds exclude model and text loading)."""

    seconds: float
    encode_seconds: float  # inside model.encode_image
    crop_seconds: float  # cutting the same crops again with cut_crops (lgca only, else 0)


@dataclass(frozen=True)
class PipelineRun:
    """One ``run_label_job`` run in its own process and local Ray."""

    images: int
    errors: int
    seconds: float  # run_label_job wall time (Ray start excluded, actor start included)
    driver_peak_rss_mb: float
    actor_peak_rss_mb: float | None  # resident set without shared pages (None off Linux, or no actor found)
    actor_peak_vmhwm_mb: float | None  # resident set with them: object-store and file-backed pages included
    actor_peak_shared_mb: float | None  # of which shared pages at most


class TimedModel:
    """Passes ``encode_image`` / ``encode_text`` to ``model``, adding up the time in ``encode_image``."""

    def __init__(self, model: Any, device: torch.device):
        self.model, self.device, self.seconds = model, device, 0.0

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        clock = time.perf_counter()
        out = self.model.encode_image(images)
        sync(self.device)
        self.seconds += time.perf_counter() - clock
        return out

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that clocks read around it measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def photo_jpegs() -> list[bytes]:
    """The scikit-image sample photos of PHOTOS as JPEG bytes (grayscale made RGB)."""
    try:
        from skimage import data
    except ImportError:
        raise ConfigError("lgca bench needs scikit-image for its photos: pip install scikit-image") from None
    out = []
    for name in PHOTOS:
        pixels = getattr(data, name)()
        pixels = np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def engine_images(jpegs: list[bytes], count: int, limits: DecodeLimits) -> list[ImageInput]:
    """``count`` images cycling through ``jpegs``, each JPEG decoded once."""
    decoded = [decode_image(blob, limits) for blob in jpegs]
    return [ImageInput(f"bench/{i:06d}.jpg", decoded[i % len(decoded)].pixels, decoded[i % len(decoded)].height,
                       decoded[i % len(decoded)].width) for i in range(count)]


def make_engine(model: Any, loaded: LoadedModel, params: ScoringParams) -> Engine:
    """An engine for the bench classes (CLASSES, default template) around ``model``."""
    classes = load_class_set(TextConfig(classes=CLASSES))
    return Engine.for_classes(replace(loaded, model=model), classes, params)


def crop_seconds(batch: list[ImageInput], scores: BatchScores, params: ScoringParams,
                 loaded: LoadedModel) -> float:
    """Time ``cut_crops`` on every crop the engine cut for ``batch``, in its encode chunks.

    The full view with the N step-0 boxes (one pass), then the K boxes expanded at each step.
    """
    device = loaded.device
    pixels = pad_batch([im.pixels for im in batch], [(im.height, im.width) for im in batch], device)
    full = torch.tensor(np.stack([full_view_box(im.height, im.width, loaded.preprocess.resize_mode)
                                  for im in batch]), dtype=torch.float32)[:, None]
    box_sets = [torch.cat([full, scores.boxes[0].float()], 1)] + [scores.expanded_boxes(t) for t in
                                                                  range(1, len(scores.boxes))]
    seconds, step = 0.0, crops_per_pass(params, device)
    for boxes in box_sets:
        flat = boxes.reshape(-1, 4).to(device)
        index = torch.arange(len(batch), device=device).repeat_interleave(boxes.shape[1])
        for start in range(0, len(flat), step):
            sync(device)
            clock = time.perf_counter()
            cut_crops(pixels, index[start:start + step], flat[start:start + step], loaded.preprocess, loaded.dtype)
            sync(device)
            seconds += time.perf_counter() - clock
    return seconds


def time_method(loaded: LoadedModel, params: ScoringParams, images: list[ImageInput], batch_size: int,
                shares: bool = False, kept: list[BatchScores] | None = None) -> Timing:
    """Score ``images`` in batches with ``params.method``; with ``shares``, also time the encoder
    (a wrapper that synchronises the GPU around each pass) and re-cut and time the crops; each
    batch's scores (with their image states) are appended to ``kept`` when given."""
    model = TimedModel(loaded.model, loaded.device) if shares else loaded.model
    engine = make_engine(model, loaded, params)
    total = crops = 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        sync(loaded.device)
        clock = time.perf_counter()
        scores = engine.score(batch)
        sync(loaded.device)
        total += time.perf_counter() - clock
        if shares:
            crops += crop_seconds(batch, scores, params, loaded)
        if kept is not None:
            kept.append(scores)
    return Timing(seconds=total, encode_seconds=model.seconds if shares else 0.0, crop_seconds=crops)


def calibrate(loaded: LoadedModel, params: ScoringParams, image: ImageInput, skip_pipeline: bool) -> int:
    """Images for a bench of about TARGET_SECONDS, from the time lgca takes on one image."""
    per_image = time_method(loaded, replace(params, method="lgca"), [image], 1).seconds
    inputs = {m: replace(params, method=m).encoder_inputs_per_image() for m in METHODS}
    passes = sum(inputs.values()) / inputs["lgca"] + (0 if skip_pipeline else sum(SIZES))
    return max(2, min(MAX_IMAGES, int(TARGET_SECONDS / (passes * per_image))))


def cpu_count() -> int:
    """CPUs this process may use (the affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class PeakRssPoller(threading.Thread):
    """Polls the memory of this process's descendants whose command line holds ``marker`` (psutil).

    Finding them lists every process on the machine (psutil reads each one's parent from
    /proc: a few ms of CPU with ~120 processes), so once a matching process is found the search
    runs only every ``SCAN_EVERY`` polls, and the processes found are read at every poll. A read
    is ``memory_info()``, one small file (/proc/<pid>/statm); ``memory_full_info()`` would make
    the kernel walk the process's whole address space (smaps), milliseconds for a model actor.
    The observer thus costs the measured run little.

    ``peak_kb``: the largest resident set seen (shared pages included), a polled peak like the
    kernel's ``VmHWM``. ``peak_own_kb``: the largest ``rss - shared`` seen: the process's own
    anonymous memory (heap, tensors), without the pages of Ray's object store (``/dev/shm``)
    that a worker maps while it reads its input blocks and without file-backed pages
    (libraries); ``peak_shared_kb``: the largest ``shared`` seen (those two kinds of pages).
    """

    SCAN_EVERY = 10  # polls between searches of the process tree (2 s at POLL_SECONDS)

    def __init__(self, marker: str):
        super().__init__(daemon=True)
        self.marker, self._done = marker, threading.Event()
        self.peak_kb = self.peak_own_kb = self.peak_shared_kb = 0
        self.processes: list[psutil.Process] = []  # the marked descendants the last search found
        self._polls = 0

    def run(self) -> None:
        while not self._done.wait(POLL_SECONDS):
            self.poll()

    def stop(self) -> None:
        self._done.set()
        self.join()

    def scan(self) -> None:
        """Find the descendants whose command line holds the marker (a worker's title is set
        when it takes the actor, so an early search may find none)."""
        found = []
        for process in psutil.Process().children(recursive=True):
            try:
                if self.marker in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.Error:  # it ended since the listing, or is not ours to read
                continue
        self.processes = found

    def poll(self) -> None:
        """Read the matching descendants' memory now and keep the largest values seen."""
        if not self.processes or self._polls % self.SCAN_EVERY == 0:
            self.scan()
        self._polls += 1
        for process in self.processes:
            try:
                memory = process.memory_info()
            except psutil.Error:  # the process ended
                continue
            self.peak_kb = max(self.peak_kb, memory.rss // 1024)
            self.peak_own_kb = max(self.peak_own_kb, (memory.rss - memory.shared) // 1024)
            self.peak_shared_kb = max(self.peak_shared_kb, memory.shared // 1024)


def run_pipeline_once(job: LabelJob, ray_cpus: int, ray_gpus: int) -> PipelineRun:
    """Run ``job`` on a local Ray started here; meant for a fresh process (stdout goes to stderr)."""
    os.dup2(2, 1)  # Ray's output must not mix with the parent's --json output
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from pipeline.distributed.job import run_label_job

    ray.init(address="local", num_cpus=ray_cpus, num_gpus=ray_gpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    poller = PeakRssPoller(ACTOR_MARKER)
    if MEMORY_SPLIT_KNOWN:
        poller.start()
    try:
        clock = time.perf_counter()
        summary = run_label_job(job)
        seconds = time.perf_counter() - clock
    finally:
        if poller.is_alive():
            poller.stop()
        ray.shutdown()
    return PipelineRun(images=summary.ok + summary.errors, errors=summary.errors, seconds=seconds,
                       driver_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                       actor_peak_rss_mb=poller.peak_own_kb / 1024 if poller.peak_kb else None,
                       actor_peak_vmhwm_mb=poller.peak_kb / 1024 if poller.peak_kb else None,
                       actor_peak_shared_mb=poller.peak_shared_kb / 1024 if poller.peak_kb else None)


def save_weights(model: torch.nn.Module, path: Path) -> str:
    """Save ``model``'s state_dict as a checkpoint file; returns its path.

    With ``--pretrained none`` the pipeline's actor loads the engine's random weights from
    this file, as a real run loads a checkpoint (random initialisation is no part of one),
    and scores with the very weights the engine was timed with.
    """
    torch.save(model.state_dict(), path)
    return str(path)


def run_pipeline(cfg: BenchConfig, loaded: LoadedModel, jpegs: list[bytes], count: int,
                 batch_size: int) -> tuple[list[PipelineRun], dict[str, Any]]:
    """The pipeline on the engine's ``count`` images repeated SIZES times, each size in a fresh process."""
    gpu = loaded.device.type == "cuda"
    setup = {"ray_num_cpus": cpu_count(), "ray_num_gpus": int(gpu),
             "cpus_per_actor": 1 if cpu_count() > 1 else 0.5,  # leaves a CPU for read/decode tasks
             "threads_per_actor": 0 if gpu else cpu_count(), "gpus_per_actor": int(gpu)}
    runs = []
    with tempfile.TemporaryDirectory(prefix="lgca-bench-") as temp:
        model = replace(cfg.model, device=str(loaded.device))
        setup["pipeline_pretrained"] = cfg.model.pretrained
        if cfg.model.pretrained.lower() == "none":
            model = replace(model, pretrained=save_weights(loaded.model, Path(temp) / "weights.pt"))
            setup["pipeline_pretrained"] = "the engine's random weights, from a checkpoint file"
        for size in SIZES:
            folder = Path(temp) / f"images-{size}x"
            folder.mkdir()
            for i in range(size * count):
                (folder / f"{i:06d}.jpg").write_bytes(jpegs[i % count % len(jpegs)])  # 1x set repeated
            job = LabelJob(inputs=InputConfig(uris=(str(folder),)), output=f"{temp}/labels-{size}x",
                           text=TextConfig(classes=CLASSES), model=model,
                           scoring=replace(cfg.scoring, method="lgca"), name="lgca-bench",
                           resources=ResourceConfig(cpus_per_actor=setup["cpus_per_actor"],
                                                    threads_per_actor=setup["threads_per_actor"],
                                                    gpus_per_actor=setup["gpus_per_actor"], batch_size=batch_size))
            with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs.append(pool.submit(run_pipeline_once, job, setup["ray_num_cpus"], setup["ray_num_gpus"]).result())
    return runs, setup


def pipeline_summary(runs: list[PipelineRun], engine_rate: float) -> dict[str, Any]:
    """Rates, ratios to the engine, and peak memory per size and its growth from 1x to 4x."""
    first, last = runs[0], runs[-1]
    rate = last.images / last.seconds
    slope = (last.seconds - first.seconds) / (last.images - first.images)
    peaks = {role: {f"{size}x": getattr(run, f"{role}_peak_rss_mb") for size, run in zip(SIZES, runs)}
             for role in ("driver", "actor")}
    growth = {role: (values[f"{SIZES[-1]}x"] / values["1x"] if all(values.values()) else None)
              for role, values in peaks.items()}
    return {"pipeline_images_per_s": rate, "pipeline_over_engine": rate / engine_rate,
            "pipeline_marginal_images_per_s": 1 / slope if slope > 0 else None,
            "pipeline_over_engine_marginal": 1 / slope / engine_rate if slope > 0 else None,
            "pipeline_runs": [asdict(run) for run in runs], "peak_rss_mb": peaks, "peak_rss_growth": growth}


def targets(result: dict[str, Any]) -> dict[str, bool | None]:
    """Whether each target of docs/benchmarks.md is met (None when not measured)."""
    growth = [g for g in (result["peak_rss_growth"] or {}).values() if g is not None]
    pipeline = result["pipeline_over_engine"]
    return {"lgca_over_wca_within_5pct_of_floor":
            abs(result["lgca_over_wca_time"] / result["lgca_over_wca_floor"] - 1) <= 0.05,
            "crop_time_share_under_5pct": result["crop_time_share"] < 0.05,
            "pipeline_over_engine_at_least_0.85": None if pipeline is None else pipeline >= 0.85,
            "peak_rss_flat_within_10pct": max(growth) <= 1.10 if len(growth) == 2 else None,
            **states_targets(result)}


def states_targets(result: dict[str, Any]) -> dict[str, bool | None]:
    """The relabel and search targets of docs/benchmarks.md (None when not measured)."""
    relabel, search = result.get("relabel_images_per_s"), result.get("search_states_per_s")
    marginal = relabel and relabel["end_to_end_marginal"]
    return {"relabel_scoring_at_least_20000_per_s": relabel["scoring"] >= 20_000 if relabel else None,
            "relabel_end_to_end_marginal_at_least_5000_per_s": None if not marginal else marginal >= 5_000,
            "relabel_over_label_above_10000": None if not marginal else result["relabel_over_label"] > 10_000,
            "search_at_least_1000000_states_per_s": search["full"] >= 1_000_000 if search else None}


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure the engine (and, unless skipped, the pipeline); returns the JSON report."""
    loaded = load_model(cfg.model)
    limits = DecodeLimits.for_model(loaded.preprocess.image_size, cfg.scoring)
    jpegs = photo_jpegs()
    time_method(loaded, replace(cfg.scoring, method="clip"), engine_images(jpegs, 1, limits), 1)  # warm-up
    count = cfg.images or calibrate(loaded, cfg.scoring, engine_images(jpegs, 1, limits)[0], cfg.skip_pipeline)
    batch_size = cfg.batch_size or min(MAX_BATCH, count)
    images = engine_images(jpegs, count, limits)
    gpu = loaded.device.type == "cuda"  # on a GPU the shares' synchronisation would slow the rate
    kept: list[BatchScores] = []  # lgca's states of the bench images, for the relabel and search figures
    timing = {m: time_method(loaded, replace(cfg.scoring, method=m), images, batch_size,
                             shares=m == "lgca" and not gpu, kept=kept if m == "lgca" else None) for m in METHODS}
    lgca, params = timing["lgca"], cfg.scoring
    if gpu:
        lgca = time_method(loaded, replace(params, method="lgca"), images, batch_size, shares=True)
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": loaded.name,
        "pretrained": cfg.model.pretrained, "device": str(loaded.device), "precision": cfg.model.precision,
        "cpu_count": cpu_count(), "torch_threads": torch.get_num_threads(), "images": count,
        "batch_size": batch_size, "crops": params.crops, "steps": params.steps, "expand_top": params.expand_top,
        "engine_images_per_s": {m: count / t.seconds for m, t in timing.items()},
        "engine_seconds": {m: t.seconds for m, t in timing.items()},
        "crop_time_share": min(1.0, lgca.crop_seconds / lgca.seconds),
        "encoder_time_share": min(1.0, lgca.encode_seconds / lgca.seconds),
        "lgca_over_wca_time": timing["lgca"].seconds / timing["wca"].seconds,
        "lgca_over_wca_floor": (1 + params.crops + params.steps * params.expand_top) / (1 + params.crops),
        "pipeline_images_per_s": None, "pipeline_over_engine": None, "peak_rss_mb": None, "peak_rss_growth": None,
    }
    if not cfg.skip_pipeline:
        runs, setup = run_pipeline(cfg, loaded, jpegs, count, batch_size)
        result.update(pipeline_summary(runs, result["engine_images_per_s"]["lgca"]), pipeline_setup=setup)
    if not cfg.skip_relabel:
        with tempfile.TemporaryDirectory(prefix="lgca-bench-states-") as temp:
            result.update(measure_states(loaded, cfg.model, cfg.scoring, kept, CLASSES.split(","), cfg.relabel_rows,
                                         Path(temp), cpu_count(), result["engine_images_per_s"]["lgca"]))
    result["targets"] = targets(result)
    return result


def _number(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def format_table(result: dict[str, Any]) -> str:
    """The report as readable text."""
    lines = [f"lgca bench {result['date']}: {result['model']} (pretrained {result['pretrained']}) on "
             f"{result['device']} {result['precision']}, {result['torch_threads']} torch threads; {result['images']} "
             f"images, batch {result['batch_size']}; N={result['crops']} T={result['steps']} K={result['expand_top']}",
             "engine images/s: " + ", ".join(f"{m} {_number(r)}" for m, r in result["engine_images_per_s"].items()),
             f"lgca time shares: crops {result['crop_time_share']:.1%}, encoder {result['encoder_time_share']:.1%}",
             f"lgca / wca time: {result['lgca_over_wca_time']:.3f} (floor {result['lgca_over_wca_floor']:.3f})"]
    if result["pipeline_images_per_s"] is not None:
        runs = ", ".join(f"{run['images']} images {_number(run['images'] / run['seconds'])}/s"
                         for run in result["pipeline_runs"])
        lines.append(f"pipeline: {runs}; over engine {_number(result['pipeline_over_engine'])} "
                     f"(marginal {_number(result['pipeline_over_engine_marginal'])})")
        lines += [f"peak RSS MB, {role}: " + " -> ".join(_number(mb, 4) for mb in sizes.values())
                  + f" (growth {_number(result['peak_rss_growth'][role])})"
                  for role, sizes in result["peak_rss_mb"].items()]
    if result.get("relabel_images_per_s"):
        relabel = result["relabel_images_per_s"]
        lines += [f"relabel, {result['relabel_classes']} classes, images/s: scoring {_number(relabel['scoring'])}, "
                  f"end to end {_number(relabel['end_to_end'])} (marginal {_number(relabel['end_to_end_marginal'])}, "
                  f"fixed start-up {_number(result['relabel_fixed_startup_s'])} s); over label "
                  f"{_number(result['relabel_over_label'])}",
                  "search states/s: " + ", ".join(f"{v} {_number(r)}" for v, r in result["search_states_per_s"].items())]
    lines += [f"target {name}: {'n/a' if met is None else 'met' if met else 'NOT met'}"
              for name, met in result["targets"].items()]
    return "\n".join(lines) + "\n"


FLAGS = ("model", "pretrained", "crops", "steps", "expand-top", "batch-size", "device", "precision")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of parsed ``lgca bench`` arguments."""
    model = ModelConfig(name=args.model, pretrained=args.pretrained, device=args.device, precision=args.precision)
    scoring = ScoringParams(**given_options(args, ("crops", "steps", "expand-top"))["scoring"])
    return BenchConfig(model=model, scoring=scoring, images=args.images, batch_size=args.batch_size,
                       skip_pipeline=args.skip_pipeline, relabel_rows=args.relabel_rows, skip_relabel=args.skip_relabel)


def _handle(args: argparse.Namespace) -> int:
    """Run ``lgca bench``: print the report as JSON (--json) or as a table."""
    result = run_bench(config_from_args(args))
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand to the ``lgca`` command line."""
    parser = commands.add_parser("bench", help="images/s of the engine alone and of the Ray pipeline")
    add_option_arguments(parser, FLAGS)
    parser.set_defaults(model="ViT-B-32", pretrained="none", device="auto", precision="fp32", batch_size=0)
    parser.add_argument("--images", type=int, default=0,
                        help=f"images per measurement (default: calibrated for about {TARGET_SECONDS:.0f} s)")
    parser.add_argument("--skip-pipeline", action="store_true", help="measure the engine only")
    parser.add_argument("--relabel-rows", type=int, default=100_000,
                        help="source rows for the relabel and search figures (default: 100000; and 4x as many)")
    parser.add_argument("--skip-relabel", action="store_true", help="leave out the relabel and search figures")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_handle)
