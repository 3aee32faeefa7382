"""The progress line without a cluster: counts, totals, rate, ETA and their two forms, on a fake clock."""
from __future__ import annotations

import io
import logging
import warnings

import numpy as np
from skimage import data as photos

from pipeline.config import InputConfig, LabelJob, ModelConfig, ScoringParams, StorageConfig, TextConfig
from pipeline.data.decode import DecodeLimits, decode_batch
from pipeline.data.output import IdSet, id_digests
from pipeline.distributed.plan import read_items
from pipeline.distributed.progress import (BAR_SECONDS, LOG_SECONDS, CountedLabelActor, Counter, Reporter, Tally,
                                           bar_text, clock_text, progress_text)
from pipeline.model.classes import ClassSet
from tests.support import encode, make_tar


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeCounter:
    """A Counter handle stand-in: ``add.remote(...)`` adds at once, as the actor would."""

    def __init__(self) -> None:
        self.counter = Counter()
        self.add = type("Method", (), {"remote": staticmethod(self.counter.add)})()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_total_is_exact_for_loose_files_and_estimated_while_shards_are_unread():
    assert Tally(labelled=3, files=40, found=0, shards_read=0, shards=0).total == 40
    files_and_shards = Tally(labelled=3, files=40, found=300, shards_read=2, shards=8)
    assert files_and_shards.total == 40 + 1200 and not files_and_shards.exact
    assert Tally(labelled=3, files=40, found=1234, shards_read=8, shards=8).total == 1274


def test_the_line_says_done_of_total_rate_elapsed_and_eta():
    assert clock_text(3725.4) == "1:02:05"
    assert progress_text(Tally(0, 40, 0, 0, 0), None, 12) == "0/40 images (0%), 0:00:12 elapsed"
    assert progress_text(Tally(10, 40, 0, 0, 0), 2.5, 30) == (
        "10/40 images (25%), 2.50 images/s, 0:00:30 elapsed, ETA 0:00:12")
    assert progress_text(Tally(10, 0, 20, 1, 4), 2.0, 30) == (
        "10/~80 images (12%), 1/4 shards read, 2.00 images/s, 0:00:30 elapsed, ETA 0:00:35")
    assert bar_text(Tally(10, 40, 0, 0, 0), None, 30, width=8) == "[##------] 10/40 images (25%), 0:00:30 elapsed"


def test_without_a_terminal_a_line_is_logged_every_30_seconds_with_the_rate_from_the_first_images(caplog):
    clock, counts = FakeClock(), [(0, 0, 0)]
    out = io.StringIO()  # not a terminal: log lines
    reporter = Reporter(lambda: counts[-1], files=40, shards=0, stream=out, clock=clock)
    assert not reporter.terminal
    with caplog.at_level(logging.INFO, logger="pipeline.distributed.progress"):
        for second in range(1, 61):  # the thread ticks every BAR_SECONDS
            clock.now += BAR_SECONDS
            if second == 20:  # Ray and the model actors took 20 s to start
                counts.append((8, 0, 0))
            if second == 24:
                counts.append((16, 0, 0))
            reporter.tick()
    assert LOG_SECONDS == 30 and caplog.messages == [
        "16/40 images (40%), 0.80 images/s, 0:00:30 elapsed, ETA 0:00:30",  # 8 images in the 10 s since the first
        "16/40 images (40%), 0.20 images/s, 0:01:00 elapsed, ETA 0:02:00"]
    assert out.getvalue() == ""  # the log, not the stream


def test_on_a_terminal_the_bar_is_redrawn_in_place_and_ended_once():
    clock, terminal = FakeClock(), Terminal()
    reporter = Reporter(lambda: (5, 0, 0), files=10, shards=0, stream=terminal, clock=clock)
    reporter.tick()
    reporter.stop()  # never started: draws the last state and ends the line
    drawn = terminal.getvalue()
    assert drawn.count("\r\x1b[K[") == 2 and drawn.endswith("5/10 images (50%), 0:00:00 elapsed\n")
    finished = Terminal()
    clock.now += 5
    Reporter(lambda: (9, 0, 0), files=10, shards=0, stream=finished, clock=clock).stop(finished=True)
    assert finished.getvalue() == f"\r\x1b[K[{'#' * 24}] 10/10 images (100%), 0:00:00 elapsed\n"


def test_a_counter_that_does_not_answer_skips_the_report():
    def silent():
        raise TimeoutError("no answer")

    terminal = Terminal()
    Reporter(silent, files=10, shards=0, stream=terminal).tick()
    assert terminal.getvalue() == ""


def test_read_tasks_count_shard_rows_and_shards_but_not_loose_files(tmp_path):
    shard = make_tar({"1.jpg": encode(photos.astronaut()), "2.jpg": encode(photos.coffee()),
                      "3.jpg": encode(photos.rocket())})
    (tmp_path / "a.tar").write_bytes(shard)
    (tmp_path / "x.jpg").write_bytes(encode(photos.chelsea()))
    job = LabelJob(inputs=InputConfig((str(tmp_path),)), output=str(tmp_path / "out"), text=TextConfig(classes="a,b"))
    done = IdSet(np.unique(id_digests([f"{tmp_path / 'a.tar'}#2.jpg"])))  # labelled before: not to do
    batch = {"kind": np.array(["tar", "files"]), "uris": [np.array([str(tmp_path / "a.tar")]),
                                                          np.array([str(tmp_path / "x.jpg")])]}
    fake = FakeCounter()
    rows = [i for piece in read_items(batch, job, done, progress=fake) for i in piece["id"]]
    assert len(rows) == 3
    assert fake.counter.counts() == (0, 2, 1)


def test_the_counted_actor_adds_each_calls_rows(tiny_checkpoint):
    fake = FakeCounter()
    classes = ClassSet(names=("cat", "rocket"), templates=("a photo of a {}.",), descriptions=((), ()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint: no warning at all
        actor = CountedLabelActor(fake, model=ModelConfig(name="lgca-tiny", pretrained=str(tiny_checkpoint),
                                                          device="cpu"),
                                  classes=classes, scoring=ScoringParams(crops=4, steps=1, expand_top=1),
                                  storage=StorageConfig(), run_id="r1", batch_size=2)
    ids = ["cat", "rocket", "bad"]
    batch = decode_batch({"id": ids, "uri": ids, "bytes": [encode(photos.chelsea()), encode(photos.rocket()), b"no"],
                          "error": [None, None, None]}, DecodeLimits(max_short_side=96))
    assert actor(batch).num_rows == 3
    assert fake.counter.counts() == (3, 0, 0)  # error rows are labelled rows too
