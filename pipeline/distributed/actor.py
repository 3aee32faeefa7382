"""The Ray Data UDFs that score: :class:`LabelActor` owns a model (loads it and encodes the text
once, then scores batches of images); :func:`score_source_rows` scores a relabel's source rows
(stored image states) with a text bank the driver built once.

Ray-agnostic in code (a plain callable class and a function); :mod:`pipeline.distributed.plan`
runs them. Every input row yields exactly one output row: images that were not decoded, or
whose scoring failed, and source rows without usable states become ``status='error'`` rows.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import ModelConfig, ScoringParams, StatesConfig, StorageConfig
from pipeline.data.decode import OUTPUT_COLUMNS, error_message, pixels_array
from pipeline.data.rows import SCHEMA, error_table, scored_table
from pipeline.data.states import as_float32, decode_column
from pipeline.data.stored import SourceRead
from pipeline.method.engine import Engine, ImageInput, ImageStates, Scorer, score_apart
from pipeline.method.textbank import TextBank
from pipeline.model.classes import ClassSet
from pipeline.model.loading import load_model

log = logging.getLogger(__name__)
# Source rows scored at a time. With ViT-B-32's 512 values, T = 3 and 1,000 classes, a call's
# tensors stay under glibc's 32 MB mmap threshold (4096 rows took 10 % longer on 2 cores: each
# larger tensor is mapped, faulted in page by page and unmapped again).
SCORE_ROWS = 512


def _column(batch: dict[str, Any], name: str) -> list:
    values = batch[name]
    return values.tolist() if hasattr(values, "tolist") else list(values)


def worker_logging() -> None:
    """Show this package's INFO messages in a Ray worker, whose root logger has no handler
    (in the driver the CLI has configured logging already)."""
    logger = logging.getLogger("pipeline")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # a root handler added later (by a library) would print it twice


class LabelActor:
    """Holds one model and its :class:`~pipeline.method.engine.Engine` for the actor's lifetime."""

    def __init__(self, model: ModelConfig, classes: ClassSet, scoring: ScoringParams,
                 storage: StorageConfig, run_id: str, batch_size: int, threads: int = 0,
                 states: StatesConfig = StatesConfig()):
        worker_logging()
        if threads:  # else torch keeps Ray's OMP_NUM_THREADS, the actor's CPU reservation
            torch.set_num_threads(threads)
        clock = time.monotonic()
        loaded = load_model(model, storage)
        loaded_at = time.monotonic()
        self.names = classes.names
        self.scoring = scoring
        self.run_id = run_id
        self.batch_size = batch_size  # images per engine call, whatever size the blocks arriving here
        self.state_dtype = states.dtype if states.kept else ""  # '': the rows keep no states
        self.engine = Engine.for_classes(loaded, classes, scoring)
        log.info("model %s (%s) on %s in %s loaded in %.1f s; text bank of %d classes in %.1f s",
                 loaded.name, model.pretrained, loaded.device, model.precision, loaded_at - clock,
                 len(classes.names), time.monotonic() - loaded_at)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        """Score the decoded rows of ``batch``; returns one output row per input row."""
        rows = {name: _column(batch, name) for name in OUTPUT_COLUMNS}
        errors = [error_message(value) for value in rows["error"]]
        good = [i for i, error in enumerate(errors) if error is None]
        bad = [i for i, error in enumerate(errors) if error is not None]
        tables = [self._score(rows, good[start:start + self.batch_size])
                  for start in range(0, len(good), self.batch_size)]
        if bad:
            tables.append(self._errors(rows, bad, [errors[i] for i in bad]))
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table()

    def _score(self, rows: dict[str, list], index: list[int]) -> pa.Table:
        """Score rows ``index`` together; if the batch fails, one by one (:func:`score_apart`)."""
        images = [ImageInput(rows["id"][i], pixels_array(rows["pixels"][i], rows["work_h"][i], rows["work_w"][i]),
                             rows["height"][i], rows["width"][i]) for i in index]
        tables = []
        for members, scores, error in score_apart(self.engine.score, images):
            picked = [index[m] for m in members]
            if error is not None:
                tables.append(self._errors(rows, picked, [error]))
                continue
            tables.append(scored_table([rows["id"][i] for i in picked], [rows["uri"][i] for i in picked],
                                       [rows["width"][i] for i in picked], [rows["height"][i] for i in picked],
                                       scores, self.names, self.scoring.method, self.scoring.top_k, self.run_id,
                                       self.state_dtype))
        return pa.concat_tables(tables)

    def _errors(self, rows: dict[str, list], index: list[int], errors: list[str]) -> pa.Table:
        return error_table([rows["id"][i] for i in index], [rows["uri"][i] for i in index], errors,
                           [rows["width"][i] for i in index], [rows["height"][i] for i in index], self.run_id)


@dataclass(frozen=True)
class RelabelContext:
    """What every relabel scoring task shares (put once in Ray's object store by the driver):
    the text bank's ``[C, D]`` matrices as float32 arrays (read in place), the class names,
    the scoring parameters (the source's image side with the relabel's text side), the stored
    states' layout, and the run id."""

    names: tuple[str, ...]
    anchors: np.ndarray
    cupl: np.ndarray
    vectors: np.ndarray
    scoring: ScoringParams
    read: SourceRead
    run_id: str

    @classmethod
    def of(cls, bank: TextBank, scoring: ScoringParams, read: SourceRead, run_id: str) -> RelabelContext:
        return cls(bank.names, *(t.cpu().numpy() for t in (bank.anchors, bank.cupl, bank.vectors)), scoring, read,
                   run_id)

    def scorer(self) -> Scorer:
        """The :class:`Scorer` of this context (its tensors are views of the shared arrays)."""
        matrices = [as_float32(m) for m in (self.anchors, self.cupl, self.vectors)]
        empty = torch.zeros(0)
        return Scorer(TextBank(self.names, *matrices, owner=empty, weights=empty), self.scoring)


def score_source_rows(batch: pa.Table, context: RelabelContext) -> pa.Table:
    """Score a batch of source rows (:data:`pipeline.data.stored.SOURCE_SCHEMA`) with the
    context's text side: one output row per input row, error rows for the rows that carry an
    error (the source's own, or why their states cannot be used)."""
    errors = batch.column("error").to_numpy(zero_copy_only=False)
    failed = ~np.equal(errors, None)
    tables = []
    if not failed.all():
        scorable = batch.filter(pa.array(~failed)) if failed.any() else batch
        tables += [_score_states(scorable.slice(start, SCORE_ROWS), context)
                   for start in range(0, scorable.num_rows, SCORE_ROWS)]
    if failed.any():
        bad = batch.filter(pa.array(failed))
        tables.append(error_table(*(bad.column(name).to_pylist() for name in ("id", "uri", "error", "width",
                                                                              "height")), context.run_id))
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def _score_states(batch: pa.Table, context: RelabelContext) -> pa.Table:
    """Scored rows of source rows that all hold usable states."""
    read, count = context.read, batch.num_rows
    spec, scorer = read.spec, context.scorer()

    def values(name: str, per_row: int, dtype: str) -> np.ndarray:
        decoded = decode_column(batch.column(name), per_row, dtype)
        if len(decoded.rows) != count:  # the read task passes only rows it checked
            raise ValueError(f"{name}: {count - len(decoded.rows)} of {count} rows hold no usable values")
        return decoded.values

    full = as_float32(values("state_full", spec.dim, spec.dtype))
    pooled = grown = None
    if read.pooled:
        steps = as_float32(values("state_steps", spec.steps * spec.dim, spec.dtype)).view(count, spec.steps, -1)
        pooled = steps[:, :read.pooled].permute(1, 0, 2).contiguous()
    if read.steps:
        boxes = as_float32(values("grown", read.steps * read.expand_top * 4, "float32"))
        grown = boxes.view(count, read.steps, read.expand_top, 4).permute(1, 0, 2, 3)
    scores = scorer.score(ImageStates(full=full, pooled=pooled, grown=grown))
    columns = {name: batch.column(name).to_pylist() for name in ("id", "uri", "width", "height")}
    return scored_table(columns["id"], columns["uri"], columns["width"], columns["height"], scores, context.names,
                        context.scoring.method, context.scoring.top_k, context.run_id)
