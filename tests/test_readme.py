"""The README's commands, run as a newcomer runs them, so that the README cannot drift.

Every ```sh block of README.md follows a marker line ``<!-- docs-test: run|parse|skip (why) -->``:
``run`` blocks are run in order, in a fresh folder with the repository's jobs/, by bash, as
subprocesses of this virtualenv's ``lgca`` with a temporary HOME and no internet; ``parse``
blocks (S3, GPUs) must build a valid job; ``skip`` blocks need the internet or are CI's own.
The only substitution: a checkpoint file of lgca-tiny stands in for the ViT-B-32 weights file
the README names (the model name changes with it).
"""
from __future__ import annotations

import os
import pty
import re
import shlex
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from pipeline.cli import build_parser
from pipeline.model.loading import register_builtin_configs
from pipeline.options import job_from_args
from tests.support import NOISE, newcomer_env

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- docs-test: (run|parse|skip)\b[^>]*-->")
SUBSTITUTED = {"--model ViT-B-32-quickgelu": "--model lgca-tiny"}  # with a lgca-tiny file of the README's name
CHECKPOINT_NAME = "ViT-B-32-openai.safetensors"
RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")


@dataclass(frozen=True)
class Block:
    marker: str  # run, parse or skip; '' where the block has no marker
    language: str
    text: str
    line: int  # of the opening fence, 1-based

    @property
    def commands(self) -> list[str]:
        """Its lines, continuation lines joined, without blank lines."""
        return [line for line in self.text.replace("\\\n", " ").splitlines() if line.strip()]


def readme_blocks() -> list[Block]:
    lines = (ROOT / "README.md").read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = re.fullmatch(r"```(\w*)", lines[i])
        if not opening:
            i += 1
            continue
        end = lines.index("```", i + 1)
        marker = MARKER.fullmatch(lines[i - 1]) if i else None
        blocks.append(Block(marker.group(1) if marker else "", opening.group(1), "\n".join(lines[i + 1:end]), i + 1))
        i = end + 1
    return blocks


def shape(text: str) -> re.Pattern:
    """A README output line as a pattern: its numbers and run ids may differ, nothing else."""
    escaped = re.escape(RUN_ID.sub("RUNID", text))
    return re.compile(re.sub(r"\d+", r"\\d+", escaped).replace("RUNID", RUN_ID.pattern))


def substituted(command: str) -> str:
    for old, new in SUBSTITUTED.items():
        command = command.replace(old, new)
    return command


def test_every_sh_block_is_marked_and_the_first_is_cis_set_up():
    blocks = [b for b in readme_blocks() if b.language == "sh"]
    assert all(b.marker for b in blocks), [b.line for b in blocks if not b.marker]
    assert blocks[0].commands == ['pip install -e ".[test]"', "python -m pytest -q"]  # .ci/run runs these
    cpu = [b for b in blocks if "download.pytorch.org" in b.text]
    assert cpu and cpu[0].commands[0] == ("pip install torch torchvision "
                                          "--index-url https://download.pytorch.org/whl/cpu")
    assert cpu[0].commands[1] == blocks[0].commands[0]  # then the project, as in the set-up
    fetch = [b for b in blocks if b.marker == "skip" and b.commands[0].startswith("curl")]
    assert fetch and f"-o {CHECKPOINT_NAME} " in fetch[0].commands[0]  # the file the next command loads


def test_cluster_commands_build_valid_jobs():
    parsed = [c for b in readme_blocks() if b.marker == "parse" for c in b.commands]
    assert parsed
    for command in parsed:
        argv = shlex.split(command)
        assert argv[0] == "lgca"
        job = job_from_args(build_parser().parse_args(argv[1:]))
        assert job.output and job.inputs.uris


def run_with_terminal_stderr(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``command`` by bash with stderr on a pseudo-terminal (as in a shell), stdout captured."""
    master, slave = pty.openpty()
    process = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=slave,
                               text=True)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's last writer is gone
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    out, _ = process.communicate(timeout=600)
    reader.join(timeout=30)
    os.close(master)
    return subprocess.CompletedProcess(command, process.returncode, out, b"".join(chunks).decode(errors="replace"))


@dataclass(frozen=True)
class QuickStart:
    work: Path  # the folder the commands ran in
    results: dict[str, subprocess.CompletedProcess]  # command as the README gives it -> its result

    def result(self, start: str) -> subprocess.CompletedProcess:
        """The result of the one command that starts with ``start``."""
        (found,) = [r for c, r in self.results.items() if c.startswith(start)]
        return found


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory) -> QuickStart:
    """Every ``run`` command of the README, in order, in a fresh folder."""
    work, home = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("home")
    (work / "jobs").symlink_to(ROOT / "jobs")
    register_builtin_configs()
    torch.manual_seed(7)
    save_file(open_clip.create_model("lgca-tiny").state_dict(), str(work / CHECKPOINT_NAME))
    env, results = newcomer_env(home), {}
    first_label = True
    for block in readme_blocks():
        if block.marker != "run":
            continue
        for command in block.commands:
            if command.startswith("lgca label") and first_label:  # the newcomer's first run, in a terminal
                first_label = False
                results[command] = run_with_terminal_stderr(substituted(command), work, env)
            else:
                results[command] = subprocess.run(["bash", "-c", substituted(command)], cwd=work, env=env,
                                                  capture_output=True, text=True, timeout=600)
            assert results[command].returncode == 0, (command, results[command].stderr[-3000:])
    return QuickStart(work, results)


def test_the_quick_start_labels_the_photos_quietly_with_a_progress_bar(quick_start):
    work = quick_start.work
    first = quick_start.result("lgca label --input photos --output labels ")
    for noise in NOISE:
        assert noise not in first.stderr, noise
    shown = next(b for b in readme_blocks() if b.language == "text" and "4 ok, 0 error rows" in b.text)
    printed = first.stderr.replace("\r\x1b[K", "\n").splitlines() + first.stdout.splitlines()
    for line in shown.text.splitlines():  # every line the README shows, as printed (numbers aside)
        assert any(shape(line).fullmatch(p.strip()) for p in printed), (line, printed)
    rows = pq.read_table(work / "labels" / "data").to_pylist()
    assert sorted(Path(r["id"]).name for r in rows) == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    assert all(r["status"] == "ok" and r["label"] in ("cat", "astronaut", "coffee", "rocket") for r in rows)


def test_the_look_at_the_results_commands(quick_start):
    work = quick_start.work
    summary = quick_start.result("lgca summary labels").stdout
    assert "rows: 4 (4 ok, 0 error)" in summary and "runs (1):" in summary
    assert quick_start.result("lgca query labels \"SELECT id, label, round").stdout.count(".jpg") == 4
    assert quick_start.result("lgca query labels \"SELECT id, label FROM").stdout == "wrote 4 rows to labels.csv\n"
    assert len((work / "labels.csv").read_text().splitlines()) == 5  # a header and 4 rows
    for command in ("lgca summary", "lgca query", "lgca explain"):  # no open_clip INFO lines, no warnings
        assert all(r.stderr == "" for c, r in quick_start.results.items() if c.startswith(command)), command
    explain = quick_start.result("lgca explain")
    assert explain.stdout.startswith("chelsea-steps.png: lgca label ") and "note: --pretrained none" in explain.stdout
    assert (work / "chelsea-steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_checkpoint_file_and_the_job_file(quick_start):
    rows = pq.read_table(quick_start.work / "labels-b32" / "data").to_pylist()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    job_file = quick_start.result("lgca label --config jobs/example-local.yaml")
    assert "0 ok, 0 error rows, 4 already labelled" in job_file.stdout  # the README says so
    assert "0 ok, 0 error rows, 4 already labelled" in (ROOT / "README.md").read_text()


def test_the_review_relabel_and_search_commands(quick_start):
    work = quick_start.work
    page = (work / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and quick_start.result("lgca report").stdout.startswith(
        "report.html: 4 rows (4 ok, 0 error)")
    assert (work / "review" / "tasks.json").is_file() and (work / "review" / "config.xml").is_file()
    relabelled = pq.read_table(work / "labels-v2" / "data").to_pylist()
    assert sorted(Path(r["id"]).name for r in relabelled) == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    assert all(r["status"] == "ok" and r["label"] in ("cat", "dog", "astronaut", "coffee cup", "rocket")
               for r in relabelled)
    ranked = quick_start.result("lgca search").stdout.splitlines()
    assert ranked[0].split()[:2] == ["rank", "score"] and [line.split()[0] for line in ranked[1:]] == ["1", "2"]
