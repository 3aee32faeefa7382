"""Pieces of the Ray Data plan that run without a cluster."""
from __future__ import annotations

import numpy as np

from skimage import data as photos

from pipeline.config import InputConfig, LabelJob, TextConfig
from pipeline.data.output import IdSet, Output, id_digests
from pipeline.distributed.plan import (FILES_PER_READ, RunFiles, WorkList, drop_done, read_items, remote_env,
                                       work_items)
from tests.support import encode, make_tar


def test_drop_done_keeps_only_new_rows():
    done = IdSet(np.unique(id_digests(["t.tar#1.jpg", "t.tar#3.jpg"])))
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


def test_tasks_and_actors_get_the_aws_settings_never_the_credentials(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    assert remote_env() == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "10")
    monkeypatch.setenv("AWS_PROFILE", "lab")  # a profile of this machine
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FQoGZXIvYXdzE")
    monkeypatch.setenv("HOME_SECRET", "not forwarded")
    assert remote_env() == {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
                                                         "AWS_MAX_ATTEMPTS": "10"}}}


def test_shards_are_marked_whole_or_broken_and_one_break_outweighs_a_whole_reading(tmp_path):
    whole = make_tar({"1.jpg": encode(photos.astronaut()), "2.jpg": encode(photos.coffee())})
    for name in ("a.tar", "again.tar"):
        (tmp_path / name).write_bytes(whole)
    (tmp_path / "cut.tar").write_bytes(whole[:len(whole) // 2])  # breaks off inside 2.jpg
    (tmp_path / "x.jpg").write_bytes(encode(photos.rocket()))
    uris = [str(tmp_path / name) for name in ("a.tar", "cut.tar", "again.tar", "x.jpg")]
    job = LabelJob(inputs=InputConfig((str(tmp_path),)), output=str(tmp_path / "out"), text=TextConfig(classes="a,b"))
    marks = Output(job.output, job.storage).marks("r1")
    marks.create()
    marks.mark(uris[1], whole=True)  # an earlier attempt of the same read task read it whole
    marks.mark(uris[2], whole=False)  # an earlier attempt broke off (its rows may be the ones kept)
    done = IdSet(np.unique(id_digests([f"{uris[0]}#1.jpg"])))
    batch = {"kind": np.array(["tar", "tar", "tar", "files"]), "uris": [np.array([u]) for u in uris]}
    rows = [i for piece in read_items(batch, job, done, marks) for i in piece["id"]]
    assert rows == [f"{uris[0]}#2.jpg", f"{uris[1]}#1.jpg", f"{uris[1]}#", f"{uris[2]}#1.jpg", f"{uris[2]}#2.jpg",
                    uris[3]]
    assert marks.marked(uris) == [True, False, False, False]  # loose files are never marked
