"""What the reliability tests share: photos to label, the ``lgca label`` command line of a small
job, and running it as its own process (a driver that can be killed, or that starts its own Ray)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from skimage import data as photos

from tests.support import encode

ROOT = Path(__file__).resolve().parents[2]
CLASSES = "cat,astronaut,coffee,rocket"


def photo_bytes(count: int, shift: int = 0) -> list[bytes]:
    """``count`` distinct small JPEG photos (the astronaut, rolled sideways by different amounts)."""
    pixels = photos.astronaut()[::4, ::4]
    return [encode(np.roll(pixels, 7 * (i + shift), axis=1)) for i in range(count)]


def label_args(inputs: list[str], output: str, checkpoint: Path, *extra: str) -> list[str]:
    """``lgca label`` arguments of a fast job: lgca-tiny on CPUs, 8 crops, one expansion step."""
    args = ["label", "--output", output, "--classes", CLASSES, "--model", "lgca-tiny",
            "--pretrained", str(checkpoint), "--device", "cpu", "--crops", "8", "--steps", "1",
            "--expand-top", "2", "--batch-size", "2"]
    for uri in inputs:
        args += ["--input", uri]
    return args + list(extra)


def lgca_process(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``lgca ARGS`` as its own process, importing this checkout's ``pipeline``; its output (both
    streams) goes to the file ``log``, so that it never blocks on a full pipe."""
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
