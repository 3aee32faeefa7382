"""List and read the inputs of a run: loose image files, WebDataset tar shards, Parquet files.

Pure functions, no Ray: listing runs on the driver, and the ``read_*_batch``
functions are wrapped in ``map_batches`` by the plan module. Storage goes
through fsspec, so local paths, ``s3://`` (s3fs) and any other fsspec
protocol work alike.

Every reader produces columnar batches with the same columns:

* ``id`` (str): stable sample id. Loose files: the object URI
  (``s3://bucket/key``, or the absolute local path). Tar shards:
  ``"<tar uri>#<member path inside the tar>"``. Parquet: the id column's
  value as str, or ``"<parquet uri>#<row number>"`` when no id column is used.
* ``uri`` (str): the file the bytes came from (the image, tar or Parquet file).
* ``bytes`` (bytes | None): the encoded image, never decoded here.
* ``error`` (str | None): why there are no bytes. Formats:
  ``"read: <ExceptionType>: <message>"`` (a loose file could not be read),
  ``"tar: <ExceptionType>: <message>"`` (a shard is unreadable or corrupt; one
  row with id ``"<tar uri>#"`` after the members read before the damage),
  ``"parquet: <ExceptionType>: <message>"`` (same for a Parquet file, id
  ``"<parquet uri>#"``; also ``"parquet: column '<name>' not found; ..."`` and
  the like where a file lacks a named column), ``"parquet: null image in column
  '<name>'"`` and ``"parquet: null id in column '<name>'"`` (per row), ``"tar:
  member is a hard link to <name>; ..."`` (per linked image member).

Problems with the request itself (nothing matches) raise :class:`SourceError`
with the URI and what to do.
"""
from __future__ import annotations

import itertools
import os
import tarfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import GLOB_CHARS, SourceError, StorageConfig
from pipeline.storage import file_version, filesystem, full_uri

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHARD_EXTENSIONS = {"tar": (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"), "parquet": (".parquet",)}
ROW_COLUMNS = ("id", "uri", "bytes", "error")
_KIND_NAMES = {"files": "image files", "tar": "tar shards", "parquet": "Parquet files"}




def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def detect_kind(uri: str) -> str:
    """'tar' or 'parquet' for names ending in :data:`SHARD_EXTENSIONS` (files or globs), else 'files'."""
    lowered = uri.rstrip("/").lower()
    for kind, extensions in SHARD_EXTENSIONS.items():
        if lowered.endswith(extensions):
            return kind
    return "files"


def _target_info(fs: fsspec.AbstractFileSystem, name: str, info: dict) -> dict:
    """The listing record of a symlink's target; the link's own where the target is gone (reading
    it then gives the image or shard an error row)."""
    try:
        return fs.info(name)
    except OSError:
        return info


def _find_in_folder(fs: fsspec.AbstractFileSystem, path: str, walked: set[str] | None = None,
                    known: set[str] | None = None) -> dict[str, dict]:
    """Every file under folder ``path`` and its listing record, following symlinked folders
    (fsspec lists one as a single entry). A symlink is listed with its target's record: the
    link's own time would not tell a rewrite. Through a folder link, only files not listed
    already (by real path) are added, and each real folder is walked once, so a link into the
    same tree (``latest -> 2024``) or a cycle adds nothing; real paths are computed only when
    a folder link is found."""
    walked = walked if walked is not None else set()
    walked.add(os.path.realpath(path))
    found, links = {}, []
    for name, info in fs.find(path, detail=True).items():
        if info.get("islink"):
            info = _target_info(fs, name, info)
            if info["type"] == "directory":
                links.append(name)
                continue
        found[name] = info
    if known is not None:  # walking a link: keep only files not listed yet
        found = {name: info for name, info in found.items() if os.path.realpath(name) not in known}
    if links:
        known = known if known is not None else set()
        known.update(os.path.realpath(name) for name in found)
        for link in links:
            if os.path.realpath(link) not in walked:
                found.update(_find_in_folder(fs, link, walked, known))
    return found


def _find(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> dict[str, dict]:
    """The files at ``path`` (a file, a folder or prefix searched recursively, or else a glob) and
    fsspec's listing record of each. A path that exists is taken literally (``photos [2020]``)."""
    if fs.isfile(path):
        return {path: fs.info(path)}
    if fs.isdir(path):
        return _find_in_folder(fs, path)
    if any(char in path for char in GLOB_CHARS):
        return {name: info for name, info in fs.glob(path, detail=True).items() if info["type"] == "file"}
    raise SourceError(f"{uri}: no such file, folder or prefix")


def _other_formats(fs: fsspec.AbstractFileSystem, names: list[str], extensions: tuple[str, ...]) -> str:
    """For a listing without the files looked for: the files in it that another ``--input-format``
    reads (up to 3 named a kind) and that option, as the end of a message; '' where there are none."""
    held = {}
    for kind, kind_extensions in {"files": IMAGE_EXTENSIONS, **SHARD_EXTENSIONS}.items():
        matching = sorted(name for name in names if name.lower().endswith(kind_extensions))
        if kind_extensions != extensions and matching:
            shown = ", ".join(full_uri(fs, name) for name in matching[:3]) + (", ..." if len(matching) > 3 else "")
            held[kind] = f"{_KIND_NAMES[kind]} ({len(matching)}: {shown})"
    if not held:
        return ""
    return f"; it holds {' and '.join(held.values())}: pass --input-format {' or '.join(held)}"


def _list_matching(uri: str, storage: StorageConfig, extensions: tuple[str, ...], what: str,
                   versions: bool = False) -> list[tuple[str, str | None]]:
    """Full URIs, sorted, of the files at ``uri`` whose names end with ``extensions`` (any
    case), each with its :func:`file_version` when ``versions`` is set (else None). ``uri`` is a
    single file, a folder or prefix (searched recursively), or a glob (``*``, ``?``,
    ``[...]``, ``**``; matches files only).
    """
    fs, path = filesystem(uri, storage)
    fs.invalidate_cache()  # listings must reflect the store now, not an earlier listing
    try:
        found = _find(fs, path, uri)
    finally:
        fs.invalidate_cache()  # s3fs keeps an info dict per listed object (~3 KB) for the process's life
    matching = [(full_uri(fs, name), file_version(info) if versions else None) for name, info in found.items()
                if name.lower().endswith(extensions)]
    if not matching:
        raise SourceError(f"{uri}: no {what} found (looked for names ending in {', '.join(extensions)}, "
                          f"any case, among {len(found)} files){_other_formats(fs, list(found), extensions)}")
    del found  # the listing records (several hundred bytes a file) are not kept while sorting
    matching.sort(key=lambda pair: pair[0])
    return matching


def list_image_files(uri: str, storage: StorageConfig) -> Iterator[str]:
    """Image files (by :data:`IMAGE_EXTENSIONS`) at ``uri``, as full URIs in sorted order.

    Listing happens on the call, so a missing location or an empty match
    raises :class:`SourceError` right away.
    """
    return iter([name for name, _ in _list_matching(uri, storage, IMAGE_EXTENSIONS, "image files")])


def list_shard_versions(uri: str, kind: str, storage: StorageConfig) -> list[tuple[str, str | None]]:
    """Tar (``kind='tar'``) or Parquet (``kind='parquet'``) files at ``uri``: sorted full URIs,
    each with its :func:`file_version`."""
    if kind not in SHARD_EXTENSIONS:
        raise SourceError(f"kind: {kind!r} is not one of {', '.join(SHARD_EXTENSIONS)}")
    return _list_matching(uri, storage, SHARD_EXTENSIONS[kind], f"{kind} shards", versions=True)


def list_shards(uri: str, kind: str, storage: StorageConfig) -> list[str]:
    """Tar (``kind='tar'``) or Parquet (``kind='parquet'``) files at ``uri``, sorted full URIs."""
    return [name for name, _ in list_shard_versions(uri, kind, storage)]


def _empty_columns() -> dict[str, list]:
    return {name: [] for name in ROW_COLUMNS}


def _append_row(columns: dict[str, list], row: dict) -> None:
    for name in ROW_COLUMNS:
        columns[name].append(row[name])


def read_file(uri: str, storage: StorageConfig) -> tuple[bytes | None, str | None]:
    """The bytes of one file, or None and a ``read:`` error."""
    fs, path = filesystem(uri, storage)
    try:
        return fs.cat_file(path), None
    except OSError as exc:  # missing, forbidden, a folder, I/O failure (s3fs maps S3 errors to OSError)
        return None, f"read: {_describe(exc)}"


def read_files_batch(batch: dict, storage: StorageConfig, threads: int = 16) -> dict[str, list]:
    """Read the loose files named in column ``uri``; one row per input row, in order.

    Files are fetched by up to ``threads`` threads, which overlaps object-store
    latency. ``id`` is the URI as given.
    """
    uris = [str(uri) for uri in batch["uri"]]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
        results = list(pool.map(lambda uri: read_file(uri, storage), uris))
    return {
        "id": list(uris),
        "uri": list(uris),
        "bytes": [data for data, _ in results],
        "error": [error for _, error in results],
    }


def iter_tar_rows(tar_uri: str, storage: StorageConfig, batch_rows: int = 256) -> Iterator[dict[str, list]]:
    """Stream a (WebDataset) tar shard as columnar batches of up to ``batch_rows`` rows, like
    :func:`iter_parquet_rows`; see :func:`_tar_members` for the rows."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    members = _tar_members(tar_uri, storage)
    while chunk := list(itertools.islice(members, batch_rows)):
        yield {name: [row[name] for row in chunk] for name in ROW_COLUMNS}


def _tar_members(tar_uri: str, storage: StorageConfig) -> Iterator[dict]:
    """Stream the image members of a (WebDataset) tar shard as rows; never raises for bad shards.

    Members are read in archive order with ``tarfile`` in stream mode
    (``r|*``, so gzip/bz2/xz shards work too); non-image members such as
    ``000001.json`` are skipped. A hard or symbolic link named like an image
    gets an error row: stream mode cannot go back for the member it names.
    An unreadable or corrupt shard ends with one error row
    ``{'id': '<tar uri>#', 'error': 'tar: ...'}`` after the members read so
    far. A shard cut exactly at a member boundary cannot be told from a
    complete one by ``tarfile``.
    """
    fs, path = filesystem(tar_uri, storage)
    try:
        with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as archive:
            for member in archive:
                if not member.name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                row = {"id": f"{tar_uri}#{member.name}", "uri": tar_uri, "bytes": None, "error": None}
                if member.isfile():
                    row["bytes"] = archive.extractfile(member).read()  # type: ignore[union-attr]
                elif member.islnk() or member.issym():
                    link = "hard link" if member.islnk() else "symbolic link"
                    row["error"] = f"tar: member is a {link} to {member.linkname}; store the file itself"
                else:
                    continue  # a folder or device named like an image holds none
                yield row
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        yield {"id": f"{tar_uri}#", "uri": tar_uri, "bytes": None, "error": f"tar: {_describe(exc)}"}


def _is_binary(data_type: pa.DataType) -> bool:
    return (pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type)
            or pa.types.is_fixed_size_binary(data_type) or pa.types.is_binary_view(data_type))


_COLUMN_FIXES = {"image": "pass --image-column with the column of image bytes",
                 "id": "pass --id-column with the column of image ids, or --id-column '' to number rows by "
                       "file and position"}


def _column_problem(schema: pa.Schema, image_column: str, id_column: str) -> str | None:
    """Why a file with ``schema`` cannot be read with these columns (a missing or wrongly typed
    column, and what to pass), or None."""
    for role, name in (("image", image_column), ("id", id_column)):
        if name and name not in schema.names:
            return f"column {name!r} not found; available: {', '.join(schema.names)}; {_COLUMN_FIXES[role]}"
    image_type = schema.field(image_column).type
    is_struct_with_bytes = pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0
    if not (_is_binary(image_type) or is_struct_with_bytes):
        return f"image column {image_column!r} has type {image_type}; expected binary or a struct with a 'bytes' field"
    return None


def check_parquet_columns(uri: str, storage: StorageConfig, image_column: str, id_column: str) -> None:
    """Raise SourceError when the Parquet file at ``uri`` lacks these columns (its footer only is
    read). The driver checks one file before Ray starts, so that the usual mistake (the default
    id column on a dataset without one) costs no cluster; any other file that differs becomes
    an error row. An unreadable file is left to its read task."""
    fs, path = filesystem(uri, storage)
    try:
        with fs.open(path, "rb") as handle:
            schema = pq.ParquetFile(handle).schema_arrow
    except (OSError, pa.ArrowInvalid):
        return
    problem = _column_problem(schema, image_column, id_column)
    if problem:
        raise SourceError(f"{uri}: {problem}")


def _id_text(key: object) -> str:
    """An id column value as text; bytes as UTF-8, or as hex where they are not UTF-8."""
    if isinstance(key, bytes):
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:
            return key.hex()
    return str(key)


def _parquet_batch(uri: str, record_batch: pa.RecordBatch, image_column: str, id_column: str,
                   first_row: int) -> dict[str, list]:
    """Rows of one record batch; ``first_row`` is the file-wide number of its first row."""
    images = record_batch.column(image_column)
    if pa.types.is_struct(images.type):
        images = pc.struct_field(images, "bytes")
    blobs = images.to_pylist()
    keys = record_batch.column(id_column).to_pylist() if id_column else [None] * len(blobs)
    columns = _empty_columns()
    for offset, (key, blob) in enumerate(zip(keys, blobs)):
        row_id, error = (_id_text(key) if key is not None else f"{uri}#{first_row + offset}"), None
        if id_column and key is None:
            error = f"parquet: null id in column {id_column!r}"
        elif blob is None:
            error = f"parquet: null image in column {image_column!r}"
        _append_row(columns, {"id": row_id, "uri": uri, "bytes": None if error else blob, "error": error})
    return columns


def iter_parquet_rows(uri: str, storage: StorageConfig, image_column: str = "image", id_column: str = "id",
                      batch_rows: int = 256) -> Iterator[dict[str, list]]:
    """Stream a Parquet file as columnar batches of up to ``batch_rows`` rows.

    ``image_column`` is binary, or a struct with a ``bytes`` field (Hugging
    Face ``datasets`` Image). ``id_column`` values become ids (as str, bytes
    decoded by :func:`_id_text`); with ``id_column=''`` ids are
    ``"<uri>#<row number>"``. A file lacking a named column, or unreadable or
    corrupt, yields one ``parquet:`` error row with id ``"<uri>#"`` after the
    rows read so far, so one odd file does not stop a run.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    fs, path = filesystem(uri, storage)
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            problem = _column_problem(parquet.schema_arrow, image_column, id_column)
            if problem:
                yield {"id": [f"{uri}#"], "uri": [uri], "bytes": [None], "error": [f"parquet: {problem}"]}
                return
            columns = [image_column] + ([id_column] if id_column else [])
            first_row = 0
            for record_batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                yield _parquet_batch(uri, record_batch, image_column, id_column, first_row)
                first_row += record_batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        yield {"id": [f"{uri}#"], "uri": [uri], "bytes": [None], "error": [f"parquet: {_describe(exc)}"]}
