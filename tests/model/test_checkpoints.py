"""Tests of pipeline.model.checkpoints: the local cache of remote checkpoints, on local files and a local S3 server."""
from __future__ import annotations

import os

import fsspec.implementations.local
import pytest

from pipeline.config import ConfigError, StorageConfig
from pipeline.model.checkpoints import checkpoint_cache_path, fetch_checkpoint
from tests.support import s3_client

CONTENT = bytes(range(256)) * 64  # a checkpoint's bytes: the cache does not look inside


def test_a_rewritten_checkpoint_of_the_same_size_is_fetched_again_and_the_old_copy_removed(tmp_path):
    remote = tmp_path / "remote" / "model.pt"
    remote.parent.mkdir()
    remote.write_bytes(CONTENT)
    uri = f"file://{remote}"
    first = fetch_checkpoint(uri, str(tmp_path / "cache"))
    assert first.read_bytes() == CONTENT and first.name == "model.pt"
    assert fetch_checkpoint(uri, str(tmp_path / "cache")) == first  # the same version: the cached copy
    mtime = remote.stat().st_mtime_ns
    remote.write_bytes(CONTENT[::-1])  # retrained: the same size
    os.utime(remote, ns=(mtime + 10**9, mtime + 10**9))  # a later write, however coarse the clock
    second = fetch_checkpoint(uri, str(tmp_path / "cache"))
    assert second != first and second.read_bytes() == CONTENT[::-1]
    assert not first.parent.exists() and [p.name for p in second.parent.parent.iterdir()] == [second.parent.name]
    assert second == checkpoint_cache_path(uri, str(tmp_path / "cache"), f"{len(CONTENT)}:{remote.stat().st_mtime}")


def test_a_checkpoint_without_version_is_fetched_every_time(tmp_path, monkeypatch, caplog):
    remote = tmp_path / "model.pt"
    remote.write_bytes(CONTENT)
    local = fsspec.implementations.local.LocalFileSystem
    info = local.info
    monkeypatch.setattr(local, "info", lambda self, path, **kw: {
        k: v for k, v in info(self, path, **kw).items() if k in ("name", "size", "type")})
    first = fetch_checkpoint(f"file://{remote}", str(tmp_path / "cache"))
    inode = first.stat().st_ino
    assert fetch_checkpoint(f"file://{remote}", str(tmp_path / "cache")) == first
    assert first.stat().st_ino != inode and first.read_bytes() == CONTENT  # fetched again
    assert "no ETag or modification time" in caplog.text


def test_a_truncated_cache_file_is_replaced_and_a_missing_checkpoint_named(tmp_path, moto_endpoint, bucket):
    s3_client(moto_endpoint).put_object(Bucket=bucket, Key="model.pt", Body=CONTENT)
    options = StorageConfig(endpoint_url=moto_endpoint)
    cached = fetch_checkpoint(f"s3://{bucket}/model.pt", str(tmp_path), options)
    cached.write_bytes(CONTENT[:100])
    path = fetch_checkpoint(f"s3://{bucket}/model.pt", str(tmp_path), options)
    assert path == cached and path.read_bytes() == CONTENT
    with pytest.raises(ConfigError, match=f"checkpoint s3://{bucket}/absent.pt not found"):
        fetch_checkpoint(f"s3://{bucket}/absent.pt", str(tmp_path), options)
