"""Small JPEG thumbnails of labelled images, as ``data:`` URIs for a self-contained HTML page.

Only the images asked for are read, from their rows' ``uri`` (local or any fsspec URL), with
bounded concurrency (:func:`pipeline.storage.read_ahead`): a loose file is one read; the
members of one tar shard are found in one pass over the shard (tar has no index, and the
pass stops once every member asked for has been seen). An image that cannot be shown (gone,
unreadable, no longer decodable, inside a Parquet input) gets a grey placeholder and the
reason, never an exception.
"""
from __future__ import annotations

import base64
import functools
import io
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

from pipeline.config import StorageConfig
from pipeline.data.decode import DecodeLimits, decode_image
from pipeline.data.sources import detect_kind, iter_tar_rows, read_file
from pipeline.storage import read_ahead

THUMB_SIZE = 160  # longest side of a thumbnail, in pixels
JPEG_QUALITY = 70
READ_THREADS = 8  # files or shards read at once
PLACEHOLDER_COLOUR = (200, 200, 200)
PARQUET_REASON = "inside a Parquet input: thumbnails are read from image files and tar shards only"


@dataclass(frozen=True)
class ImageRef:
    """An image to show: its row's ``id`` and ``uri``."""

    image_id: str
    uri: str


@dataclass(frozen=True)
class Thumbnail:
    """A thumbnail as a ``data:image/jpeg`` URI; ``error`` says why it is a placeholder."""

    src: str
    error: str | None = None


def jpeg_data_uri(image: Image.Image) -> str:
    """``image`` as a base64 ``data:image/jpeg`` URI."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def placeholder(reason: str, size: int = THUMB_SIZE) -> Thumbnail:
    """A grey ``size x 3/4 size`` image standing in for one that could not be shown."""
    return Thumbnail(jpeg_data_uri(Image.new("RGB", (size, size * 3 // 4), PLACEHOLDER_COLOUR)), reason)


def make_thumbnail(data: bytes | None, size: int = THUMB_SIZE) -> Thumbnail:
    """Decode ``data`` as ``lgca label`` does (EXIF orientation, RGB) and shrink its longest
    side to ``size``; undecodable data gives a placeholder with the decoder's reason."""
    decoded = decode_image(data, DecodeLimits(max_short_side=size))
    if decoded.error:
        return placeholder(decoded.error, size)
    image = Image.fromarray(decoded.pixels)
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    return Thumbnail(jpeg_data_uri(image))


def _from_tar(uri: str, refs: Sequence[ImageRef], storage: StorageConfig, size: int) -> dict[str, Thumbnail]:
    """Thumbnails of members of the tar shard ``uri`` (ids ``<uri>#<member>``), in one pass."""
    wanted = {ref.image_id for ref in refs}
    found: dict[str, Thumbnail] = {}
    rows = (dict(zip(batch, values)) for batch in iter_tar_rows(uri, storage) for values in zip(*batch.values()))
    for row in rows:
        if row["id"] in wanted:
            found[row["id"]] = placeholder(row["error"], size) if row["error"] else make_thumbnail(row["bytes"], size)
        elif row["id"] == f"{uri}#":  # the shard broke off: the members not seen yet cannot be read
            return {**{i: placeholder(row["error"], size) for i in wanted}, **found}
        if len(found) == len(wanted):
            break
    return {**{i: placeholder(f"tar: no member {i[len(uri) + 1:]!r} in {uri}", size) for i in wanted}, **found}


def _read_group(group: tuple[str, Sequence[ImageRef]], storage: StorageConfig, size: int) -> dict[str, Thumbnail]:
    """Thumbnails of the images of one file (``group = (uri, refs)``): a loose image file, a tar
    shard holding several of them, or a Parquet input."""
    uri, refs = group
    loose = [ref for ref in refs if ref.image_id == ref.uri]
    shard = [ref for ref in refs if ref.image_id != ref.uri]
    out: dict[str, Thumbnail] = {}
    if loose:
        data, error = read_file(uri, storage)
        thumbnail = placeholder(error, size) if error else make_thumbnail(data, size)
        out.update((ref.image_id, thumbnail) for ref in loose)
    if shard and detect_kind(uri) == "tar":
        out.update(_from_tar(uri, shard, storage, size))
    elif shard:
        out.update((ref.image_id, placeholder(PARQUET_REASON, size)) for ref in shard)
    return out


def thumbnails(refs: Sequence[ImageRef], storage: StorageConfig, size: int = THUMB_SIZE,
               threads: int = READ_THREADS) -> dict[str, Thumbnail]:
    """``{image id: Thumbnail}`` for ``refs``, each file or shard read once, ``threads`` at a time."""
    groups: dict[str, list[ImageRef]] = {}
    for ref in refs:
        groups.setdefault(ref.uri, []).append(ref)
    read = functools.partial(_read_group, storage=storage, size=size)
    out: dict[str, Thumbnail] = {}
    for _, future in read_ahead(read, list(groups.items()), threads):
        out.update(future.result())
    return out
