"""The first hour of a newcomer: no GPU, no internet, a fresh HOME, the ``lgca`` script in a shell.

Each mistake of the issue "The first hour", made for real as a subprocess: its message (one
``lgca <command>: error:`` line, no traceback), its exit status and the files it leaves. Then a
run stopped with Ctrl-C (SIGINT to its process group, as a terminal sends it), resumed by the
same command, and ``lgca summary`` checked against the data. The README's quick start itself
runs in tests/test_readme.py, in the same kind of environment.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support import NOISE, lgca_script, newcomer_env
from tests.test_cli import photo_folder

PHOTOS = 24
INTERRUPTED = 130
LABEL = ("label", "--input", "photos", "--output", "out", "--classes", "classes.txt")
# lgca-tiny, slowed by many crops and small calls, so that Ctrl-C comes while it labels
TINY_SLOW = ("--model", "lgca-tiny", "--pretrained", "none", "--crops", "240", "--expand-top", "40",
             "--batch-size", "4")


@dataclass(frozen=True)
class Shell:
    """A folder with photos and classes, and the newcomer's environment."""

    work: Path
    env: dict[str, str]

    def lgca(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([lgca_script(), *args], cwd=self.work, env=self.env, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def shell(tmp_path_factory) -> Shell:
    work = tmp_path_factory.mktemp("newcomer")
    photo_folder(work / "photos", PHOTOS)
    (work / "classes.txt").write_text("cat\nastronaut\ncoffee\nrocket\ncamera man\n")
    return Shell(work, newcomer_env(tmp_path_factory.mktemp("home")))


def one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The run's stderr, which must be exactly one ``lgca <command>: error:`` line; its text."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lgca {command}: error: "), result.stderr[-3000:]
    return lines[0]


def test_the_defaults_without_internet_stop_at_once_saying_what_to_pass(shell):
    result = shell.lgca(*LABEL)  # ViT-B-32 with the 'openai' tag: nothing cached, no internet
    assert result.returncode == 2
    line = one_error_line(result, "label")
    assert "the weights of tag 'openai' for ViT-B-32 are not in the local cache" in line
    assert "--model ViT-B-32-quickgelu --pretrained ./ViT-B-32-openai.safetensors" in line  # as the README
    assert "--pretrained none" in line
    assert not (shell.work / "out").exists()  # no manifest, no empty data/ left behind


def test_an_output_that_is_a_file(shell):
    (shell.work / "notes.txt").write_text("mine")
    result = shell.lgca("label", "--input", "photos", "--output", "notes.txt", "--classes", "classes.txt",
                        "--model", "lgca-tiny", "--pretrained", "none")
    assert result.returncode == 2
    assert "output: notes.txt is a file; give a folder" in one_error_line(result, "label")
    assert (shell.work / "notes.txt").read_text() == "mine"


def test_a_misspelt_model_gets_a_short_did_you_mean(shell):
    result = shell.lgca(*LABEL, "--model", "ViT-B-33", "--pretrained", "none")
    assert result.returncode == 2
    line = one_error_line(result, "label")
    assert "model: 'ViT-B-33' not found; did you mean " in line and "ViT-B-32" in line and len(line) < 400
    assert not (shell.work / "out").exists()


def test_explain_checks_its_image_before_the_model(shell):
    result = shell.lgca("explain", "photos/nope.jpg", "--classes", "classes.txt", "-o", "nope.png")
    assert result.returncode == 2  # the default weights are not here either: the image is checked first
    assert one_error_line(result, "explain") == "lgca explain: error: image: photos/nope.jpg not found"


def complete(path: Path) -> bool:
    try:
        pq.read_metadata(path)
        return True
    except (OSError, pa.ArrowInvalid):  # still being written
        return False


def wait_for_a_data_file(process: subprocess.Popen, data: Path, seconds: float = 300) -> None:
    """Until the run has written one complete data file (so Ctrl-C comes after some labels)."""
    deadline = time.monotonic() + seconds
    while not any(complete(path) for path in data.glob("*.parquet")):
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "no data file appeared"
        time.sleep(0.1)


def data_rows(output: Path) -> list[dict]:
    return pq.read_table(output / "data", columns=["id", "run_id", "status"]).to_pylist()


def test_ctrl_c_says_how_far_it_got_the_same_command_resumes_and_the_records_agree(shell):
    command = [lgca_script(), *LABEL, *TINY_SLOW]
    process = subprocess.Popen(command, cwd=shell.work, env=shell.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_a_data_file(process, shell.work / "out" / "data")
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = process.communicate(timeout=300)
    assert process.returncode == INTERRUPTED, err[-3000:]
    rows = data_rows(shell.work / "out")
    done = len(rows)
    assert 0 < done < PHOTOS, "the run finished before Ctrl-C"
    assert err.splitlines()[-1] == f"lgca label: interrupted after {done} images; rerun the same command to resume"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and out == ""
    (record,) = [json.loads(p.read_text()) for p in (shell.work / "out" / "_lgca" / "runs").glob("*.json")]
    assert record["status"] == "interrupted" and record["counts"]["ok"] + record["counts"]["error"] == done

    again = shell.lgca(*LABEL, *TINY_SLOW)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{PHOTOS - done} ok, 0 error rows, {done} already labelled" in again.stdout
    for noise in (*NOISE, "\x1b["):  # a log, not a terminal: no colour codes either
        assert noise not in again.stderr, noise
    rows = data_rows(shell.work / "out")
    assert sorted(r["id"] for r in rows) == sorted(str(p) for p in (shell.work / "photos").glob("*.jpg"))

    summary = shell.lgca("summary", "out", "--json")
    runs = json.loads(summary.stdout)["runs"]
    assert [run["status"] for run in runs] == ["interrupted", "done"]
    for run in runs:  # each run's record agrees with its rows in the data
        assert run["counts"]["ok"] + run["counts"]["error"] == run["rows"]
    assert sum(run["rows"] for run in runs) == PHOTOS
    text = shell.lgca("summary", "out").stdout
    assert "runs (2):" in text and " INTERRUPTED " in text and text.count(" images/s; inputs: photos") == 2

    other = shell.lgca(*LABEL, "--model", "lgca-tiny", "--pretrained", "none", "--crops", "8")  # other settings
    assert other.returncode == 2
    line = one_error_line(other, "label")
    assert "was labelled with other settings (image.crops: 240 -> 8; image.expand_top: 40 -> 6)" in line
    assert "{" not in line  # no settings dicts
    query = shell.lgca("query", "out", "SELECT id, label FROM labels", "-o", "picked.csv")
    assert query.returncode == 0 and query.stdout == f"wrote {PHOTOS} rows to picked.csv\n"
    assert len((shell.work / "picked.csv").read_text().splitlines()) == PHOTOS + 1

