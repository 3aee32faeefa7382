"""Faults survived by ``lgca label``: a worker node killed hard mid-run, an S3 that answers 503
SlowDown and drops connections, an output store refusing writes for 20 s, and the driver killed
while it writes its run record. docs/reliability.md lists them with what happens."""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.config import (InputConfig, LabelJob, ModelConfig, OutputError, ResourceConfig, ScoringParams,
                             StorageConfig, TextConfig)
from pipeline.data.output import Output
from pipeline.distributed.job import run_label_job
from tests.faults import FaultProxy, Faults
from tests.reliability.common import CLASSES, label_args, lgca_process, photo_bytes
from tests.support import make_tar, upload


def s3_job(bucket: str, endpoint: str, checkpoint: Path, **storage) -> LabelJob:
    """A small job from ``s3://bucket/photos/`` to ``s3://bucket/labels`` through ``endpoint``."""
    return LabelJob(inputs=InputConfig((f"s3://{bucket}/photos/",)), output=f"s3://{bucket}/labels",
                    text=TextConfig(classes=CLASSES),
                    model=ModelConfig(name="lgca-tiny", pretrained=str(checkpoint), device="cpu"),
                    scoring=ScoringParams(crops=8, steps=1, expand_top=2),  # as label_args
                    resources=ResourceConfig(batch_size=2), storage=StorageConfig(endpoint_url=endpoint, **storage))


def rows_by_id(output: str, storage: StorageConfig) -> Counter:
    """How many rows each id has, over every data file (what any reader of data/ sees)."""
    return Counter(i for column in Output(output, storage).read_column("id") for i in column.to_pylist())


def statuses(output: str, storage: StorageConfig) -> set[str]:
    return {s for column in Output(output, storage).read_column("status") for s in column.to_pylist()}


@pytest.fixture
def photos_on_s3(moto_endpoint, bucket) -> list[str]:
    """Ten photos under ``s3://bucket/photos/``; returns their ids."""
    objects = {f"photos/{i:02d}.jpg": payload for i, payload in enumerate(photo_bytes(10))}
    upload(moto_endpoint, bucket, objects)
    return [f"s3://{bucket}/{key}" for key in objects]


def test_a_worker_node_killed_hard_mid_run_labels_every_id_once(tiny_checkpoint, tmp_path):
    from ray.cluster_utils import Cluster

    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(6):  # a read task per shard, so data files come one after another
        (shards / f"{k}.tar").write_bytes(make_tar({f"{i}.jpg": payload for i, payload in
                                                    enumerate(photo_bytes(3, shift=10 * k))}))
    temp = tempfile.mkdtemp(prefix="lgca-nodes-", dir="/tmp")  # short: Ray's socket paths are limited
    # a head that takes no work (as in cluster.yaml) and two worker nodes of 2 CPUs, one machine
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": temp})
    output, log = tmp_path / "labels", tmp_path / "lgca.log"
    driver = None
    try:
        doomed = cluster.add_node(num_cpus=2)
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        driver = lgca_process(label_args([str(shards / "*.tar")], str(output), tiny_checkpoint,
                                         "--address", cluster.address), log)
        deadline = time.monotonic() + 300
        while driver.poll() is None and not list((output / "data").glob("*.parquet")):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        written_before = len(list((output / "data").glob("*.parquet")))
        assert driver.poll() is None, "the run ended before the node could be killed"
        cluster.remove_node(doomed, allow_graceful=False)
        assert driver.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    table = pq.read_table(output / "data", columns=["id", "status"])
    assert len(list((output / "data").glob("*.parquet"))) > written_before  # work went on after the kill
    assert Counter(table.column("id").to_pylist()) == Counter(
        f"{shards / f'{k}.tar'}#{i}.jpg" for k in range(6) for i in range(3))
    assert set(table.column("status").to_pylist()) == {"ok"}


def test_slow_down_and_dropped_connections_are_retried(ray_cluster, moto_endpoint, bucket, photos_on_s3,
                                                       tiny_checkpoint):
    with FaultProxy(moto_endpoint, Faults(slow_down=0.3, cut=0.05, seed=7)) as proxy:
        job = s3_job(bucket, proxy.endpoint, tiny_checkpoint)
        summary = run_label_job(job)
    assert proxy.counts["slow_down"] > 10 and proxy.counts["cut"] > 0  # the faults happened
    assert (summary.ok, summary.errors) == (len(photos_on_s3), 0)
    storage = StorageConfig(endpoint_url=moto_endpoint)
    assert rows_by_id(job.output, storage) == Counter(photos_on_s3)
    assert statuses(job.output, storage) == {"ok"}


def test_an_output_refusing_writes_for_20_s_is_retried_through(ray_cluster, moto_endpoint, bucket, photos_on_s3,
                                                               tiny_checkpoint):
    # 500 to every write for 20 s from the first data file on: botocore's standard mode backs off
    # and tries each request 10 times (StorageConfig.retries), about 80 s on average
    with FaultProxy(moto_endpoint, Faults(refuse_writes_for=20, refuse_after="/labels/data/")) as proxy:
        job = s3_job(bucket, proxy.endpoint, tiny_checkpoint)
        summary = run_label_job(job)
    assert proxy.counts["refused"] > 0
    assert (summary.ok, summary.errors) == (len(photos_on_s3), 0)
    assert rows_by_id(job.output, StorageConfig(endpoint_url=moto_endpoint)) == Counter(photos_on_s3)


def test_a_longer_outage_fails_with_a_clear_message_and_the_rerun_completes_once(
        ray_cluster, moto_endpoint, bucket, photos_on_s3, tiny_checkpoint):
    with FaultProxy(moto_endpoint, Faults(refuse_writes_for=600, refuse_after="/labels/data/")) as proxy:
        with pytest.raises(OutputError, match=r"the run stopped: storage failed after every retry of a request "
                                              r"\(OSError: .*internal error.*\)\. The rows written before are kept "
                                              r"and nothing is labelled twice: run the same command again"):
            run_label_job(s3_job(bucket, proxy.endpoint, tiny_checkpoint, retries=2))
        assert proxy.counts["refused"] > 0
    job = s3_job(bucket, moto_endpoint, tiny_checkpoint)
    rerun = run_label_job(job)
    assert (rerun.ok, rerun.errors) == (len(photos_on_s3), 0)
    assert rows_by_id(job.output, job.storage) == Counter(photos_on_s3)


def test_a_driver_killed_while_writing_its_run_record_is_repaired_by_the_rerun(
        ray_cluster, moto_endpoint, bucket, photos_on_s3, tiny_checkpoint, tmp_path, capsys):
    with FaultProxy(moto_endpoint, Faults(hold="/labels/_lgca/runs/")) as proxy:
        args = label_args([f"s3://{bucket}/photos/"], f"s3://{bucket}/labels", tiny_checkpoint,
                          "--endpoint-url", proxy.endpoint, "--address", ray_cluster)
        driver = lgca_process(args, tmp_path / "lgca.log")
        while not proxy.held.wait(1):  # the run record's upload has begun: every row is written
            assert driver.poll() is None, (tmp_path / "lgca.log").read_text()[-3000:]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    storage = StorageConfig(endpoint_url=moto_endpoint)
    assert Output(f"s3://{bucket}/labels", storage).runs() == []  # the record never arrived
    rerun = run_label_job(s3_job(bucket, moto_endpoint, tiny_checkpoint))
    assert (rerun.ok, rerun.errors, rerun.skipped) == (0, 0, len(photos_on_s3))
    assert rows_by_id(f"s3://{bucket}/labels", storage) == Counter(photos_on_s3)
    (record,) = Output(f"s3://{bucket}/labels", storage).runs()
    assert record["run_id"] == rerun.run_id and record["counts"]["skipped"] == len(photos_on_s3)
    capsys.readouterr()
    assert cli.main(["summary", f"s3://{bucket}/labels", "--endpoint-url", moto_endpoint]) == 0
    text = capsys.readouterr().out
    assert f"rows: {len(photos_on_s3)} ({len(photos_on_s3)} ok, 0 error)" in text and "runs (1):" in text
