"""The ``lgca label`` command: job files and flags, errors before Ray, resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from skimage import data as photos

from pipeline.cli import main
from pipeline.distributed.plan import FILES_PER_READ

PHOTO_MAKERS = (photos.astronaut, photos.chelsea, photos.coffee, photos.rocket, photos.camera)


def photo_folder(root: Path, count: int, size: int = 160) -> Path:
    """``count`` small JPEGs made from scikit-image photos (distinct files, distinct ids)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.fromarray(PHOTO_MAKERS[i % len(PHOTO_MAKERS)]()).convert("RGB")
        image.thumbnail((size + i, size + i))
        image.save(root / f"img-{i:03d}.jpg", quality=90)
    return root


def output_ids(output: Path) -> list[str]:
    ids = []
    for path in sorted((output / "data").glob("*.parquet")):
        ids.extend(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return ids


def lgca(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("lgca")), *args]


def test_job_file_with_flags_winning(ray_cluster, tmp_path, tiny_checkpoint, capsys):
    images = photo_folder(tmp_path / "in", 3)
    spec = {"input": [str(images)], "output": str(tmp_path / "out"), "classes": "cat,rocket,coffee",
            "model": "lgca-tiny", "pretrained": str(tiny_checkpoint), "device": "cpu",
            "crops": 6, "steps": 1, "expand_top": 2, "seed": 4, "top-k": 2, "actors": "1-2"}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(spec))
    assert main(["label", "--config", str(job_file), "--seed", "9", "--address", ray_cluster]) == 0
    printed = capsys.readouterr().out
    assert "3 ok, 0 error rows, 0 already labelled" in printed and str(tmp_path / "out") in printed
    run = json.loads(next((tmp_path / "out" / "_lgca" / "runs").glob("*.json")).read_text())
    assert run["seed"] == 9 and run["scoring"]["crops"] == 6 and run["scoring"]["top_k"] == 2
    assert run["resources"]["actors_min"] == 1 and run["resources"]["actors_max"] == 2
    table = pq.read_table(tmp_path / "out" / "data")
    assert table.num_rows == 3 and all(len(v) == 2 for v in table.column("topk_labels").to_pylist())


@pytest.mark.parametrize("args,message", [
    (["--crops", "0"], "crops: must be at least 1"),
    (["--actors", "4-2"], "actors: need 1 <= min <= max"),
    (["--aggregation", "0.5,0.5"], "aggregation: 2 weights given, but steps=3 needs 4"),
    (["--precision", "fp16"], "fp16 needs GPUs"),
    (["--templates", "/nonexistent/t.json"], "not found"),
    (["--model", "ViT-B-33"], "ViT-B-33"),
])
def test_bad_configs_fail_before_ray_with_a_clear_message(tmp_path, capsys, monkeypatch, args, message):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    images = photo_folder(tmp_path / "in", 1)
    base = ["label", "--input", str(images), "--output", str(tmp_path / "out"), "--classes", "a,b",
            "--model", "lgca-tiny", "--pretrained", "none"]
    assert main(base + args) == 2
    assert message in capsys.readouterr().err


def test_unknown_job_file_key_is_named(tmp_path, capsys):
    job_file = tmp_path / "job.yaml"
    job_file.write_text("input: [x]\noutput: y\nclasses: a,b\ncrop: 5\n")
    assert main(["label", "--config", str(job_file)]) == 2
    assert "unknown key 'crop'" in capsys.readouterr().err


def test_a_killed_run_resumes_with_every_image_exactly_once(ray_cluster, tmp_path, tiny_checkpoint):
    total = 3 * FILES_PER_READ  # three read blocks: the kill comes after the first is written
    images = photo_folder(tmp_path / "in", total)
    output = tmp_path / "out"
    command = lgca("label", "--input", str(images), "--output", str(output), "--classes", "cat,rocket,man",
                   "--model", "lgca-tiny", "--pretrained", str(tiny_checkpoint), "--device", "cpu",
                   "--crops", "240", "--expand-top", "40", "--batch-size", "4", "--address", ray_cluster)
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list((output / "data").glob("*.parquet")) and time.monotonic() < deadline:
        assert driver.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = len(output_ids(output)) if all(_readable(p) for p in (output / "data").glob("*.parquet")) else None
    assert before is None or before < total, "the run finished before the kill"
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    ids = output_ids(output)
    assert sorted(ids) == sorted(str(p) for p in images.glob("*.jpg"))  # every image, none twice


def _readable(path: Path) -> bool:
    try:
        pq.read_metadata(path)
        return True
    except Exception:  # noqa: BLE001 - a partial file of the killed run
        return False


def test_a_local_run_refuses_actors_bigger_than_the_machine(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    images = photo_folder(tmp_path / "in", 1)
    args = ["label", "--input", str(images), "--output", str(tmp_path / "out"), "--classes", "a,b",
            "--model", "lgca-tiny", "--pretrained", "none"]
    assert main(args + ["--cpus-per-actor", str((os.cpu_count() or 1) + 1)]) == 2
    assert "cpus_per_actor" in capsys.readouterr().err
    assert main(args + ["--gpus-per-actor", "64"]) == 2
    assert "gpus_per_actor: 1 actor(s) of 64.0 GPUs but this machine has 0 GPUs" in capsys.readouterr().err


def subcommand_parsers() -> dict:
    from pipeline.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.choices and not a.option_strings]
    return dict(commands.choices)


def test_every_option_of_every_command_shows_its_default_in_help():
    parsers = subcommand_parsers()
    assert {"label", "submit", "query", "summary", "explain", "eval", "bench"} <= set(parsers)
    for name, sub in parsers.items():
        for action in sub._actions:
            if not action.option_strings or action.nargs == 0 or action.default in (None, False):
                continue  # flags (off unless given) and options without a default
            assert "default" in action.help.lower(), (name, action.option_strings)
    help_of = {name: sub.format_help() for name, sub in parsers.items()}
    assert "threads reading and decoding ahead, one batch each (default: 4)" in " ".join(help_of["eval"].split())
    assert "rows a printed table shows at most (default: 100)" in " ".join(help_of["query"].split())
    label = " ".join(help_of["label"].split())
    assert "(default: 'ViT-B-32')" in label and "(default: 'openai')" in label
    assert "--quiet" in label and "--verbose" in label and "--ray-progress" in label


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(monkeypatch, capsys):
    from pipeline.commands import query

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(query, "_summary", interrupted)
    assert main(["summary", "out"]) == 130
    assert capsys.readouterr().err == "lgca summary: interrupted\n"


def test_only_this_packages_info_lines_are_shown():
    import logging

    from pipeline.cli import configure_logging

    configure_logging(0)
    assert not logging.getLogger().isEnabledFor(logging.INFO)  # open_clip logs its INFO lines on the root
    assert logging.getLogger("pipeline.distributed.job").isEnabledFor(logging.INFO)
    configure_logging(-1)
    assert not logging.getLogger("pipeline.distributed.job").isEnabledFor(logging.INFO)
    configure_logging(1)
    assert logging.getLogger("pipeline.distributed.job").isEnabledFor(logging.DEBUG)
    configure_logging(0)
