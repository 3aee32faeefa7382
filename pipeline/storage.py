"""Storage: one way to reach local folders, S3 and any fsspec store, for inputs and outputs alike.

A URI's filesystem and path, a listed file's version, folder listing and removal, JSON and
bytes written to a URI, and the one rule for which environment settings travel to workers
(:func:`worker_env`) and which values never appear in a message (:func:`redact`).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, TypeVar

import fsspec
import pyarrow.parquet as pq
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


@contextlib.contextmanager
def parquet_file(fs: Any, path: str) -> Iterator[pq.ParquetFile]:
    """A Parquet file of ``fs`` opened for reading: memory-mapped when local (no copy through a
    Python file object: reading the states of ``lgca search`` 1.4x as fast), else through ``fs``."""
    if isinstance(fs, LocalFileSystem):
        yield pq.ParquetFile(path, memory_map=True)
        return
    with fs.open(path, "rb") as handle:
        yield pq.ParquetFile(handle)


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


def write_whole(uri: str, write: Callable[[IO], None], storage: StorageConfig, mode: str = "wb") -> None:
    """Write a file with ``write(handle)`` (parents created), whole or not at all: an object
    store shows an upload only once it is complete; on a local disk the file is written under
    a temporary name (``.<name>.<hex>.tmp``, which no reader of the folder lists) and renamed,
    so a process killed while writing leaves the previous version (or none), never a cut file."""
    fs, path = filesystem(uri, storage)
    folder, name = path.rsplit("/", 1)
    fs.makedirs(folder, exist_ok=True)
    local = isinstance(fs, LocalFileSystem)
    target = f"{folder}/.{name}.{secrets.token_hex(4)}.tmp" if local else path
    try:
        with fs.open(target, mode) as handle:
            write(handle)
    except BaseException:
        if local and os.path.exists(target):
            os.remove(target)  # a failed write leaves nothing (a killed one leaves a .tmp no reader lists)
        raise
    if local:
        os.replace(target, path)


def write_json(uri: str, content: dict[str, Any], storage: StorageConfig) -> None:
    """Write ``content`` as indented JSON, whole or not at all (see :func:`write_whole`)."""
    write_whole(uri, lambda handle: json.dump(content, handle, indent=2, sort_keys=True), storage, "w")


def write_text(uri: str, text: str, storage: StorageConfig) -> None:
    """Write ``text`` (UTF-8) to a local path or fsspec URL, whole or not at all (:func:`write_whole`)."""
    write_whole(uri, lambda handle: handle.write(text.encode("utf-8")), storage)


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


def open_output(uri: str, storage: StorageConfig, mode: str = "wb", **options: Any) -> Any:
    """Open a file (local path or fsspec URI) for writing, creating its folder: how this package
    writes a file that is not a data file as it goes (reports, pictures, exports; see
    :func:`write_whole` for records that must never be seen cut). ``options`` go to ``fs.open``."""
    fs, path = filesystem(uri, storage)
    if "/" in path:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    return fs.open(path, mode, **options)


# -- what travels to Ray workers ------------------------------------------------------------

TRAVELLING_PREFIX = "AWS_"  # object-storage settings: endpoint, region, retries, checksums ...
SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD")  # a variable whose name holds one holds a secret
# Credentials besides the secrets: an access key id is useless (and breaks botocore's chain
# with a PartialCredentialsError) without its secret key, so the two travel together or not.
CREDENTIAL_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_CREDENTIAL_EXPIRATION")
# Settings that name something of this machine, never the cluster's: a profile the nodes may
# not have (a job spec's `profile` names one they have), the identity of a web-identity token
# file, this machine's metadata and container-credential endpoints, local files.
LOCAL_PREFIXES = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CA_BUNDLE", "AWS_CONTAINER_", "AWS_ROLE_ARN",
                  "AWS_ROLE_SESSION_NAME", "AWS_EC2_METADATA_", "AWS_METADATA_SERVICE_")
LOCAL_SUFFIXES = ("_FILE",)
REDACTED = "***"
SHORTEST_REDACTED = 8  # shorter values (moto's "testing") are too common a word to replace in text


def is_secret(name: str) -> bool:
    """Whether environment variable ``name`` holds a secret (its name holds TOKEN, SECRET or PASSWORD)."""
    return any(marker in name.upper() for marker in SECRET_MARKERS)


def is_credential(name: str) -> bool:
    """Whether ``name`` is a credential: a secret, or an access key id and its expiry."""
    return is_secret(name) or name.upper() in CREDENTIAL_NAMES


def worker_env(environ: Mapping[str, str], credentials: bool = False) -> dict[str, str]:
    """The environment variables of ``environ`` that go to Ray workers, the one rule of
    ``lgca label`` (task and actor runtime_env), ``lgca relabel`` and ``lgca submit`` (the
    job's runtime_env).

    The ``AWS_*`` settings travel (endpoint, region, retry mode and attempts, checksums),
    except those naming something of this machine (:data:`LOCAL_PREFIXES`, ``*_FILE``).
    Credentials (:func:`is_credential`) travel only with ``credentials=True``: Ray writes a
    runtime_env to its logs (``ray-data.log``, ``runtime_env_agent.log``) and the dashboard
    shows a job's to whoever reaches it. Without them, workers use their node's own
    credentials: a local Ray started by the driver gives its workers the driver's environment;
    cluster nodes have an instance profile or a Kubernetes Secret (docs/operations.md).
    """
    return {name: value for name, value in environ.items()
            if name.startswith(TRAVELLING_PREFIX) and not name.startswith(LOCAL_PREFIXES)
            and not name.endswith(LOCAL_SUFFIXES) and (credentials or not is_credential(name))}


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with the value of every secret variable of ``environ`` (default: this process's
    environment) replaced by ``***``, for messages that quote what a library said (error rows,
    errors printed by ``lgca``)."""
    environ = os.environ if environ is None else environ
    for name, value in environ.items():
        if len(value) >= SHORTEST_REDACTED and is_secret(name) and value in text:
            text = text.replace(value, REDACTED)
    return text
