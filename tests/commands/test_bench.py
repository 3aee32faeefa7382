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
STATE_TARGETS = {"relabel_scoring_at_least_20000_per_s", "relabel_end_to_end_marginal_at_least_5000_per_s",
                 "relabel_over_label_above_10000", "search_at_least_1000000_states_per_s"}


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
        assert run(tiny("none") + ["--json", "--skip-relabel"]) == 0
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
    assert set(report["targets"]) == TARGETS | STATE_TARGETS
    assert all(isinstance(report["targets"][name], bool) for name in TARGETS)
    assert all(report["targets"][name] is None for name in STATE_TARGETS) and "relabel_images_per_s" not in report


def test_bench_relabels_and_searches_the_engines_states(tiny_checkpoint, capsys):
    assert run(tiny(tiny_checkpoint) + ["--skip-pipeline", "--relabel-rows", "600", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["relabel_classes"] == 1000 and report["relabel_rows"] == {"1x": 600, "4x": 2400}
    rates = report["relabel_images_per_s"]
    assert rates["scoring"] > 0 and rates["end_to_end"] == pytest.approx(2400 / report["relabel_seconds"]["4x"])
    seconds, bank = report["relabel_seconds"], report["relabel_run_text_bank_s"]
    assert 0 < bank["1x"] < seconds["1x"] and 0 < bank["4x"] < seconds["4x"]
    scoring = {size: seconds[size] - bank[size] for size in seconds}  # the runs without their text bank
    if scoring["4x"] > scoring["1x"]:  # else the noise of two short runs hid the 1800 more rows
        assert rates["end_to_end_marginal"] == pytest.approx(1800 / (scoring["4x"] - scoring["1x"]))
        assert report["relabel_over_label"] == pytest.approx(
            rates["end_to_end_marginal"] / report["engine_images_per_s"]["lgca"])
        assert report["relabel_fixed_startup_s"] == pytest.approx(seconds["1x"] - 600 / rates["end_to_end_marginal"])
    assert report["relabel_scoring_over_label"] == pytest.approx(rates["scoring"] / report["engine_images_per_s"]["lgca"])
    # lgca-tiny: D = 64, T = 2: k_0 and 3 pooled vectors of float16 bytes, plus the labels
    assert 4 * 64 * 2 < report["source_bytes_per_row"] < 4 * 64 * 2 + 1000
    assert set(report["search_states_per_s"]) == {"full", "lgca"} and min(report["search_states_per_s"].values()) > 0
    assert report["targets"]["search_at_least_1000000_states_per_s"] in (True, False)
    assert isinstance(report["targets"]["relabel_scoring_at_least_20000_per_s"], bool)


def test_bench_engine_only_prints_a_table_without_pipeline_numbers(tiny_checkpoint, capsys):
    assert run(tiny(tiny_checkpoint) + ["--skip-pipeline", "--skip-relabel", "--batch-size", "3"]) == 0
    table = capsys.readouterr().out
    assert "4 images, batch 3; N=8 T=2 K=2" in table
    assert "(floor 1.444)" in table and "engine images/s: clip " in table
    assert "pipeline:" not in table
    assert "target pipeline_over_engine_at_least_0.85: n/a" in table
    assert "target peak_rss_flat_within_10pct: n/a" in table

    assert run(tiny(tiny_checkpoint) + ["--skip-pipeline", "--skip-relabel", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline_images_per_s"] is None and report["peak_rss_mb"] is None
    assert report["targets"]["pipeline_over_engine_at_least_0.85"] is None


def test_defaults_are_vit_b_32_with_random_weights_and_calibrated_sizes():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    cfg = config_from_args(parser.parse_args(["bench"]))
    assert (cfg.model.name, cfg.model.pretrained, cfg.model.device) == ("ViT-B-32", "none", "auto")
    assert (cfg.images, cfg.batch_size, cfg.skip_pipeline) == (0, 0, False)
    assert (cfg.relabel_rows, cfg.skip_relabel) == (100_000, False)
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
