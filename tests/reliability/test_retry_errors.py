"""``lgca label --retry-errors``: error rows of transient stages are labelled again, and afterwards
every id has one row, the new one, for every reader (lgca query, lgca summary, pyarrow, DuckDB),
on a local disk and on the loopback S3; a run stopped after taking the rows out leaves them to
the next run. pipeline/data/retry.py's own tests kill the replacement before each of its steps."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from pipeline import cli
from pipeline.config import (ConfigError, InputConfig, LabelJob, ModelConfig, ResourceConfig, ScoringParams,
                             StorageConfig, TextConfig)
from pipeline.data.output import Output
from pipeline.distributed import plan
from pipeline.distributed.job import run_label_job
from pipeline.storage import filesystem
from tests.faults import FaultProxy, Faults
from tests.reliability.common import CLASSES, photo_bytes
from tests.support import make_tar, upload


def make_job(inputs: tuple[str, ...], output: str, checkpoint: Path, storage: StorageConfig = StorageConfig(),
             retry_errors: str = "") -> LabelJob:
    return LabelJob(inputs=InputConfig(inputs), output=output, text=TextConfig(classes=CLASSES),
                    model=ModelConfig(name="lgca-tiny", pretrained=str(checkpoint), device="cpu"),
                    scoring=ScoringParams(crops=8, steps=1, expand_top=2), resources=ResourceConfig(batch_size=2),
                    storage=storage, retry_errors=retry_errors)


def rows_of_every_reader(output: str, storage: StorageConfig, capsys) -> dict[str, Counter]:
    """``Counter((id, status))`` of the output's rows as each reader sees them: pyarrow and DuckDB
    over every file in data/, and ``lgca query``; and ``lgca summary``'s row counts."""
    fs, data = filesystem(Output(output, storage).data, storage)
    plain = ds.dataset(data, format="parquet", filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)))
    table = plain.to_table(columns=["id", "status"])
    seen = {"pyarrow": Counter(zip(table.column("id").to_pylist(), table.column("status").to_pylist()))}
    con = duckdb.connect()
    con.register("everything", plain)
    seen["duckdb"] = Counter(con.execute("SELECT id, status FROM everything").fetchall())
    flags = ["--endpoint-url", storage.endpoint_url] if storage.endpoint_url else []
    capsys.readouterr()
    assert cli.main(["query", output, "SELECT id, status FROM labels", "--format", "json", *flags]) == 0
    seen["lgca query"] = Counter((row["id"], row["status"]) for row in
                                 map(json.loads, capsys.readouterr().out.splitlines()))
    assert cli.main(["summary", output, "--json", *flags]) == 0
    summary = json.loads(capsys.readouterr().out)
    seen["lgca summary"] = Counter({("ok", "rows"): summary["ok"], ("error", "rows"): summary["errors"]})
    return seen


def test_read_errors_are_labelled_again_on_a_local_disk(ray_cluster, tiny_checkpoint, tmp_path, monkeypatch,
                                                        capsys):
    images, later = tmp_path / "images", tmp_path / "arrives-later.jpg"
    images.mkdir()
    for i, payload in enumerate(photo_bytes(3)):
        (images / f"{i}.jpg").write_bytes(payload)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a photo")
    (images / "late.jpg").symlink_to(later)  # its target is missing: a read error
    job = make_job((str(images),), str(tmp_path / "labels"), tiny_checkpoint)
    first = run_label_job(job)
    assert (first.ok, first.error_reasons) == (3, {"read": 1, "decode": 1})

    later.write_bytes(photo_bytes(1, shift=5)[0])  # the file is there now
    with pytest.raises(ConfigError, match="retry_errors: 'raed' is no stage of an error row"):
        run_label_job(replace(job, retry_errors="raed"))

    def stopped(*args, **kwargs):
        raise RuntimeError("the run stopped before writing")

    monkeypatch.setattr(plan, "write", stopped)  # taken out, then stopped: the next run must label them
    with pytest.raises(RuntimeError, match="before writing"):
        run_label_job(replace(job, retry_errors="read"))
    monkeypatch.undo()
    late = str(images / "late.jpg")
    assert late not in {row_id for row_id, _ in rows_of_every_reader(job.output, job.storage, capsys)["pyarrow"]}
    second = run_label_job(job)  # a plain run, without --retry-errors
    assert (second.ok, second.errors, second.skipped) == (1, 0, 4)

    third = run_label_job(replace(job, retry_errors="decode"))  # a listed stage; still undecodable
    assert (third.retried, third.ok, third.error_reasons) == (1, 0, {"decode": 1})
    expected = Counter({(str(images / f"{i}.jpg"), "ok"): 1 for i in range(3)})
    expected.update({(late, "ok"): 1, (str(images / "broken.jpg"), "error"): 1})
    seen = rows_of_every_reader(job.output, job.storage, capsys)
    assert seen.pop("lgca summary") == Counter({("ok", "rows"): 4, ("error", "rows"): 1})
    assert seen == {"pyarrow": expected, "duckdb": expected, "lgca query": expected}
    record = json.loads((tmp_path / "labels" / "_lgca" / "runs" / f"{third.run_id}.json").read_text())
    assert record["retry_errors"] == {"stages": ["decode"], "rows": 1}
    assert not (tmp_path / "labels" / "_lgca" / "retry").exists() or not any((tmp_path / "labels" / "_lgca" /
                                                                              "retry").iterdir())


def test_read_and_shard_errors_are_labelled_again_on_s3(ray_cluster, moto_endpoint, bucket, tiny_checkpoint,
                                                        capsys):
    objects = {f"photos/{i}.jpg": payload for i, payload in enumerate(photo_bytes(3))}
    objects["photos/flaky.jpg"] = photo_bytes(1, shift=5)[0]
    members = dict(enumerate(photo_bytes(4, shift=9)))
    objects["shards/good.tar"] = make_tar({f"{i}.jpg": members[i] for i in (0, 1)})
    objects["shards/flaky.tar"] = make_tar({f"{i}.jpg": members[i] for i in (2, 3)})
    upload(moto_endpoint, bucket, objects)
    inputs = (f"s3://{bucket}/photos/", f"s3://{bucket}/shards/*.tar")
    output = f"s3://{bucket}/labels"
    with FaultProxy(moto_endpoint, Faults(deny="flaky")) as proxy:  # 403 to reads of the flaky ones
        first = run_label_job(make_job(inputs, output, tiny_checkpoint, StorageConfig(endpoint_url=proxy.endpoint)))
    assert (first.ok, first.error_reasons) == (5, {"read": 1, "tar": 1})
    assert proxy.counts["denied"] >= 2

    storage = StorageConfig(endpoint_url=moto_endpoint)
    again = run_label_job(make_job(inputs, output, tiny_checkpoint, storage, retry_errors="read,tar"))
    assert (again.retried, again.ok, again.errors, again.skipped_shards) == (2, 3, 0, 1)  # good.tar not read
    expected = Counter({(f"s3://{bucket}/photos/{name}.jpg", "ok"): 1 for name in ("0", "1", "2", "flaky")})
    expected.update({(f"s3://{bucket}/shards/{shard}.tar#{i}.jpg", "ok"): 1
                     for shard, numbers in (("good", (0, 1)), ("flaky", (2, 3))) for i in numbers})
    seen = rows_of_every_reader(output, storage, capsys)
    assert seen.pop("lgca summary") == Counter({("ok", "rows"): 8, ("error", "rows"): 0})
    assert seen == {"pyarrow": expected, "duckdb": expected, "lgca query": expected}
    assert run_label_job(make_job(inputs, output, tiny_checkpoint, storage)).skipped_shards == 2  # both recorded
