"""What a run prints from Ray: the known noise dropped by its exact text, everything else kept."""
from __future__ import annotations

import logging
import os

from pipeline.distributed.console import Display, core_worker_noise_dropped, filter_noise, init_options

CORE_WORKER_LINE = (b"[2026-12-05 17:59:03,487 E 18937 18937] core_worker.cc:2465: Actor with class name: "
                    b"'MapWorker(MapBatches(LabelActor))' and ID: '163c' has constructor arguments in the object "
                    b"store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, "
                    b"the actor restart will fail.\n")


def test_the_core_workers_notice_is_dropped_from_stderr_and_the_rest_kept_in_order(capfd):
    with core_worker_noise_dropped() as terminal:
        os.write(2, b"before\n")
        os.write(2, CORE_WORKER_LINE)
        os.write(2, b"[2026-12-05 17:59:04,000 E 18937 18937] core_worker.cc:99: a real error\n")
        terminal.write("a bar, drawn in place")
        terminal.flush()
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert "max_restarts" not in err and "a bar, drawn in place" in err
    lines = [line for line in err.replace("a bar, drawn in place", "").splitlines() if line]
    assert lines == ["before", "[2026-12-05 17:59:04,000 E 18937 18937] core_worker.cc:99: a real error", "after"]


def test_verbose_keeps_stderr_as_it_is(capfd):
    with core_worker_noise_dropped(enabled=False):
        os.write(2, CORE_WORKER_LINE)
    assert "max_restarts" in capfd.readouterr().err


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_known_messages_of_a_local_ray_are_dropped():
    filter_noise(local=True)
    token = logging.getLogger("ray._private.authentication.authentication_token_setup")
    data = logging.getLogger("ray.data.dataset")
    collect = Collect()  # on the loggers themselves: Ray's "ray" logger does not pass records on
    for logger in (token, data):
        logger.addHandler(collect)
    try:
        token.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        token.warning("Token authentication is enabled but no token was found.")  # a real problem: kept
        data.warning("Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will hang")
        data.warning("Something else about the dataset")
    finally:
        for logger in (token, data):
            logger.removeHandler(collect)
    assert collect.messages == ["Token authentication is enabled but no token was found.",
                                "Something else about the dataset"]


def test_ray_is_told_the_verbosity():
    assert init_options(Display()) == {"logging_level": logging.WARNING, "log_to_driver": True}
    assert init_options(Display(verbosity=-1)) == {"logging_level": logging.WARNING, "log_to_driver": False}
    assert init_options(Display(verbosity=1))["logging_level"] == logging.INFO
