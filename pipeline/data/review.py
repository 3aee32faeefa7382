"""What ``lgca report`` and ``lgca export`` share: the rows selected for review, and what they
were scored with.

The selection is DuckDB's view ``selected`` over ``labels`` (:mod:`pipeline.data.labels`):
the rows matching ``--where``, and with ``--review-band LOW,HIGH`` only ok rows whose margin
lies in the band. The provenance (model, weights, method, class names) comes from the
output's manifest and run records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import duckdb

from pipeline.config import QueryError, StorageConfig
from pipeline.data.labels import LABELS_VIEW
from pipeline.data.output import Output, manifest_form

SELECTED_VIEW = "selected"


@dataclass(frozen=True)
class Band:
    """An inclusive range of margins: ``low <= margin <= high``."""

    low: float
    high: float

    @classmethod
    def parse(cls, text: str) -> Band:
        """``"LOW,HIGH"`` (two numbers, LOW <= HIGH) -> Band; anything else is a QueryError."""
        parts = text.split(",")
        try:
            low, high = (float(part) for part in parts) if len(parts) == 2 else (math.nan, math.nan)
        except ValueError:
            low = high = math.nan
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise QueryError(f"--review-band {text!r}: give two numbers LOW,HIGH with LOW <= HIGH, "
                             "e.g. --review-band 0,0.02 (margins are top-1 minus top-2 score)")
        return cls(low, high)

    def sql(self) -> str:
        return f"(status = 'ok' AND margin BETWEEN {self.low!r} AND {self.high!r})"


def select_rows(con: duckdb.DuckDBPyConnection, where: str = "", band: Band | None = None) -> None:
    """Create the view SELECTED_VIEW: the rows of ``labels`` matching the SQL condition ``where``
    (any DuckDB expression over its columns) and, when given, the margin ``band``."""
    conditions = ([f"({where})"] if where.strip() else []) + ([band.sql()] if band else [])
    condition = " AND ".join(conditions) or "true"
    try:
        con.execute(f"CREATE OR REPLACE VIEW {SELECTED_VIEW} AS SELECT * FROM {LABELS_VIEW} WHERE {condition}")
        con.execute(f"SELECT count(*) FROM (SELECT * FROM {SELECTED_VIEW} LIMIT 0)")  # binds the columns now
    except duckdb.Error as exc:
        raise QueryError(f"--where {where!r}: {exc}") from None


@dataclass(frozen=True)
class Provenance:
    """What an output's labels were scored with (None where no record says)."""

    model: str | None
    pretrained: str | None
    method: str | None
    classes: tuple[str, ...]  # every class name of the latest run; empty without a run record

    def model_version(self) -> str:
        """One line naming model, weights and method, e.g. ``ViT-B-32 (openai), lgca``."""
        return f"{self.model or 'unknown model'} ({self.pretrained or 'unknown weights'}), {self.method or 'unknown method'}"


def provenance(output: str, storage: StorageConfig, runs: list[dict[str, Any]] | None = None) -> Provenance:
    """The output's model, weights and method from its manifest (else its latest run record),
    and the class names of its latest run record. ``runs`` saves reading the records again."""
    manifest = manifest_form(Output(output, storage).read_manifest() or {})
    image, text = manifest.get("image") or {}, manifest.get("text") or {}
    runs = Output(output, storage).runs() if runs is None else runs
    latest = runs[-1] if runs else {}
    model = latest.get("model") or {}
    return Provenance(model=image.get("model", model.get("name")),
                      pretrained=image.get("pretrained", model.get("pretrained")),
                      method=text.get("method") or latest.get("scoring", {}).get("method"),
                      classes=tuple(latest.get("classes") or ()))
