"""``lgca bench`` on the tiny model with very few images: the report's keys and values are sane.

No assertion here depends on how fast anything ran.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from pipeline.commands.bench import MEMORY_SPLIT_KNOWN, PeakRssPoller, config_from_args, cpu_count, register

ENGINE_METHODS = {"clip", "wca", "lgca"}
TARGETS = {"lgca_over_wca_within_5pct_of_floor", "crop_time_share_under_5pct",
           "pipeline_over_engine_at_least_0.85", "peak_rss_flat_within_10pct"}


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lgca")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def tiny(pretrained) -> list[str]:
    return ["bench", "--model", "lgca-tiny", "--pretrained", str(pretrained), "--device", "cpu",
            "--images", "4", "--crops", "8", "--steps", "2", "--expand-top", "2"]


def test_bench_json_reports_engine_pipeline_and_memory(capsys):
    with pytest.warns(UserWarning, match="random weights"):
        assert run(tiny("none") + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert (report["images"], report["batch_size"], report["model"]) == (4, 4, "lgca-tiny")
    assert set(report["engine_images_per_s"]) == ENGINE_METHODS
    assert all(rate > 0 for rate in report["engine_images_per_s"].values())
    assert report["lgca_over_wca_floor"] == (1 + 8 + 2 * 2) / (1 + 8)
    assert report["lgca_over_wca_time"] == pytest.approx(
        report["engine_seconds"]["lgca"] / report["engine_seconds"]["wca"])
    assert 0 < report["crop_time_share"] <= 1 and 0 < report["encoder_time_share"] <= 1

    runs = report["pipeline_runs"]
    assert [(run["images"], run["errors"]) for run in runs] == [(4, 0), (16, 0)]
    assert report["pipeline_images_per_s"] == pytest.approx(16 / runs[1]["seconds"])
    assert report["pipeline_over_engine"] == pytest.approx(
        report["pipeline_images_per_s"] / report["engine_images_per_s"]["lgca"])
    assert report["pipeline_setup"] == {"ray_num_cpus": cpu_count(), "ray_num_gpus": 0,
                                        "cpus_per_actor": 1, "threads_per_actor": cpu_count(),
                                        "gpus_per_actor": 0,  # --pretrained none: the engine's weights, from a file
                                        "pipeline_pretrained": "the engine's random weights, from a checkpoint file"}
    for role in ("driver", "actor"):
        peaks = report["peak_rss_mb"][role]
        assert set(peaks) == {"1x", "4x"} and all(mb > 50 for mb in peaks.values()), role
        assert report["peak_rss_growth"][role] == pytest.approx(peaks["4x"] / peaks["1x"])
    for size in runs:  # the actor's own memory is its resident set without the shared pages
        assert size["actor_peak_rss_mb"] <= size["actor_peak_vmhwm_mb"]
        assert 0 <= size["actor_peak_shared_mb"] < size["actor_peak_vmhwm_mb"]
    assert set(report["targets"]) == TARGETS and all(isinstance(v, bool) for v in report["targets"].values())


def test_bench_engine_only_prints_a_table_without_pipeline_numbers(tiny_checkpoint, capsys):
    assert run(tiny(tiny_checkpoint) + ["--skip-pipeline", "--batch-size", "3"]) == 0
    table = capsys.readouterr().out
    assert "4 images, batch 3; N=8 T=2 K=2" in table
    assert "(floor 1.444)" in table and "engine images/s: clip " in table
    assert "pipeline:" not in table
    assert "target pipeline_over_engine_at_least_0.85: n/a" in table
    assert "target peak_rss_flat_within_10pct: n/a" in table

    assert run(tiny(tiny_checkpoint) + ["--skip-pipeline", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline_images_per_s"] is None and report["peak_rss_mb"] is None
    assert report["targets"]["pipeline_over_engine_at_least_0.85"] is None


def test_defaults_are_vit_b_32_with_random_weights_and_calibrated_sizes():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    cfg = config_from_args(parser.parse_args(["bench"]))
    assert (cfg.model.name, cfg.model.pretrained, cfg.model.device) == ("ViT-B-32", "none", "auto")
    assert (cfg.images, cfg.batch_size, cfg.skip_pipeline) == (0, 0, False)
    assert (cfg.scoring.crops, cfg.scoring.steps, cfg.scoring.expand_top) == (60, 3, 6)


@pytest.mark.skipif(not MEMORY_SPLIT_KNOWN, reason="psutil reports shared pages on Linux only")
def test_peak_rss_poller_finds_a_marked_child_and_its_peak():
    code = ("import mmap, sys, time; block = b'x' * (200 * 2**20); shared = mmap.mmap(-1, 100 * 2**20); "
            "shared.write(b'y' * (100 * 2**20)); print('ready', flush=True); sys.stdin.readline(); "
            "more = b'z' * (150 * 2**20); print('grown', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, "lgca-bench-test-marker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        poller = PeakRssPoller("lgca-bench-test-marker")
        poller.poll()
        assert [process.pid for process in poller.processes] == [child.pid]  # among this process's descendants
        assert poller.peak_kb / 1024 > 300  # both blocks
        assert 200 < poller.peak_own_kb / 1024 < 300  # the private block, not the shared one
        assert 100 <= poller.peak_shared_kb / 1024 < 120  # the shared block and the interpreter's mapped files
        child.stdin.write(b"grow\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"grown\n"
        poller.poll()  # between two walks of the tree: the pid found by the first poll is read again
        assert 350 < poller.peak_own_kb / 1024 < 450
        other = PeakRssPoller("no-process-has-this-marker")
        other.poll()
        assert other.peak_kb == 0
    finally:
        child.kill()
        child.wait()
