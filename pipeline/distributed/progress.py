"""A label run's progress: images done of the total, images/s and an ETA, shown by the driver.

Ray Data's ``write`` tells the driver nothing until it ends, so the counts come from a small
Ray actor, :class:`Counter` (it reserves no CPU): the model actors add the rows each call
labelled, the read tasks the rows each tar or Parquet shard held (loose files are counted on
the driver before the run). Each report is one actor call that nothing waits for. The driver
asks the counter for its numbers every second: on a terminal it draws them as a bar on
stderr, otherwise it logs them as one line every LOG_SECONDS.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

import ray

log = logging.getLogger(__name__)

BAR_SECONDS = 1.0  # how often the bar is redrawn on a terminal
LOG_SECONDS = 30.0  # how often a progress line is logged elsewhere
BAR_WIDTH = 24
ASK_TIMEOUT = 10.0  # seconds the driver waits for the counter's numbers before skipping a report


class Counter:
    """Counts of one run, kept by a Ray actor (see :func:`start_counter`)."""

    def __init__(self) -> None:
        self.labelled = 0  # rows the model actors returned (ok and error rows)
        self.found = 0  # rows read from tar and Parquet shards, not yet labelled ones
        self.shards_read = 0  # shards read to their end (or broken off)

    def add(self, labelled: int = 0, found: int = 0, shards_read: int = 0) -> None:
        self.labelled += labelled
        self.found += found
        self.shards_read += shards_read

    def counts(self) -> tuple[int, int, int]:
        return self.labelled, self.found, self.shards_read


class CountedLabelActor:
    """A :class:`~pipeline.distributed.actor.LabelActor` that adds each call's rows to the run's
    :class:`Counter` (the actor class is imported here, in the model actor, not by read tasks)."""

    def __init__(self, progress: ray.actor.ActorHandle | None, **label_actor_kwargs: Any) -> None:
        from pipeline.distributed.actor import LabelActor
        from pipeline.model.loading import random_weights_said_elsewhere

        with random_weights_said_elsewhere():  # the driver said it once for the whole run
            self.actor = LabelActor(**label_actor_kwargs)
        self.progress = progress

    def __call__(self, batch: dict[str, Any]) -> Any:
        table = self.actor(batch)
        if self.progress is not None:
            self.progress.add.remote(labelled=table.num_rows)  # not waited for
        return table


def start_counter() -> ray.actor.ActorHandle:
    """The run's :class:`Counter` actor: no CPU reserved, so it never waits for one."""
    return ray.remote(num_cpus=0)(Counter).remote()


@dataclass(frozen=True)
class Tally:
    """What a run has done so far, against what it knows it has to do."""

    labelled: int  # images labelled (ok and error rows)
    files: int  # loose image files to label, known before the run
    found: int  # rows found so far in the shards read
    shards_read: int
    shards: int  # tar and Parquet shards to read

    @property
    def total(self) -> int:
        """The images to label: exact once every shard is read; until then the loose files plus the
        shard rows found, with the unread shards guessed at the mean of the shards read so far."""
        if self.shards_read >= self.shards or self.shards_read == 0:
            return self.files + self.found
        return self.files + round(self.found * self.shards / self.shards_read)

    @property
    def exact(self) -> bool:
        return self.shards_read >= self.shards


def clock_text(seconds: float) -> str:
    """``H:MM:SS``."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class Rate:
    """Images/s since the first images were labelled: the start-up (Ray, model loading) is not
    counted, so the ETA is the labelling still to come."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.first: tuple[float, int] | None = None  # (time, images) of the first report with images

    def update(self, labelled: int) -> float | None:
        """The rate with ``labelled`` images done now; None until two reports with images apart."""
        now = self.clock()
        if self.first is None:
            if labelled > 0:
                self.first = (now, labelled)
            return None
        seconds, images = now - self.first[0], labelled - self.first[1]
        return images / seconds if seconds > 0 and images > 0 else None


def progress_text(tally: Tally, rate: float | None, elapsed: float) -> str:
    """``12/40 images (30%), 2.3 images/s, 0:00:20 elapsed, ETA 0:00:12``; shards read so far and a
    ``~`` on the total while some are unread."""
    total = max(tally.total, tally.labelled)
    share = f" ({100 * tally.labelled / total:.0f}%)" if total else ""
    shards = f", {tally.shards_read}/{tally.shards} shards read" if tally.shards else ""
    speed = f", {rate:.2f} images/s" if rate else ""
    eta = f", ETA {clock_text((total - tally.labelled) / rate)}" if rate else ""
    return (f"{tally.labelled}/{'' if tally.exact else '~'}{total} images{share}{shards}{speed}, "
            f"{clock_text(elapsed)} elapsed{eta}")


def bar_text(tally: Tally, rate: float | None, elapsed: float, width: int = BAR_WIDTH) -> str:
    """The terminal form: ``[#####-------] `` before :func:`progress_text`."""
    total = max(tally.total, tally.labelled)
    filled = round(width * tally.labelled / total) if total else 0
    return f"[{'#' * filled}{'-' * (width - filled)}] {progress_text(tally, rate, elapsed)}"


class Reporter:
    """Shows a run's progress from another thread until :meth:`stop`: it asks for the counts every
    BAR_SECONDS (so the rate starts with the first images) and redraws a bar in place on a
    terminal ``stream``, or else logs a line every LOG_SECONDS."""

    def __init__(self, ask: Callable[[], tuple[int, int, int]], files: int, shards: int,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.ask, self.files, self.shards = ask, files, shards
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = self.stream.isatty()
        self.clock = clock
        self.started = clock()
        self.next_log = self.started + LOG_SECONDS
        self.rate = Rate(clock)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="lgca-progress", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, finished: bool = False) -> None:
        """Stop reporting; on a terminal, draw the bar once more and end its line. ``finished``: the
        write returned, so every image is labelled (a count still on its way to the counter is
        not waited for) and the last bar shows no rate or ETA (the closing summary has them)."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=ASK_TIMEOUT + 1)
        if self.terminal:
            self.tick(finished)
            self.stream.write("\n")
            self.stream.flush()

    def _loop(self) -> None:
        while not self.stopping.wait(BAR_SECONDS):
            self.tick()

    def tick(self, finished: bool = False) -> None:
        """Ask for the counts; redraw the bar, or log a line when LOG_SECONDS have passed since the
        last (a counter that does not answer skips this tick)."""
        try:
            labelled, found, shards_read = self.ask()
        except (ray.exceptions.RayError, TimeoutError) as exc:
            log.debug("no progress report: %s", exc)
            return
        now = self.clock()
        tally = Tally(labelled, self.files, found, shards_read, self.shards)
        rate, elapsed = self.rate.update(labelled), now - self.started
        if finished:
            tally = Tally(max(labelled, tally.total), self.files, found, self.shards, self.shards)
            rate = None
        if self.terminal:
            self.stream.write(f"\r\x1b[K{bar_text(tally, rate, elapsed)}")  # \x1b[K: clear the rest of the line
            self.stream.flush()
        elif now >= self.next_log:
            self.next_log = now + LOG_SECONDS
            log.info("%s", progress_text(tally, rate, elapsed))


def counter_reporter(counter: ray.actor.ActorHandle, files: int, shards: int,
                     stream: TextIO | None = None) -> Reporter:
    """A :class:`Reporter` of ``counter`` (see :func:`start_counter`) on ``stream`` (stderr)."""
    return Reporter(lambda: ray.get(counter.counts.remote(), timeout=ASK_TIMEOUT), files, shards, stream)
