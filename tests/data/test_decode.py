"""decode: real photos (scikit-image) encoded with Pillow, decoded back and compared."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps
from skimage import data as photos

from pipeline.config import ConfigError
from pipeline.data.decode import DecodeLimits, capped_size, decode_batch, decode_image, pixels_array

NO_CAP = DecodeLimits(max_short_side=0)


def encode(image: Image.Image | np.ndarray, fmt: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (8-bit gray) but carries almost no data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return photos.astronaut()  # 512 x 512 RGB


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_decode_exactly(astronaut, fmt):
    decoded = decode_image(encode(astronaut, fmt), NO_CAP)
    assert decoded.error is None
    assert (decoded.width, decoded.height) == (512, 512)
    np.testing.assert_array_equal(decoded.pixels, astronaut)
    assert decoded.pixels.dtype == np.uint8


@pytest.mark.parametrize("fmt, tolerance", [("JPEG", 5.0), ("WEBP", 5.0), ("GIF", 6.0)])
def test_lossy_formats_decode_close_to_the_original(fmt, tolerance):
    coffee = photos.coffee()  # 400 x 600
    decoded = decode_image(encode(coffee, fmt), NO_CAP)
    assert decoded.error is None
    assert decoded.pixels.shape == (400, 600, 3)
    assert (decoded.width, decoded.height) == (600, 400)
    assert mean_abs_diff(decoded.pixels, coffee) < tolerance


def test_capped_size_rule():
    assert capped_size(512, 512, 200) == (200, 200)
    assert capped_size(600, 300, 100) == (200, 100)
    assert capped_size(300, 601, 100) == (100, 200)  # 200.33 rounds to 200
    assert capped_size(451, 300, 1000) == (451, 300)  # never upscaled
    assert capped_size(451, 300, 0) == (451, 300)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_short_side_cap_keeps_original_size_and_aspect(astronaut, fmt):
    decoded = decode_image(encode(astronaut, fmt, **({"quality": 95} if fmt == "JPEG" else {})),
                           DecodeLimits(max_short_side=200))
    assert decoded.pixels.shape == (200, 200, 3)
    assert (decoded.width, decoded.height) == (512, 512)
    reference = np.asarray(Image.fromarray(astronaut).resize((200, 200), Image.BICUBIC))
    assert mean_abs_diff(decoded.pixels, reference) < 4.0


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_wide_image_cap_rounds_the_long_side(fmt):
    wide = np.ascontiguousarray(photos.coffee()[:300])  # 300 high, 600 wide
    decoded = decode_image(encode(wide, fmt), DecodeLimits(max_short_side=100))
    assert decoded.pixels.shape == (100, 200, 3)
    assert (decoded.width, decoded.height) == (600, 300)
    reference = np.asarray(Image.fromarray(wide).resize((200, 100), Image.BICUBIC))
    assert mean_abs_diff(decoded.pixels, reference) < 5.0


def test_small_image_is_not_upscaled():
    cat = photos.chelsea()  # 300 x 451
    decoded = decode_image(encode(cat, "PNG"), DecodeLimits(max_short_side=1000))
    np.testing.assert_array_equal(decoded.pixels, cat)


def with_orientation(displayed: np.ndarray, fmt: str, orientation: int = 6) -> bytes:
    """Bytes of the stored image a camera writes for ``displayed`` with an EXIF orientation tag.

    Orientation 6 means "rotate 90 degrees clockwise to display", so the
    stored raster is the displayed one rotated 90 degrees counter-clockwise.
    """
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(displayed, k=1)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {}
    return encode(stored, fmt, exif=exif, **options)


def test_exif_orientation_is_applied_exactly_for_png():
    displayed = photos.coffee()  # 400 high, 600 wide
    decoded = decode_image(with_orientation(displayed, "PNG"), NO_CAP)
    assert (decoded.width, decoded.height) == (600, 400)
    np.testing.assert_array_equal(decoded.pixels, displayed)


def test_exif_orientation_with_jpeg_draft_and_cap():
    displayed = photos.coffee()
    decoded = decode_image(with_orientation(displayed, "JPEG"), DecodeLimits(max_short_side=100))
    assert (decoded.width, decoded.height) == (600, 400)  # original, oriented
    assert decoded.pixels.shape == (100, 150, 3)
    reference = np.asarray(Image.fromarray(displayed).resize((150, 100), Image.BICUBIC))
    assert mean_abs_diff(decoded.pixels, reference) < 6.0
    rotated_wrongly = np.asarray(Image.fromarray(np.rot90(displayed, k=1)).resize((100, 150)))
    assert rotated_wrongly.shape != decoded.pixels.shape


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillow_exif_transpose(orientation):
    stored = np.ascontiguousarray(photos.coffee()[:300, :451])  # not square: 5-8 swap the axes
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "PNG", exif=exif)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    decoded = decode_image(data, NO_CAP)
    assert (decoded.width, decoded.height) == expected.size
    np.testing.assert_array_equal(decoded.pixels, np.asarray(expected))


def exif_with_text_resolution(orientation: int) -> bytes:
    """A raw big-endian EXIF block: XResolution (a RATIONAL tag) stored as ASCII "72", and Orientation.

    Pillow reads it, but raises TypeError when it writes it back (as ``ImageOps.exif_transpose`` does).
    """
    x_resolution = struct.pack(">HHI", 0x011A, 2, 3) + b"72\0\0"
    orientation_tag = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    return b"Exif\0\0MM\0*" + struct.pack(">IH", 8, 2) + x_resolution + orientation_tag + struct.pack(">I", 0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_orientation_is_applied_despite_a_mistyped_exif_tag(fmt):
    displayed = photos.coffee()  # 400 high, 600 wide
    data = encode(np.ascontiguousarray(np.rot90(displayed, k=1)), fmt, exif=exif_with_text_resolution(6))
    out = decode_batch({"id": ["x"], "uri": ["x.img"], "bytes": [data]}, NO_CAP)
    assert out["error"] == [None]
    assert (out["width"][0], out["height"][0]) == (600, 400)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # equals rot90(displayed) for PNG
    np.testing.assert_array_equal(pixels_array(out["pixels"][0], 400, 600), np.rot90(stored, k=-1))


def test_unreadable_exif_block_means_no_orientation():
    stored = photos.coffee()
    decoded = decode_image(encode(stored, "PNG", exif=b"Exif\0\0garbage!"), NO_CAP)
    assert decoded.error is None
    np.testing.assert_array_equal(decoded.pixels, stored)


def test_cmyk_jpeg_colours_match_the_rgb_original():
    rocket = photos.rocket()
    cmyk = Image.fromarray(rocket).convert("CMYK")
    decoded = decode_image(encode(cmyk, "JPEG", quality=95), NO_CAP)
    assert decoded.error is None
    assert mean_abs_diff(decoded.pixels, rocket) < 4.0


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    decoded = decode_image(encode(values, "PNG"), NO_CAP)
    assert decoded.error is None
    np.testing.assert_array_equal(decoded.pixels[0, :, 0], [0, 1, 4, 128, 255])
    np.testing.assert_array_equal(decoded.pixels[..., 0], decoded.pixels[..., 2])


def test_every_sixteen_bit_value_maps_to_round_v_over_257():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    decoded = decode_image(encode(values, "PNG"), NO_CAP)
    np.testing.assert_array_equal(decoded.pixels[..., 1], np.floor(values / 257 + 0.5))


def test_thirty_two_bit_integer_images():
    in_range = np.array([[0, 65535]], dtype=np.int32)
    decoded = decode_image(encode(in_range, "TIFF"), NO_CAP)
    np.testing.assert_array_equal(decoded.pixels[0, :, 1], [0, 255])
    out_of_range = decode_image(encode(np.array([[0, 70000]], dtype=np.int32), "TIFF"), NO_CAP)
    assert out_of_range.error == ("decode: 32-bit integer image with values 0..70000 "
                                  "outside the 16-bit range 0..65535")


def test_float_image_is_an_error_row():
    decoded = decode_image(encode(np.ones((4, 4), dtype=np.float32), "TIFF"), NO_CAP)
    assert decoded.error == "decode: unsupported image mode 'F'"
    assert decoded.pixels is None


def test_grayscale_and_one_bit_become_gray_rgb():
    camera = photos.camera()
    gray = decode_image(encode(camera, "PNG"), NO_CAP).pixels
    np.testing.assert_array_equal(gray, np.repeat(camera[..., None], 3, axis=2))
    bits = decode_image(encode(Image.fromarray(camera > 128), "PNG"), NO_CAP).pixels
    np.testing.assert_array_equal(bits[..., 1], np.where(camera > 128, 255, 0))


def test_rgba_composited_over_white(astronaut):
    alpha = np.full((512, 512), 255, dtype=np.uint8)
    alpha[:100, :100] = 0
    alpha[200:300, 200:300] = 128
    decoded = decode_image(encode(np.dstack([astronaut, alpha]), "PNG"), NO_CAP).pixels
    np.testing.assert_array_equal(decoded[:100, :100], 255)
    np.testing.assert_array_equal(decoded[400:, 400:], astronaut[400:, 400:])
    expected_half = (astronaut[200:300, 200:300].astype(np.float64) * 128 + 255 * 127) / 255
    assert np.abs(decoded[200:300, 200:300] - expected_half).max() <= 1.0


def test_la_composited_over_white():
    camera = photos.camera()
    alpha = np.full(camera.shape, 255, dtype=np.uint8)
    alpha[:, :50] = 0
    decoded = decode_image(encode(Image.fromarray(np.dstack([camera, alpha]), "LA"), "PNG"), NO_CAP).pixels
    np.testing.assert_array_equal(decoded[:, :50], 255)
    np.testing.assert_array_equal(decoded[:, 50:, 0], camera[:, 50:])


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_composited_over_white(fmt):
    palette_image = Image.fromarray(photos.chelsea()).quantize(16)
    indices = np.asarray(palette_image)
    transparent_index = int(indices[0, 0])
    decoded = decode_image(encode(palette_image, fmt, transparency=transparent_index), NO_CAP).pixels
    clear = indices == transparent_index
    np.testing.assert_array_equal(decoded[clear], 255)
    colours = np.asarray(palette_image.convert("RGB"))
    np.testing.assert_array_equal(decoded[~clear], colours[~clear])


def test_rgb_with_transparent_colour_composited_over_white():
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:4] = (10, 20, 30)
    decoded = decode_image(encode(rgb, "PNG", transparency=(10, 20, 30)), NO_CAP).pixels
    np.testing.assert_array_equal(decoded[:4], 255)
    np.testing.assert_array_equal(decoded[4:], 0)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_the_first_frame(fmt):
    red = Image.new("RGB", (32, 24), (255, 0, 0))
    blue = Image.new("RGB", (32, 24), (0, 0, 255))
    options = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(encode(red, fmt, save_all=True, append_images=[blue], duration=100, **options),
                           NO_CAP)
    assert decoded.pixels.shape == (24, 32, 3)
    np.testing.assert_array_equal(decoded.pixels[12, 16], [255, 0, 0])


def test_bad_inputs_become_error_rows(astronaut):
    jpeg = encode(astronaut, "JPEG")
    assert decode_image(b"", NO_CAP).error == "empty file"
    assert decode_image(None, NO_CAP).error == "missing bytes"
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert decode_image(noise, NO_CAP).error == "decode: cannot identify image file"
    truncated = decode_image(jpeg[: len(jpeg) // 2], NO_CAP)
    assert truncated.error.startswith("decode: image file is truncated")
    assert (truncated.pixels, truncated.width, truncated.height) == (None, 0, 0)


def test_pixel_limit_is_checked_on_the_header(astronaut):
    assert decode_image(encode(astronaut, "PNG"), DecodeLimits(0, max_pixels=1000)).error == \
        "too large: 512x512 pixels exceeds max_pixels=1000"
    # Only the header is read: decoding this almost-empty raster would fail as truncated.
    with pytest.warns(Image.DecompressionBombWarning):
        header_only = decode_image(png_header_only(12_000, 12_000), DecodeLimits(0, max_pixels=100_000_000))
    assert header_only.error == "too large: 12000x12000 pixels exceeds max_pixels=100000000"
    beyond_pillow = decode_image(png_header_only(30_000, 30_000), NO_CAP)
    assert beyond_pillow.error.startswith("too large: Image size (900000000 pixels) exceeds limit")


def test_limits_are_validated():
    with pytest.raises(ConfigError, match="max_short_side"):
        DecodeLimits(max_short_side=-1)
    with pytest.raises(ConfigError, match="max_pixels"):
        DecodeLimits(max_short_side=0, max_pixels=0)
    with pytest.raises(ConfigError, match="MAX_IMAGE_PIXELS"):
        DecodeLimits(max_short_side=0, max_pixels=10**12)


def make_batch(astronaut: np.ndarray) -> dict:
    cat = photos.chelsea()
    return {
        "id": np.array(["a", "b", "c", "d", "e"], dtype=object),
        "uri": np.array(["s3://b/a.png", "s3://b/b.jpg", "s3://b/c.bin", "s3://b/d.jpg", "s3://b/e.png"],
                        dtype=object),
        "bytes": np.array([encode(astronaut, "PNG"), encode(cat, "JPEG"), b"not an image", None,
                           encode(cat, "PNG")], dtype=object),
        "error": np.array([None, None, None, "read: FileNotFoundError: d.jpg", None], dtype=object),
    }


def test_decode_batch_one_row_per_input_in_order(astronaut):
    out = decode_batch(make_batch(astronaut), DecodeLimits(max_short_side=256))
    assert out["id"] == ["a", "b", "c", "d", "e"]
    assert out["uri"][2] == "s3://b/c.bin"
    assert out["error"] == [None, None, "decode: cannot identify image file",
                            "read: FileNotFoundError: d.jpg", None]
    assert list(out["width"]) == [512, 451, 0, 0, 451]
    assert list(out["height"]) == [512, 300, 0, 0, 300]
    assert list(out["work_h"]) == [256, 256, 0, 0, 256]
    assert list(out["work_w"]) == [256, 385, 0, 0, 385]
    assert out["pixels"][2] is None and out["pixels"][3] is None
    first = pixels_array(out["pixels"][0], 256, 256)
    reference = np.asarray(Image.fromarray(astronaut).resize((256, 256), Image.BICUBIC))
    assert mean_abs_diff(first, reference) < 2.0


def test_decode_batch_without_error_column(astronaut):
    batch = {"id": ["x"], "uri": ["/data/x.png"], "bytes": [encode(astronaut, "PNG")]}
    out = decode_batch(batch, NO_CAP)
    assert out["error"] == [None]
    np.testing.assert_array_equal(pixels_array(out["pixels"][0], 512, 512), astronaut)


def test_decode_batch_accepts_nan_for_missing_cells(astronaut):
    """Ray Data hands an all-null column over as float NaN."""
    batch = {"id": ["x", "y"], "uri": ["/x.png", "/y.png"],
             "bytes": np.array([np.nan, np.nan], dtype=np.float32),
             "error": np.array([np.nan, np.nan], dtype=np.float32)}
    assert decode_batch(batch, NO_CAP)["error"] == ["missing bytes", "missing bytes"]
    batch = {"id": ["x"], "uri": ["/x.png"], "bytes": [encode(astronaut, "PNG")], "error": np.array([np.nan])}
    assert decode_batch(batch, NO_CAP)["error"] == [None]


def test_decode_batch_output_round_trips_through_arrow_and_pandas(astronaut):
    out = decode_batch(make_batch(astronaut), DecodeLimits(max_short_side=128))
    table = pa.Table.from_pydict(out)
    assert table.schema.field("pixels").type == pa.binary()
    assert table.schema.field("width").type == pa.int64()
    rows = table.to_pylist()
    assert [row["error"] is None for row in rows] == [True, True, False, False, True]
    for row, original in zip(rows, out["pixels"]):
        assert row["pixels"] == original
    frame = table.to_pandas()
    first = frame.iloc[0]
    np.testing.assert_array_equal(pixels_array(first["pixels"], first["work_h"], first["work_w"]),
                                  pixels_array(out["pixels"][0], 128, 128))
    again = pa.Table.from_pandas(frame, preserve_index=False)
    assert again.column("pixels").to_pylist() == out["pixels"]


def test_pixels_array_checks_the_size():
    with pytest.raises(ValueError, match="2x2x3 needs 12"):
        pixels_array(b"\0" * 10, 2, 2)
