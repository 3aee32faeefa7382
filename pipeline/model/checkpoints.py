"""Remote checkpoints in a local cache: fetched once per version, atomically, verified by size.

A checkpoint given as an fsspec URI (``s3://bucket/model.pt``) is copied to
``<cache>/checkpoints/<sha256(uri)[:16]>/<sha256(version)[:16]>/<basename>``, where the
version is the listing's size with its ETag or modification time: a checkpoint rewritten at
the same URI is fetched again, and the copy it replaces is deleted.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import fsspec

from pipeline.config import ConfigError, StorageConfig
from pipeline.storage import file_version, filesystem

_HASH_CHUNK = 1 << 20


def _cache_root(cache_dir: str) -> Path:
    """The cache directory, ``~/.cache/lgca`` when ``cache_dir`` is empty."""
    return Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "lgca"


def checkpoint_cache_path(uri: str, cache_dir: str, version: str) -> Path:
    """Where :func:`fetch_checkpoint` keeps ``version`` of ``uri``:
    ``<cache>/checkpoints/<sha256(uri)[:16]>/<sha256(version)[:16]>/<basename>``."""
    basename = PurePosixPath(uri.rstrip("/")).name
    uri_digest = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]
    version_digest = hashlib.sha256(version.encode("utf-8")).hexdigest()[:16]
    return _cache_root(cache_dir) / "checkpoints" / uri_digest / version_digest / basename


def _download(fs: fsspec.AbstractFileSystem, remote_path: str, target: Path, size: int) -> None:
    """Copy ``remote_path`` to a temp file beside ``target``, check its size, rename it atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(handle)
    temp = Path(temp_name)
    try:
        fs.get_file(remote_path, temp_name)
        got = temp.stat().st_size
        if got != size:
            raise OSError(f"download of {remote_path} is incomplete: {got} of {size} bytes; run again")
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _remove_other_versions(target: Path) -> None:
    """Delete the cached copies of the same URI other than ``target`` (replaced checkpoints)."""
    for other in target.parent.parent.iterdir():
        if other == target.parent:
            continue
        if other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
        else:  # a file cached by the layout without versions
            other.unlink(missing_ok=True)


def fetch_checkpoint(uri: str, cache_dir: str, storage: StorageConfig = StorageConfig()) -> Path:
    """Fetch the checkpoint at fsspec ``uri`` into the local cache and return its path.

    The cache is keyed on the remote file's version (:func:`~pipeline.data.sources.file_version`: size with ETag or modification time), so a checkpoint
    rewritten at the same URI is fetched again, and the copy it replaces is deleted. A store
    that gives neither an ETag nor a modification time has the file fetched on every call.
    ``storage`` says how to reach object storage.
    """
    fs, remote_path = filesystem(uri, storage)
    try:
        info = fs.info(remote_path)
    except FileNotFoundError:
        raise ConfigError(f"pretrained: checkpoint {uri} not found") from None
    size = info.get("size")
    if size is None:
        raise OSError(f"cannot tell the size of {uri}, so its download cannot be verified")
    version = file_version(info)
    if version is None:
        logging.getLogger(__name__).warning(
            "%s: the store gives no ETag or modification time, so the checkpoint is fetched again", uri)
    target = checkpoint_cache_path(uri, cache_dir, version or "unversioned")
    if version is None or not (target.is_file() and target.stat().st_size == size):
        _download(fs, remote_path, target, size)
        _remove_other_versions(target)
    return target


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
