"""Pieces of the Ray Data plan that run without a cluster."""
from __future__ import annotations

import numpy as np

from pipeline.plan import FILES_PER_READ, RunFiles, WorkList, drop_done, work_items, worker_env
from pipeline.sink import DoneIds, id_digests


def test_drop_done_keeps_only_new_rows():
    done = DoneIds(np.unique(id_digests(["t.tar#1.jpg", "t.tar#3.jpg"])))
    batch = {"id": ["t.tar#1.jpg", "t.tar#2.jpg", "t.tar#3.jpg"], "bytes": [b"1", b"2", b"3"]}
    kept = drop_done(batch, done)
    assert kept == {"id": ["t.tar#2.jpg"], "bytes": [b"2"]}


def test_work_items_group_files_and_keep_shards_alone():
    work = WorkList(files=tuple(f"f{i}.jpg" for i in range(FILES_PER_READ + 3)), tars=("a.tar",),
                    parquets=("p.parquet", "q.parquet"))
    items = work_items(work)
    assert [(i["kind"], len(i["uris"])) for i in items] == [
        ("files", FILES_PER_READ), ("files", 3), ("tar", 1), ("parquet", 1), ("parquet", 1)]
    assert [u for i in items if i["kind"] == "files" for u in i["uris"]] == list(work.files)


def test_file_names_carry_the_run_id_and_write_uuid():
    name = RunFiles("20261125T000000Z-abcdef").get_filename_for_task("uuid42", 7)
    assert name == "20261125T000000Z-abcdef_uuid42_000007.parquet"


def test_worker_env_forwards_aws_settings_only(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    assert worker_env() == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_PROFILE", "lab")
    monkeypatch.setenv("HOME_SECRET", "not forwarded")
    assert worker_env() == {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
                                                         "AWS_PROFILE": "lab"}}}
