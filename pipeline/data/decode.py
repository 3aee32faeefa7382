"""Decode image bytes into RGB working copies on the CPU.

Pure functions, no Ray: the Ray Data plan wraps :func:`decode_batch` in
``map_batches``. Every input row yields exactly one output row, in order; an
image that cannot be decoded becomes a row with ``error`` set, never an
exception and never a dropped row.

Rules applied to every image
----------------------------
* Size limit: ``width * height`` of the original image is checked right after
  ``Image.open`` (which reads only the header), before any pixel is decoded.
* EXIF (or XMP) orientation is applied with the transposes of
  ``ImageOps.exif_transpose``, without re-writing the EXIF block, so a
  malformed tag elsewhere in it cannot fail the image; an unreadable EXIF
  block counts as no orientation. ``width`` and ``height`` are the original
  size *after* orientation.
* Animated GIF / WebP / multi-page TIFF: the first frame.
* Colour: every supported mode becomes 8-bit RGB. Images with an alpha
  channel (RGBA, LA, PA, premultiplied modes) or a ``transparency`` entry
  (palette or grayscale with tRNS) are composited over white. 16-bit grayscale
  (``I;16*``, and ``I`` with values in 0..65535) is scaled with
  ``round(v / 257)``, so 0 -> 0 and 65535 -> 255 (a tRNS colour on 16-bit
  grayscale is not applied). CMYK uses Pillow's
  conversion. Embedded ICC profiles are not applied: pixel values are taken
  as sRGB. Other modes (``F``, ``LAB``, ...) are error rows.
* Working copy: when ``max_short_side`` > 0 and the short side is larger, the
  image is downscaled (never upscaled) with bicubic filtering so that the
  short side equals ``max_short_side`` and the long side is
  ``round(long * max_short_side / short)``. JPEGs are first decoded at a
  reduced DCT scale (``Image.draft``) that keeps the short side at or above
  the cap.

Batch representation (output of :func:`decode_batch`)
----------------------------------------------------
``pixels`` holds raw bytes: the working copy as row-major uint8 ``[work_h,
work_w, 3]`` RGB, ``None`` on error. Bytes (Arrow ``binary``) round-trip
through pyarrow, pandas and Ray Data blocks unchanged, including ``None``;
:func:`pixels_array` turns one row back into an array.
"""
from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from pipeline.config import ConfigError, DEFAULT_MAX_PIXELS, ScoringParams

WHITE = (255, 255, 255)
OUTPUT_COLUMNS = ("id", "uri", "pixels", "work_h", "work_w", "width", "height", "error")

_DIRECT_RGB_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_RESIZE_REDUCING_GAP = 3.0  # Pillow: 3.0 is visually indistinguishable from a plain resize
# Errors Pillow and its codecs raise on corrupt, truncated or unsupported data.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)
# EXIF orientation -> the transpose that shows the stored raster upright (as in ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# round(v / 257) for every 16-bit sample v, as a lookup table (indexing it needs no wide temporaries).
_SIXTEEN_TO_EIGHT_BITS = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)


@dataclass(frozen=True)
class DecodeLimits:
    """How large an image may be, and how large its working copy is."""

    max_short_side: int  # cap on the working copy's short side (downscale only); 0 = no cap
    max_pixels: int = DEFAULT_MAX_PIXELS  # limit on the ORIGINAL width*height; bigger images are error rows

    def __post_init__(self) -> None:
        if self.max_short_side < 0:
            raise ConfigError(f"max_short_side: must be 0 (no cap) or more, got {self.max_short_side}")
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels: must be at least 1, got {self.max_pixels}")
        pillow_limit = Image.MAX_IMAGE_PIXELS
        if pillow_limit is not None and self.max_pixels > 2 * pillow_limit:
            raise ConfigError(
                f"max_pixels: {self.max_pixels} is above Pillow's own decompression-bomb limit "
                f"of {2 * pillow_limit} pixels (2 * PIL.Image.MAX_IMAGE_PIXELS), which rejects "
                "those images first; lower max_pixels or raise PIL.Image.MAX_IMAGE_PIXELS")

    @classmethod
    def for_model(cls, image_size: int, scoring: ScoringParams, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodeLimits:
        """Limits for a model with ``image_size`` inputs: a short side of ``ceil(size / alpha)``
        when crops are scored (the smallest crop, alpha * min(H, W), is then never upsampled),
        else ``size`` (the full view alone)."""
        short_side = math.ceil(image_size / scoring.alpha) if scoring.needs_crops else image_size
        return cls(max_short_side=short_side, max_pixels=max_pixels)


@dataclass(frozen=True)
class Decoded:
    """One decoded image, or the reason it could not be decoded."""

    pixels: np.ndarray | None  # uint8 [h, w, 3] RGB working copy (oriented, capped); None on error
    width: int  # original width after EXIF orientation; 0 on error
    height: int  # original height after EXIF orientation; 0 on error
    error: str | None  # None on success


class _UnsupportedImage(ValueError):
    """The image decoded, but its pixel format has no defined RGB conversion here."""


def _failed(message: str) -> Decoded:
    return Decoded(pixels=None, width=0, height=0, error=message)


def capped_size(width: int, height: int, max_short_side: int) -> tuple[int, int]:
    """The working-copy size for an image of ``width x height``.

    Unchanged when ``max_short_side`` is 0 or the short side is already at most
    the cap; otherwise the short side becomes the cap and the long side keeps
    the aspect ratio, rounded to the nearest integer (at least 1).
    """
    short = min(width, height)
    if max_short_side == 0 or short <= max_short_side:
        return width, height
    scale = max_short_side / short
    if width <= height:
        return max_short_side, max(1, round(height * scale))
    return max(1, round(width * scale)), max_short_side


def decode_image(data: bytes | None, limits: DecodeLimits) -> Decoded:
    """Decode encoded image bytes into an RGB working copy (see module rules).

    Never raises for bad data: empty, unreadable, truncated, unsupported or
    too large images come back with ``error`` set and ``pixels`` None.
    """
    if data is None:
        return _failed("missing bytes")
    if len(data) == 0:
        return _failed("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return _decode_opened(img, limits)
    except Image.DecompressionBombError as exc:
        return _failed(f"too large: {exc}")
    except UnidentifiedImageError:
        return _failed("decode: cannot identify image file")
    except _DECODE_ERRORS as exc:
        return _failed(f"decode: {exc}")


def _decode_opened(img: Image.Image, limits: DecodeLimits) -> Decoded:
    """Check the header size, then decode, orient, convert and downscale ``img``."""
    stored_w, stored_h = img.size
    if stored_w * stored_h > limits.max_pixels:
        return _failed(f"too large: {stored_w}x{stored_h} pixels exceeds max_pixels={limits.max_pixels}")
    target = capped_size(stored_w, stored_h, limits.max_short_side)
    if target != (stored_w, stored_h):
        img.draft("RGB", target)  # JPEG only: DCT-domain downscale, keeps both sides >= target
    img.load()
    oriented = _oriented(img)
    width, height = stored_w, stored_h
    if oriented.size != img.size:  # orientation 5-8 swapped the axes
        width, height = stored_h, stored_w
        target = (target[1], target[0])
    rgb = to_rgb(oriented)
    if rgb.size != target:
        rgb = rgb.resize(target, Image.BICUBIC, reducing_gap=_RESIZE_REDUCING_GAP)
    return Decoded(pixels=np.asarray(rgb, dtype=np.uint8), width=width, height=height, error=None)


def _oriented(img: Image.Image) -> Image.Image:
    """``img`` transposed to display upright for its orientation tag; ``img`` itself when
    the tag is absent, 1, unknown, or the EXIF block cannot be parsed."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation)
    except _DECODE_ERRORS:  # e.g. SyntaxError "not a TIFF file" for a garbled eXIf chunk
        return img
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return img if method is None else img.transpose(method)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any supported mode to 8-bit RGB.

    Alpha and ``transparency`` are composited over white; 16-bit grayscale is
    scaled to 8 bits with ``round(v / 257)``. Raises ``_UnsupportedImage``
    (a ValueError) for modes without a defined conversion.
    """
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "I":
        return Image.fromarray(_sixteen_to_eight_bits(np.asarray(img))).convert("RGB")
    if img.mode not in _DIRECT_RGB_MODES + _ALPHA_MODES:
        raise _UnsupportedImage(f"unsupported image mode {img.mode!r}")
    if img.has_transparency_data:  # alpha channel, RGBA palette or a 'transparency' entry
        return _composite_over_white(img.convert("RGBA"))
    return img if img.mode == "RGB" else img.convert("RGB")


def _composite_over_white(rgba: Image.Image) -> Image.Image:
    """``rgb * a + white * (1 - a)`` for an RGBA image, as RGB."""
    background = Image.new("RGB", rgba.size, WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _sixteen_to_eight_bits(values: np.ndarray) -> np.ndarray:
    """Map 16-bit samples 0..65535 to 0..255 with ``round(v / 257)``.

    ``values`` is a 2-D integer array (uint16 or Pillow's int32 ``I`` mode);
    samples outside 0..65535 have no defined 8-bit value and raise.
    """
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise _UnsupportedImage(
            f"32-bit integer image with values {values.min()}..{values.max()} outside the 16-bit range 0..65535")
    return _SIXTEEN_TO_EIGHT_BITS[values]


def pixels_array(pixels: bytes, work_h: int, work_w: int) -> np.ndarray:
    """One row's ``pixels`` bytes as a read-only uint8 array ``[work_h, work_w, 3]``."""
    expected = work_h * work_w * 3
    if len(pixels) != expected:
        raise ValueError(f"pixels has {len(pixels)} bytes, but {work_h}x{work_w}x3 needs {expected}")
    return np.frombuffer(pixels, dtype=np.uint8).reshape(work_h, work_w, 3)


def _is_missing(value: object) -> bool:
    """None, or the float NaN that Ray Data / pandas put in an all-null column."""
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def error_message(value: object) -> str | None:
    """The error carried in an ``error`` column cell: None, NaN and '' mean none."""
    if _is_missing(value):
        return None
    if not isinstance(value, str):
        raise TypeError(f"error column must hold str or None, got {type(value).__name__}: {value!r}")
    return value or None


def _as_bytes(value: object) -> bytes | None:
    """A ``bytes`` cell as bytes; a missing cell (None or NaN) is None."""
    if _is_missing(value):
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"bytes column must hold bytes or None, got {type(value).__name__}")


def decode_batch(batch: dict[str, np.ndarray | list], limits: DecodeLimits) -> dict[str, list | np.ndarray]:
    """Decode a columnar batch; one output row per input row, in order.

    Input columns: ``id`` (str), ``uri`` (str), ``bytes`` (encoded image or
    None) and optionally ``error`` (an upstream read error; such rows are
    passed through without decoding). Missing cells may be None or NaN (Ray
    Data hands an all-null column over as float NaN). Other input columns are
    not carried.

    Output columns (see the module docstring for ``pixels``):
    ``id``, ``uri``, ``pixels`` (bytes | None), ``work_h``, ``work_w``
    (working-copy size, int64, 0 on error), ``width``, ``height`` (original
    size after orientation, int64, 0 on error), ``error`` (str | None).
    """
    ids, uris, data = list(batch["id"]), list(batch["uri"]), list(batch["bytes"])
    upstream = list(batch["error"]) if "error" in batch else [None] * len(ids)
    if not len(ids) == len(uris) == len(data) == len(upstream):
        raise ValueError("decode_batch: columns id, uri, bytes and error must have the same length")
    out: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
    for row_id, uri, blob, read_error in zip(ids, uris, data, upstream):
        message = error_message(read_error)
        decoded = _failed(message) if message else decode_image(_as_bytes(blob), limits)
        pixels = decoded.pixels
        out["id"].append(str(row_id))
        out["uri"].append(str(uri))
        out["pixels"].append(None if pixels is None else pixels.tobytes())
        out["work_h"].append(0 if pixels is None else pixels.shape[0])
        out["work_w"].append(0 if pixels is None else pixels.shape[1])
        out["width"].append(decoded.width)
        out["height"].append(decoded.height)
        out["error"].append(decoded.error)
    for name in ("work_h", "work_w", "width", "height"):
        out[name] = np.asarray(out[name], dtype=np.int64)
    return out
