"""Storage: one way to reach local folders, S3 and any fsspec store, for inputs and outputs alike.

A URI's filesystem and path, a listed file's version, folder listing and removal, JSON and
bytes written to a URI, and the one rule for which environment settings travel to workers.
"""
from __future__ import annotations

import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import StorageConfig

T = TypeVar("T")


def filesystem(uri: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem serving ``uri`` and the path on it (protocol stripped; absolute for local).

    ``::`` is part of a name here, not an fsspec URL chain: ``s3://b/c::d.jpg`` is that object.
    fsspec keeps one filesystem per protocol and options, so calls are cheap.
    """
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    options = {**fsspec.get_filesystem_class(protocol)._get_kwargs_from_urls(uri), **storage.storage_options(protocol)}
    fs = fsspec.filesystem(protocol, **options)
    return fs, fs._strip_protocol(uri)


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI ids are made of: the absolute path for local files, ``proto://path`` otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


VERSION_KEYS = ("ETag", "etag", "mtime", "LastModified", "Last-Modified", "updated", "last_modified")


def file_version(info: dict) -> str | None:
    """What tells one version of a listed file from another: its size and its ETag where the
    store gives one (S3, GCS), else its modification time; None where the listing has neither
    a size nor one of these (such a file is never taken as unchanged)."""
    if info.get("size") is None:
        return None
    for key in VERSION_KEYS:
        if info.get(key) not in (None, ""):
            return f"{info['size']}:{info[key]}"
    return None


def remove_folder(uri: str, storage: StorageConfig) -> bool:
    """Remove folder ``uri`` and everything in it; False where there was none."""
    fs, path = filesystem(uri, storage)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        return False
    return True


def list_folder(fs: Any, path: str) -> list[str]:
    """The paths in folder ``path`` as the store holds them now (not a listing s3fs cached
    earlier), sorted; none where the folder does not exist."""
    fs.invalidate_cache(path)
    try:
        return sorted(fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def read_json(uri: str, storage: StorageConfig) -> dict[str, Any] | None:
    """A JSON file's content, or None when it does not exist."""
    fs, path = filesystem(uri, storage)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as handle:
        return json.load(handle)


def write_json(uri: str, content: dict[str, Any], storage: StorageConfig) -> None:
    """Write ``content`` as indented JSON (parents created)."""
    with open_output(uri, storage, "w") as handle:
        json.dump(content, handle, indent=2, sort_keys=True)


def write_text(uri: str, text: str, storage: StorageConfig) -> None:
    """Write ``text`` (UTF-8) to a local path or fsspec URL; a local file's folders are created."""
    fs, path = filesystem(uri, storage)
    if isinstance(fs, LocalFileSystem) and "/" in path:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def read_ahead(read: Callable[[T], Any], items: Iterable[T], threads: int) -> Iterator[tuple[T, Future]]:
    """``(item, future of read(item))`` for each of ``items``, in order, with ``threads`` reads
    running at once and at most twice as many finished ahead of the caller, so memory stays
    bounded however many items there are. On an error or an early stop, queued reads are
    dropped rather than waited for."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lgca-read-ahead")
    try:
        ahead: deque[tuple[T, Future]] = deque()
        for item in items:
            ahead.append((item, pool.submit(read, item)))
            if len(ahead) >= 2 * threads:
                yield ahead.popleft()
        while ahead:
            yield ahead.popleft()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def open_output(uri: str, storage: StorageConfig, mode: str = "wb") -> Any:
    """Open a file (local path or fsspec URI) for writing, creating its folder: the one way
    this package writes a file that is not a data file (JSON records, reports, pictures)."""
    fs, path = filesystem(uri, storage)
    if "/" in path:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    return fs.open(path, mode)
