"""The image-state measurements of ``lgca bench``: relabel and search over the bench's own states.

The bench's lgca states (its photos, encoded by the engine it timed) are written as an ``lgca
label`` output (float16 states, files of 4096 rows as a GPU label run writes them), repeated
under distinct ids to ``rows`` rows, and to four times as many. Then, against 1,000 classes
(``class 0000`` .. ``class 0999``, the default template):

- relabel scoring alone: :func:`~pipeline.distributed.actor.score_source_rows` on the source's
  rows in memory, in this process (the text bank built before the clock starts);
- relabel end to end: :func:`~pipeline.distributed.relabel.run_relabel_job` at both sizes, each
  in a fresh process with its own local Ray (Ray's start excluded, as for the label pipeline);
  the marginal rate from the two times, and the fixed start-up (listing, the text bank of 1,000
  classes, workers' start) apart;
- search: :func:`~pipeline.data.stored.search_files` over the smaller source, ``k_0`` and lgca.

docs/benchmarks.md explains every number.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import (ModelConfig, RelabelJob, RelabelModel, RelabelResources, ScoringParams, StorageConfig,
                             TextConfig)
from pipeline.data.output import Output, make_manifest
from pipeline.data.rows import parquet_options, scored_table
from pipeline.data.states import StateSpec, steps_for
from pipeline.data.stored import SourceRead, read_source_file, search_files
from pipeline.method.engine import BatchScores, Scorer
from pipeline.model.classes import load_class_set

RELABEL_CLASSES = 1000
SOURCE_FILE_ROWS = 4096  # rows per source data file, as a GPU label run writes them
SIZES = (1, 4)  # relabel end to end at `rows` and four times as many (as the label pipeline: 1x, 4x)
STATE_DTYPE = "float16"


def write_source(folder: Path, rows: pa.Table, count: int, manifest: dict[str, Any]) -> list[str]:
    """An lgca label output of ``count`` rows: ``rows`` repeated under distinct ids."""
    (folder / "data").mkdir(parents=True)
    paths = []
    for start in range(0, count, SOURCE_FILE_ROWS):
        index = np.arange(start, min(start + SOURCE_FILE_ROWS, count))
        part = rows.take(pa.array(index % rows.num_rows))
        ids = pa.array([f"bench/{i:08d}.jpg" for i in index])
        part = part.set_column(0, "id", ids).set_column(1, "uri", ids)
        paths.append(str(folder / "data" / f"20260101T000000Z-bench0_w_{start // SOURCE_FILE_ROWS:06d}-0.parquet"))
        pq.write_table(part, paths[-1], **parquet_options())
    Output(str(folder)).start(manifest, overwrite=False)
    return paths


def source_rows(scores: Sequence[BatchScores], names: Sequence[str], params: ScoringParams) -> pa.Table:
    """The bench images' rows, as lgca label writes them (float16 states)."""
    tables = []
    for batch in scores:
        count = len(batch.clip)
        ids = [f"bench/{i:06d}.jpg" for i in range(count)]
        tables.append(scored_table(ids, ids, [0] * count, [0] * count, batch, names, "lgca", params.top_k, "bench",
                                   STATE_DTYPE))
    return pa.concat_tables(tables)


def time_scoring(paths: Sequence[str], scorer: Scorer, read: SourceRead, batch_rows: int) -> tuple[float, int]:
    """Seconds of :func:`score_source_rows` on every row of ``paths`` (read before the clock)."""
    from pipeline.distributed.actor import RelabelContext, score_source_rows

    fs = fsspec.filesystem("file")
    tables = [table for path in paths for table in read_source_file(fs, path, read)]
    batches = pa.concat_tables(tables).to_batches(max_chunksize=batch_rows)
    context = RelabelContext.of(scorer.bank, scorer.params, read, "bench")
    clock, rows = time.perf_counter(), 0
    for batch in batches:
        rows += score_source_rows(pa.Table.from_batches([batch]), context).num_rows
    return time.perf_counter() - clock, rows


def run_relabel_once(job: RelabelJob, ray_cpus: int) -> tuple[float, float]:
    """Seconds of ``run_relabel_job(job)`` on a local Ray started here (meant for a fresh process),
    and of the text bank it built (timed by a wrapper, as the engine's encoder is)."""
    os.dup2(2, 1)  # Ray's output must not mix with the parent's --json output
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from pipeline.distributed import relabel

    built = relabel.text_context
    bank = []

    def timed(*args: Any) -> Any:
        clock = time.perf_counter()
        context = built(*args)
        bank.append(time.perf_counter() - clock)
        return context

    relabel.text_context = timed
    ray.init(address="local", num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        clock = time.perf_counter()
        relabel.run_relabel_job(job)
        return time.perf_counter() - clock, sum(bank)
    finally:
        ray.shutdown()


SEARCH_REPEATS = 3


def time_search(paths: Sequence[str], spec: StateSpec, weights: np.ndarray | None, dim: int) -> tuple[float, int]:
    """Seconds and rows of the fastest of SEARCH_REPEATS searches of ``paths`` for a random query
    (the files in the page cache: single searches vary by 2x on a machine that is still
    settling after the relabel runs' Ray)."""
    query = torch.nn.functional.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(0)), dim=0)
    best, searched = float("inf"), 0
    for _ in range(SEARCH_REPEATS):
        clock = time.perf_counter()
        searched = search_files(fsspec.filesystem("file"), paths, query.numpy(), spec, weights, 10).searched
        best = min(best, time.perf_counter() - clock)
    return best, searched


def measure_states(loaded: Any, model: ModelConfig, params: ScoringParams, scores: Sequence[BatchScores],
                   names: Sequence[str], rows: int, temp: Path, ray_cpus: int, label_rate: float) -> dict[str, Any]:
    """The relabel and search figures of the bench (see the module docstring)."""
    params = dataclasses.replace(params, method="lgca")
    dim = scores[0].states.full.shape[1]
    spec = StateSpec(STATE_DTYPE, dim, steps_for("lgca", params.steps))
    (temp / "classes.txt").write_text("\n".join(f"class {i:04d}" for i in range(RELABEL_CLASSES)) + "\n")
    text = TextConfig(classes=str(temp / "classes.txt"))
    classes = load_class_set(text)
    clock = time.perf_counter()
    scorer = Scorer.for_classes(loaded, classes, params)
    bank_seconds = time.perf_counter() - clock
    manifest = make_manifest(model.name, model.pretrained, dataclasses.asdict(params),
                             load_class_set(TextConfig(classes=",".join(names))).digests(), spec.to_json())
    table = source_rows(scores, names, params)
    sources = {size: write_source(temp / f"source-{size}x", table, size * rows, manifest) for size in SIZES}
    read = SourceRead(spec, params.steps + 1, params.steps, params.expand_top)
    scoring_seconds, scored = time_scoring(sources[1], scorer, read, RelabelResources().batch_size)
    runs = {}
    for size in SIZES:
        job = RelabelJob(source=str(temp / f"source-{size}x"), output=str(temp / f"relabel-{size}x"), text=text,
                         model=RelabelModel(device="cpu"), storage=StorageConfig(), name="lgca-bench-relabel")
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs[size] = pool.submit(run_relabel_once, job, ray_cpus).result()
    # the text bank's time varies from run to run by more than scoring the extra rows takes on a
    # busy machine: the marginal rate comes from the times without it
    slope = ((runs[SIZES[-1]][0] - runs[SIZES[-1]][1]) - (runs[SIZES[0]][0] - runs[SIZES[0]][1])) / (
        (SIZES[-1] - SIZES[0]) * rows)
    marginal = 1 / slope if slope > 0 else None
    searches = {"full": time_search(sources[1], spec, None, dim),
                "lgca": time_search(sources[1], spec, np.full(spec.steps, 1 / spec.steps, np.float32), dim)}
    return {"relabel_classes": RELABEL_CLASSES, "relabel_rows": {f"{s}x": s * rows for s in SIZES},
            "relabel_text_bank_s": bank_seconds,
            "relabel_images_per_s": {"scoring": scored / scoring_seconds, "end_to_end_marginal": marginal,
                                     "end_to_end": SIZES[-1] * rows / runs[SIZES[-1]][0]},
            "relabel_seconds": {f"{s}x": total for s, (total, _) in runs.items()},
            "relabel_run_text_bank_s": {f"{s}x": bank for s, (_, bank) in runs.items()},
            "relabel_fixed_startup_s": runs[SIZES[0]][0] - rows / marginal if marginal else None,
            "relabel_over_label": marginal / label_rate if marginal else None,
            "relabel_scoring_over_label": scored / scoring_seconds / label_rate,
            "source_bytes_per_row": sum(os.path.getsize(p) for p in sources[1]) / rows,
            "search_states_per_s": {vector: count / seconds for vector, (seconds, count) in searches.items()}}
