"""What a label run prints from Ray: its log levels, its progress bars, and its known noise.

A normal run shows this package's messages, our own progress line (:mod:`.progress`) and
every warning and error, but not Ray's start-up and execution-plan INFO lines, nor Ray Data's
progress bars (which count blocks, not images), nor the few messages below that Ray prints on
every healthy run. Each is dropped by its exact text, never by level, so an unexpected
warning or error still shows. ``--verbose`` keeps everything; ``--quiet`` keeps warnings
and errors only.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Iterator, TextIO

import ray


@dataclass(frozen=True)
class Display:
    """How much a run prints (``lgca label --quiet/--verbose/--ray-progress``); changes no result."""

    verbosity: int = 0  # -1 quiet, 0 normal, 1 verbose
    ray_progress: bool = False  # Ray Data's own progress bars as well

    @property
    def quiet(self) -> bool:
        return self.verbosity < 0

    @property
    def verbose(self) -> bool:
        return self.verbosity > 0


# Messages Ray logs on runs that are fine, by logger and start of the message. Only for a Ray
# this run starts itself: there, the token mode is Ray's own default, and our check of the
# machine's CPUs (job.check_local_resources) has ruled out the hang Ray warns about.
LOCAL_NOISE = {
    "ray._private.authentication.authentication_token_setup": (
        "Token authentication is enabled for this Ray cluster",),
    "ray.data.dataset": ("Warning: The Ray cluster currently does not have any available CPUs",),
}
# Wherever Ray runs: Ray Data announcing that its bars are off (ours replace them) and how it
# shows them when they are on.
NOISE = {
    "ray.data._internal.progress": ("Progress bars disabled", "Progress will be logged because"),
}
# Ray's C++ core worker logs this at ERROR level on stderr whenever Ray Data creates an actor
# pool (its own arguments are in the object store; ray-project/ray#57733): not an error here.
CORE_WORKER_NOISE = (b"has constructor arguments in the object store and max_restarts > 0",)


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def filter_noise(local: bool) -> None:
    """Add the filters of NOISE (and LOCAL_NOISE for a Ray this run starts) to their loggers,
    once per process."""
    for name, prefixes in (NOISE | LOCAL_NOISE if local else NOISE).items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) and f.prefixes == prefixes for f in logger.filters):
            logger.addFilter(DropMessages(prefixes))


def init_options(display: Display) -> dict:
    """``ray.init`` keyword arguments: Ray's own INFO messages only with ``--verbose``; the workers'
    output (our actors' messages among it) relayed unless ``--quiet``."""
    return {"logging_level": logging.INFO if display.verbose else logging.WARNING,
            "log_to_driver": not display.quiet}


def configure_ray_output(display: Display, local: bool) -> None:
    """Set Ray Data's console level and progress bars for ``display``, and drop the known noise.
    Without a terminal, the workers' relayed lines carry no colour codes."""
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # read by Ray when it prints a worker's line
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = display.ray_progress
    context.print_on_execution_start = display.verbose
    level = logging.INFO if display.verbose else logging.WARNING
    for handler in logging.getLogger("ray.data").handlers:  # its console handler, not its log file
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(level)
    if not display.verbose:
        filter_noise(local)


@contextlib.contextmanager
def core_worker_noise_dropped(enabled: bool = True) -> Iterator[TextIO]:
    """Within: the lines of this process's stderr (file descriptor 2, where Ray's C++ core worker
    logs too) pass through a pipe to the real stderr, in order, except those holding one of
    CORE_WORKER_NOISE. Used around the Ray execution only, after Ray's own processes started
    (they keep their own stderr). Yields a stream on the real stderr, for the progress bar
    (redrawn in place, it ends no line for the pipe to pass on)."""
    if not enabled:
        yield sys.stderr
        return
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    relay = threading.Thread(target=_relay, args=(read_end, real), name="lgca-stderr", daemon=True)
    relay.start()
    terminal = os.fdopen(os.dup(real), "w", encoding="utf-8", errors="replace")
    try:
        yield terminal
    finally:
        terminal.close()
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer is gone: the relay copies what is left and ends
        relay.join(timeout=5)
        if not relay.is_alive():  # else a process started meanwhile holds the pipe: keep relaying it
            os.close(real)


def _relay(read_end: int, target: int) -> None:
    """Copy lines from ``read_end`` to ``target``, without those holding CORE_WORKER_NOISE."""
    with os.fdopen(read_end, "rb") as source:
        for line in source:
            if not any(noise in line for noise in CORE_WORKER_NOISE):
                os.write(target, line)
