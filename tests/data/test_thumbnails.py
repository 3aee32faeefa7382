"""Thumbnails for the report: read from local files, S3 objects and tar members, placeholders with reasons."""
from __future__ import annotations

import base64
import io

import skimage.data
from PIL import Image

from pipeline.config import StorageConfig
from pipeline.data.thumbnails import PARQUET_REASON, THUMB_SIZE, ImageRef, thumbnails
from tests.support import encode, make_tar, upload


def picture(src: str) -> Image.Image:
    assert src.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_local_files_missing_files_and_broken_bytes(tmp_path):
    (tmp_path / "coffee.jpg").write_bytes(encode(skimage.data.coffee(), "JPEG"))  # 600 x 400
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    refs = [ImageRef(str(tmp_path / name), str(tmp_path / name)) for name in ("coffee.jpg", "broken.jpg", "gone.jpg")]
    got = thumbnails(refs, StorageConfig())
    coffee = picture(got[refs[0].image_id].src)
    assert coffee.size == (THUMB_SIZE, round(THUMB_SIZE * 400 / 600)) and got[refs[0].image_id].error is None
    pixel = coffee.convert("RGB").getpixel((80, 50))
    assert pixel[0] > pixel[2]  # a brown cup on a wooden table, not a grey placeholder
    assert got[refs[1].image_id].error.startswith("decode: cannot identify image file")
    assert got[refs[2].image_id].error.startswith("read: FileNotFoundError")
    assert picture(got[refs[2].image_id].src).size == (THUMB_SIZE, THUMB_SIZE * 3 // 4)


def test_s3_objects_tar_members_and_parquet_rows(moto_endpoint, bucket):
    cat = encode(skimage.data.chelsea(), "JPEG")
    upload(moto_endpoint, bucket, {"img/cat.jpg": cat,
                                   "shards/a.tar": make_tar({"x/1.jpg": encode(skimage.data.rocket(), "JPEG"),
                                                             "x/2.png": encode(skimage.data.camera(), "PNG")})})
    tar = f"s3://{bucket}/shards/a.tar"
    refs = [ImageRef(f"s3://{bucket}/img/cat.jpg", f"s3://{bucket}/img/cat.jpg"),
            ImageRef(f"{tar}#x/2.png", tar), ImageRef(f"{tar}#x/nope.jpg", tar),
            ImageRef(f"s3://{bucket}/t.parquet#4", f"s3://{bucket}/t.parquet")]
    got = thumbnails(refs, StorageConfig(endpoint_url=moto_endpoint))
    assert picture(got[refs[0].image_id].src).size == (THUMB_SIZE, round(THUMB_SIZE * 300 / 451))
    assert got[refs[0].image_id].error is None
    camera = picture(got[refs[1].image_id].src)
    assert camera.size == (THUMB_SIZE, THUMB_SIZE) and got[refs[1].image_id].error is None
    assert got[refs[2].image_id].error == f"tar: no member 'x/nope.jpg' in {tar}"
    assert got[refs[3].image_id].error == PARQUET_REASON
