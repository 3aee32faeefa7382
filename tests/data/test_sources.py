"""sources: local folders, a real S3 API (moto server on loopback), tar shards and Parquet files."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as photos

from pipeline.config import ConfigError, SourceError, StorageConfig
from pipeline.data.sources import (check_parquet_columns, detect_kind, iter_parquet_rows, iter_tar_rows,
                                   list_image_files, list_shard_versions, list_shards, read_files_batch)
from pipeline.storage import file_version, filesystem
from tests.support import make_tar, upload

def tar_rows(uri: str, storage: StorageConfig) -> list[dict]:
    """The rows of a tar shard, one dict each, from iter_tar_rows' column batches."""
    return [dict(zip(batch, values)) for batch in iter_tar_rows(uri, storage, batch_rows=2)
            for values in zip(*batch.values())]


LOCAL = StorageConfig()


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """Small real photos, encoded once for the whole module."""
    return {
        "cat": jpeg_bytes(photos.chelsea()[::4, ::4].copy()),
        "coffee": jpeg_bytes(photos.coffee()[::4, ::4].copy()),
        "rocket": jpeg_bytes(photos.rocket()[::4, ::4].copy()),
    }


@pytest.fixture
def tree(tmp_path, images):
    """A nested folder of images with non-image files mixed in."""
    files = {
        "b.jpg": images["cat"],
        "a.PNG": images["coffee"],
        "notes.txt": b"not an image",
        "nested/deeper/c.jpeg": images["rocket"],
        "nested/d.webp": images["cat"],
        "nested/meta.json": b"{}",
        "nested/e.tiff": images["coffee"],
    }
    for name, payload in files.items():
        path = tmp_path / "photos" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    return tmp_path / "photos"


# ---------------------------------------------------------------- local listing


def test_local_folder_listing_is_recursive_sorted_and_filtered(tree):
    listed = list(list_image_files(str(tree), LOCAL))
    assert listed == [str(tree / name) for name in
                      ["a.PNG", "b.jpg", "nested/d.webp", "nested/deeper/c.jpeg", "nested/e.tiff"]]


def test_local_glob_and_single_file(tree):
    assert list(list_image_files(str(tree / "*.jpg"), LOCAL)) == [str(tree / "b.jpg")]
    assert list(list_image_files(str(tree / "**" / "*.jpeg"), LOCAL)) == [str(tree / "nested/deeper/c.jpeg")]
    assert list(list_image_files(str(tree / "nested" / "d.webp"), LOCAL)) == [str(tree / "nested/d.webp")]
    assert list(list_image_files(f"file://{tree}/b.jpg", LOCAL)) == [str(tree / "b.jpg")]


def test_relative_local_paths_become_absolute(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    assert list(list_image_files("photos/b.jpg", LOCAL)) == [str(tree / "b.jpg")]


def test_listing_errors_name_the_uri(tree):
    with pytest.raises(SourceError, match="no such file, folder or prefix"):
        list_image_files(str(tree / "missing"), LOCAL)
    with pytest.raises(SourceError, match=r"notes\.txt: no image files found"):
        list_image_files(str(tree / "notes.txt"), LOCAL)
    with pytest.raises(SourceError, match="no image files found"):
        list_image_files(str(tree / "*.gif"), LOCAL)


def test_paths_with_glob_characters_that_exist_are_taken_literally(tmp_path, images):
    folder = tmp_path / "photos [2020]"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(images["cat"])
    (folder / "b*.jpg").write_bytes(images["coffee"])
    (tmp_path / "a.jpg").write_bytes(images["rocket"])  # what "photos [2020]" as a glob would not match either
    assert list(list_image_files(str(folder), LOCAL)) == [str(folder / "a.jpg"), str(folder / "b*.jpg")]
    assert list(list_image_files(str(folder / "b*.jpg"), LOCAL)) == [str(folder / "b*.jpg")]
    assert list(list_image_files(str(tmp_path / "*.jpg"), LOCAL)) == [str(tmp_path / "a.jpg")]  # still a glob


def test_names_with_double_colons_are_names_not_url_chains(tmp_path, images):
    photo, shard, table = tmp_path / "c::d.jpg", tmp_path / "s::1.tar", tmp_path / "t::1.parquet"
    photo.write_bytes(images["cat"])
    shard.write_bytes(make_tar({"x::y.jpg": images["coffee"]}))
    pq.write_table(pa.table({"id": ["r"], "image": [images["rocket"]]}), str(table))
    listed = list(list_image_files(str(tmp_path), LOCAL))
    assert listed == [str(photo)]
    assert read_files_batch({"uri": listed}, LOCAL) == {"id": listed, "uri": listed, "bytes": [images["cat"]],
                                                        "error": [None]}
    assert [(row["id"], row["bytes"]) for row in tar_rows(str(shard), LOCAL)] == [
        (f"{shard}#x::y.jpg", images["coffee"])]
    assert parquet_columns([str(table)], LOCAL)["bytes"] == [images["rocket"]]


def test_detect_kind():
    assert detect_kind("s3://bucket/shards/000001.tar") == "tar"
    for name in ("a.tar.gz", "a.TGZ", "a.tar.bz2", "a.tar.xz"):
        assert detect_kind(f"/data/shards/{name}") == "tar"
    assert detect_kind("/data/shards/*.tar.gz") == "tar"
    assert detect_kind("/data/shards/*.TAR") == "tar"
    assert detect_kind("s3://bucket/table/part-0.parquet") == "parquet"
    assert detect_kind("s3://bucket/photos/") == "files"
    assert detect_kind("/data/photo.jpg") == "files"


def test_local_read_batch_reads_bytes_and_turns_failures_into_rows(tree, images):
    uris = [str(tree / "b.jpg"), str(tree / "gone.jpg"), str(tree / "nested"), str(tree / "a.PNG")]
    out = read_files_batch({"uri": np.array(uris, dtype=object)}, LOCAL)
    assert out["id"] == uris and out["uri"] == uris
    assert out["bytes"] == [images["cat"], None, None, images["coffee"]]
    assert out["error"][0] is None and out["error"][3] is None
    assert out["error"][1].startswith("read: FileNotFoundError")
    assert out["error"][2].startswith("read: IsADirectoryError")


def test_read_batch_of_nothing():
    assert read_files_batch({"uri": []}, LOCAL) == {"id": [], "uri": [], "bytes": [], "error": []}


# ---------------------------------------------------------------- storage config


def test_storage_options(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    retries = {"retries": {"mode": "standard", "max_attempts": 10}}
    assert StorageConfig().storage_options("s3") == {"anon": False, "config_kwargs": retries}
    assert StorageConfig(anon=True, region="eu-west-1", retries=3).storage_options("s3") == {
        "anon": True, "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 3}}}
    assert StorageConfig(profile="lab").storage_options("s3a") == {"anon": False, "profile": "lab",
                                                                    "config_kwargs": retries}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")  # the environment's retry settings win: botocore reads them
    assert StorageConfig().storage_options("s3") == {"anon": False}
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    assert StorageConfig(endpoint_url="http://a:1").storage_options("file") == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:9000")
    assert StorageConfig().storage_options("s3")["client_kwargs"] == {"endpoint_url": "http://from-env:9000"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:9000")
    assert StorageConfig().storage_options("s3")["client_kwargs"] == {"endpoint_url": "http://s3-specific:9000"}
    explicit = StorageConfig(endpoint_url="https://explicit:443")
    assert explicit.storage_options("s3")["client_kwargs"] == {"endpoint_url": "https://explicit:443"}


def test_storage_config_is_validated():
    with pytest.raises(ConfigError, match="endpoint_url"):
        StorageConfig(endpoint_url="minio:9000")
    with pytest.raises(ConfigError, match="profile"):
        StorageConfig(anon=True, profile="lab")


# ---------------------------------------------------------------- S3 (moto server)


S3_OBJECTS = ("photos/b.jpg", "photos/a.jpeg", "photos/sub/c.PNG", "photos/sub/readme.txt", "other/z.jpg")


def fill_bucket(endpoint: str, bucket: str, images: dict[str, bytes]) -> dict[str, bytes]:
    payloads = [images["cat"], images["coffee"], images["rocket"], b"text", images["cat"]]
    objects = dict(zip(S3_OBJECTS, payloads))
    upload(endpoint, bucket, objects)
    return objects


def test_s3_listing_and_reading_with_endpoint_in_config(moto_endpoint, bucket, images, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # wrong on purpose: the config wins
    storage = StorageConfig(endpoint_url=moto_endpoint)
    objects = fill_bucket(moto_endpoint, bucket, images)
    listed = list(list_image_files(f"s3://{bucket}/photos", storage))
    assert listed == [f"s3://{bucket}/photos/a.jpeg", f"s3://{bucket}/photos/b.jpg",
                      f"s3://{bucket}/photos/sub/c.PNG"]
    fs, _ = filesystem(f"s3://{bucket}/photos", storage)
    assert not fs.dircache  # s3fs's per-object listing cache is dropped, not kept for the run
    out = read_files_batch({"uri": listed + [f"s3://{bucket}/photos/missing.jpg"]}, storage)
    assert out["id"][:3] == listed
    assert out["bytes"][:3] == [objects["photos/a.jpeg"], objects["photos/b.jpg"], objects["photos/sub/c.PNG"]]
    assert out["error"][:3] == [None, None, None]
    assert out["bytes"][3] is None
    assert out["error"][3].startswith("read: FileNotFoundError")


def test_s3_endpoint_from_environment(moto_endpoint, bucket, images, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    fill_bucket(moto_endpoint, bucket, images)
    listed = list(list_image_files(f"s3://{bucket}/photos/*.jpg", StorageConfig()))
    assert listed == [f"s3://{bucket}/photos/b.jpg"]
    whole_bucket = list(list_image_files(f"s3://{bucket}", StorageConfig()))
    assert whole_bucket == [f"s3://{bucket}/other/z.jpg"] + [
        f"s3://{bucket}/{key}" for key in ("photos/a.jpeg", "photos/b.jpg", "photos/sub/c.PNG")]
    out = read_files_batch({"uri": listed}, StorageConfig())
    assert out["bytes"] == [images["cat"]]


def test_s3_names_with_double_colons_are_read(moto_endpoint, bucket, images):
    storage = StorageConfig(endpoint_url=moto_endpoint)
    upload(moto_endpoint, bucket, {"p/c::d.jpg": images["cat"], "p/s::1.tar": make_tar({"m.jpg": images["rocket"]})})
    listed = list(list_image_files(f"s3://{bucket}/p", storage))
    assert listed == [f"s3://{bucket}/p/c::d.jpg"]
    out = read_files_batch({"uri": listed}, storage)
    assert (out["bytes"], out["error"]) == ([images["cat"]], [None])
    shards = list_shards(f"s3://{bucket}/p", "tar", storage)
    assert tar_columns(shards, storage)["bytes"] == [images["rocket"]]


def test_s3_filesystem_and_missing_prefix(moto_endpoint, bucket):
    fs, path = filesystem(f"s3://{bucket}/photos/a.jpg", StorageConfig(endpoint_url=moto_endpoint))
    assert (fs.protocol[0], path) == ("s3", f"{bucket}/photos/a.jpg")
    with pytest.raises(SourceError, match=f"s3://{bucket}/nothing-here: no such file"):
        list_image_files(f"s3://{bucket}/nothing-here", StorageConfig(endpoint_url=moto_endpoint))


# ---------------------------------------------------------------- tar shards


@pytest.fixture
def shard_members(images) -> dict[str, bytes]:
    return {
        "000001.jpg": images["cat"],
        "000001.json": b'{"label": 1}',
        "000002.jpg": images["coffee"],
        "000002.txt": b"a cup of coffee",
        "000003.JPEG": images["rocket"],
    }


def test_tar_members_have_ids_and_bytes(tmp_path, shard_members):
    shard = tmp_path / "000000.tar"
    shard.write_bytes(make_tar(shard_members))
    rows = list(tar_rows(str(shard), LOCAL))
    assert [row["id"] for row in rows] == [f"{shard}#000001.jpg", f"{shard}#000002.jpg", f"{shard}#000003.JPEG"]
    assert [row["bytes"] for row in rows] == [shard_members[name] for name in ("000001.jpg", "000002.jpg",
                                                                               "000003.JPEG")]
    assert {row["uri"] for row in rows} == {str(shard)}
    assert all(row["error"] is None for row in rows)


def test_truncated_tar_gives_members_before_the_cut_and_an_error_row(tmp_path, shard_members):
    whole = make_tar(shard_members)
    with tarfile.open(fileobj=io.BytesIO(whole)) as archive:
        cut = archive.getmember("000002.jpg").offset_data + 100
    shard = tmp_path / "cut.tar"
    shard.write_bytes(whole[:cut])
    rows = list(tar_rows(str(shard), LOCAL))
    assert [row["id"] for row in rows] == [f"{shard}#000001.jpg", f"{shard}#"]
    assert rows[0]["bytes"] == shard_members["000001.jpg"]
    assert rows[1]["bytes"] is None
    assert rows[1]["error"] == "tar: ReadError: unexpected end of data"


def test_unreadable_tars_become_error_rows(tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar archive at all" * 40)
    rows = list(tar_rows(str(garbage), LOCAL))
    assert len(rows) == 1 and rows[0]["id"] == f"{garbage}#" and rows[0]["error"].startswith("tar: ReadError")
    missing = list(tar_rows(str(tmp_path / "missing.tar"), LOCAL))
    assert missing[0]["error"].startswith("tar: FileNotFoundError")


def write_tar(path, members: dict[str, bytes], mode: str = "w") -> str:
    """A tar shard at ``path`` in ``mode`` ('w:gz', 'w:bz2', 'w:xz' compress it)."""
    with tarfile.open(path, mode) as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return str(path)


def test_compressed_tar_shards_are_listed_and_read(tmp_path, images):
    modes = {"a.tar": "w", "b.tar.gz": "w:gz", "c.tgz": "w:gz", "d.tar.bz2": "w:bz2", "e.TAR.XZ": "w:xz"}
    shards = [write_tar(tmp_path / name, {f"{name}.jpg": images["cat"]}, mode) for name, mode in modes.items()]
    (tmp_path / "f.gz").write_bytes(b"not a shard")
    assert list_shards(str(tmp_path), "tar", LOCAL) == shards
    assert list_shards(str(tmp_path / "*.tar.gz"), "tar", LOCAL) == [shards[1]]
    out = tar_columns(shards, LOCAL)
    assert out["id"] == [f"{shard}#{name}.jpg" for shard, name in zip(shards, modes)]
    assert out["bytes"] == [images["cat"]] * 5 and out["error"] == [None] * 5


def test_a_search_that_finds_only_other_formats_names_them_and_the_option(tmp_path, images):
    write_tar(tmp_path / "s1.tar.gz", {"k.jpg": images["cat"]}, "w:gz")
    write_tar(tmp_path / "s0.tar", {"k.jpg": images["cat"]})
    pq.write_table(pa.table({"image": [images["cat"]]}), str(tmp_path / "t.parquet"))
    with pytest.raises(SourceError) as raised:
        list_image_files(str(tmp_path), LOCAL)
    assert str(raised.value) == (
        f"{tmp_path}: no image files found (looked for names ending in .jpg, .jpeg, .png, .webp, .bmp, .gif, "
        f".tif, .tiff, any case, among 3 files); it holds tar shards (2: {tmp_path}/s0.tar, {tmp_path}/s1.tar.gz) "
        f"and Parquet files (1: {tmp_path}/t.parquet): pass --input-format tar or parquet")
    for name in ("a.jpg", "b.png", "c.gif", "d.bmp"):
        (tmp_path / "photos" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "photos" / name).write_bytes(images["cat"])
    with pytest.raises(SourceError, match=r"among 4 files\); it holds image files \(4: .*/photos/a\.jpg, "
                                          r".*/photos/b\.png, .*/photos/c\.gif, \.\.\.\): pass --input-format files$"):
        list_shards(str(tmp_path / "photos"), "tar", LOCAL)


def test_linked_image_members_become_error_rows(tmp_path, images):
    shard = tmp_path / "links.tar"
    with tarfile.open(shard, "w") as archive:
        info = tarfile.TarInfo("x.jpg")
        info.size = len(images["cat"])
        archive.addfile(info, io.BytesIO(images["cat"]))
        for name, kind in (("y.jpg", tarfile.LNKTYPE), ("z.JPG", tarfile.SYMTYPE), ("y.json", tarfile.LNKTYPE)):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, "x.jpg"
            archive.addfile(link)
    rows = list(tar_rows(str(shard), LOCAL))
    assert [(row["id"], row["bytes"], row["error"]) for row in rows] == [
        (f"{shard}#x.jpg", images["cat"], None),
        (f"{shard}#y.jpg", None, "tar: member is a hard link to x.jpg; store the file itself"),
        (f"{shard}#z.JPG", None, "tar: member is a symbolic link to x.jpg; store the file itself")]
    assert {row["uri"] for row in rows} == {str(shard)}


def tar_columns(shards: list[str], storage: StorageConfig) -> dict[str, list]:
    rows = [row for shard in shards for row in tar_rows(shard, storage)]
    return {name: [row[name] for row in rows] for name in ("id", "uri", "bytes", "error")}


def parquet_columns(uris: list[str], storage: StorageConfig, **columns: str) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in ("id", "uri", "bytes", "error")}
    for uri in uris:
        for part in iter_parquet_rows(uri, storage, **columns):
            for name in out:
                out[name].extend(part[name])
    return out


def test_tar_shards_from_s3_become_member_rows(moto_endpoint, bucket, shard_members):
    storage = StorageConfig(endpoint_url=moto_endpoint)
    upload(moto_endpoint, bucket, {"shards/000000.tar": make_tar(shard_members),
                                   "shards/000001.tar": make_tar({"000009.png": b"png bytes"}),
                                   "shards/index.txt": b"two shards"})
    shards = list_shards(f"s3://{bucket}/shards", "tar", storage)
    assert shards == [f"s3://{bucket}/shards/000000.tar", f"s3://{bucket}/shards/000001.tar"]
    out = tar_columns(shards, storage)
    assert out["id"] == [f"{shards[0]}#000001.jpg", f"{shards[0]}#000002.jpg", f"{shards[0]}#000003.JPEG",
                         f"{shards[1]}#000009.png"]
    assert out["uri"] == [shards[0]] * 3 + [shards[1]]
    assert out["bytes"][3] == b"png bytes"
    assert out["error"] == [None] * 4
    versions = dict(list_shard_versions(f"s3://{bucket}/shards", "tar", storage))
    upload(moto_endpoint, bucket, {"shards/000001.tar": make_tar({"000009.png": b"PNG bytes"})})  # same size
    again = dict(list_shard_versions(f"s3://{bucket}/shards", "tar", storage))
    assert again[shards[0]] == versions[shards[0]]
    size, _ = versions[shards[1]].split(":", 1)
    assert again[shards[1]] != versions[shards[1]] and again[shards[1]].startswith(f"{size}:")  # the ETag


def test_local_shard_listing(tmp_path):
    for name in ("b.tar", "a.tar", "sub/c.tar", "notes.txt", "t/part-0.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert list_shards(str(tmp_path), "tar", LOCAL) == [str(tmp_path / n) for n in ("a.tar", "b.tar", "sub/c.tar")]
    assert list_shards(str(tmp_path / "*.tar"), "tar", LOCAL) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert list_shards(str(tmp_path / "t"), "parquet", LOCAL) == [str(tmp_path / "t/part-0.parquet")]
    with pytest.raises(SourceError, match="kind: 'zip'"):
        list_shards(str(tmp_path), "zip", LOCAL)
    with pytest.raises(SourceError, match="no parquet shards found"):
        list_shards(str(tmp_path / "sub"), "parquet", LOCAL)


def test_a_shard_version_changes_with_its_size_or_time(tmp_path):
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"x" * 10)
    os.utime(shard, ns=(10**18, 10**18))
    first = list_shard_versions(str(tmp_path), "tar", LOCAL)
    assert first == list_shard_versions(str(tmp_path / "*.tar"), "tar", LOCAL) == [(str(shard), first[0][1])]
    assert first[0][1].startswith("10:")
    shard.write_bytes(b"y" * 10)
    os.utime(shard, ns=(10**18, 10**18))
    assert list_shard_versions(str(shard), "tar", LOCAL) == first  # same size and time: taken as unchanged
    os.utime(shard, ns=(10**18, 10**18 + 10**9))
    touched = list_shard_versions(str(shard), "tar", LOCAL)
    shard.write_bytes(b"y" * 11)
    os.utime(shard, ns=(10**18, 10**18 + 10**9))
    grown = list_shard_versions(str(shard), "tar", LOCAL)
    assert len({first[0][1], touched[0][1], grown[0][1]}) == 3 and grown[0][1].startswith("11:")


# ---------------------------------------------------------------- parquet


def write_parquet(path, table: pa.Table) -> str:
    pq.write_table(table, str(path), row_group_size=3)
    return str(path)


def test_parquet_binary_column_streams_in_batches(tmp_path, images):
    payloads = [images["cat"], images["coffee"], images["rocket"], images["cat"], images["coffee"]]
    table = pa.table({"key": pa.array([10, 11, 12, 13, 14], pa.int64()),
                      "jpeg": pa.array(payloads, pa.binary()),
                      "label": ["cat", "coffee", "rocket", "cat", "coffee"]})
    uri = write_parquet(tmp_path / "part-0.parquet", table)
    batches = list(iter_parquet_rows(uri, LOCAL, image_column="jpeg", id_column="key", batch_rows=2))
    assert [len(batch["id"]) for batch in batches] == [2, 2, 1]
    assert [i for batch in batches for i in batch["id"]] == ["10", "11", "12", "13", "14"]
    assert [b for batch in batches for b in batch["bytes"]] == payloads
    assert {u for batch in batches for u in batch["uri"]} == {uri}
    assert all(e is None for batch in batches for e in batch["error"])


def test_parquet_struct_image_column_and_null_rows(tmp_path, images):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    column = pa.array([{"bytes": images["cat"], "path": "cat.jpg"}, None,
                       {"bytes": None, "path": "lost.jpg"}, {"bytes": images["rocket"], "path": "r.jpg"}],
                      image_type)
    table = pa.table({"image": column, "id": pa.array(["c", "n", "l", None])})
    uri = write_parquet(tmp_path / "hf.parquet", table)
    out = parquet_columns([uri], LOCAL, image_column="image", id_column="id")
    assert out["id"] == ["c", "n", "l", f"{uri}#3"]
    assert out["bytes"] == [images["cat"], None, None, None]
    assert out["error"] == [None, "parquet: null image in column 'image'",
                            "parquet: null image in column 'image'", "parquet: null id in column 'id'"]


def test_parquet_without_id_column_uses_row_numbers(tmp_path, images):
    table = pa.table({"image": pa.array([images["cat"]] * 4, pa.binary())})
    first = write_parquet(tmp_path / "a.parquet", table)
    second = write_parquet(tmp_path / "b.parquet", table.slice(0, 1))
    out = parquet_columns([first, second], LOCAL, image_column="image", id_column="")
    assert out["id"] == [f"{first}#{n}" for n in range(4)] + [f"{second}#0"]
    assert out["uri"] == [first] * 4 + [second]


def test_parquet_missing_or_wrong_column_is_an_error_row_for_the_file(tmp_path):
    uri = write_parquet(tmp_path / "t.parquet", pa.table({"img": [b"x"], "name": ["a"], "path": ["p.jpg"]}))

    def rows(**columns: str) -> list[tuple]:
        return [(i, b, e) for part in iter_parquet_rows(uri, LOCAL, **columns)
                for i, b, e in zip(part["id"], part["bytes"], part["error"])]

    assert rows(image_column="image", id_column="name") == [(f"{uri}#", None, (
        "parquet: column 'image' not found; available: img, name, path; "
        "pass --image-column with the column of image bytes"))]
    assert rows(image_column="img") == [(f"{uri}#", None, (
        "parquet: column 'id' not found; available: img, name, path; pass --id-column with the column of "
        "image ids, or --id-column '' to number rows by file and position"))]
    assert rows(image_column="path", id_column="name") == [(f"{uri}#", None, (
        "parquet: image column 'path' has type string; expected binary or a struct with a 'bytes' field"))]


def test_parquet_binary_ids_become_text(tmp_path, images):
    keys = pa.array([b"abc", "\u00e9t\u00e9".encode(), b"\xff\x00"], pa.binary())
    uri = write_parquet(tmp_path / "b.parquet", pa.table({"key": keys, "image": [images["cat"]] * 3}))
    assert parquet_columns([uri], LOCAL, id_column="key")["id"] == ["abc", "\u00e9t\u00e9", "ff00"]


def test_corrupt_parquet_is_an_error_row(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 but not really a parquet file")
    rows = list(iter_parquet_rows(str(bad), LOCAL))
    assert len(rows) == 1
    assert rows[0]["id"] == [f"{bad}#"]
    assert rows[0]["error"][0].startswith("parquet: ArrowInvalid")


def test_parquet_on_s3(moto_endpoint, bucket, images):
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": ["x", "y"], "image": [images["cat"], images["rocket"]]}), buffer)
    upload(moto_endpoint, bucket, {"table/part-0.parquet": buffer.getvalue()})
    storage = StorageConfig(endpoint_url=moto_endpoint)
    shards = list_shards(f"s3://{bucket}/table/*.parquet", "parquet", storage)
    out = parquet_columns(shards, storage, image_column="image", id_column="id")
    assert out["id"] == ["x", "y"]
    assert out["bytes"] == [images["cat"], images["rocket"]]
    assert out["uri"] == [f"s3://{bucket}/table/part-0.parquet"] * 2


def test_file_version_needs_a_size_and_a_stamp():
    assert file_version({"size": 5, "ETag": '"abc"', "LastModified": "t"}) == '5:"abc"'
    assert file_version({"size": 5, "ETag": "", "LastModified": "t"}) == "5:t"  # an empty ETag says nothing
    assert file_version({"size": 5, "Last-Modified": "Tue, 01 Dec"}) == "5:Tue, 01 Dec"  # HTTP
    assert file_version({"size": 5, "name": "x"}) is None  # no stamp: never taken as unchanged
    assert file_version({"size": None, "ETag": "e"}) is None


def test_a_symlinked_shard_has_its_targets_version(tmp_path):
    target, folder = tmp_path / "real.tar", tmp_path / "shards"
    target.write_bytes(b"x" * 10)
    folder.mkdir()
    (folder / "a.tar").symlink_to(target)
    (folder / "gone.tar").symlink_to(tmp_path / "deleted.tar")  # dangling: listed, not fatal
    before = [entry for entry in list_shard_versions(str(folder), "tar", LOCAL) if entry[0].endswith("a.tar")]
    target.write_bytes(b"y" * 10)
    os.utime(target, ns=(10**18, 10**18))
    listed = list_shard_versions(str(folder), "tar", LOCAL)
    after = [entry for entry in listed if entry[0].endswith("a.tar")]
    assert [uri for uri, _ in after] == [str(folder / "a.tar")]
    assert after != before and after == list_shard_versions(str(folder / "a.tar"), "tar", LOCAL)


def test_the_driver_check_of_a_parquet_file_reads_its_columns_only(tmp_path):
    good, cut = tmp_path / "good.parquet", tmp_path / "cut.parquet"
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), good)
    check_parquet_columns(str(good), LOCAL, "image", "id")
    with pytest.raises(SourceError, match=r"good.parquet: column 'key' not found; available: id, image"):
        check_parquet_columns(str(good), LOCAL, "image", "key")
    cut.write_bytes(good.read_bytes()[:20])
    check_parquet_columns(str(cut), LOCAL, "image", "id")  # unreadable: left to its read task's error row


def test_symlinked_folders_are_followed_once(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"a")
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "elsewhere" / "deep" / "b.jpg").write_bytes(b"b")
    (tmp_path / "in" / "coffee").symlink_to(tmp_path / "elsewhere")  # a class folder kept elsewhere
    (tmp_path / "elsewhere" / "back").symlink_to(tmp_path / "in")  # a cycle: not followed again
    assert list(list_image_files(str(tmp_path / "in"), LOCAL)) == [
        str(tmp_path / "in" / "a.jpg"), str(tmp_path / "in" / "coffee" / "deep" / "b.jpg")]

    (tmp_path / "in" / "2024").mkdir()
    (tmp_path / "in" / "2024" / "c.jpg").write_bytes(b"c")
    (tmp_path / "in" / "2024" / "self").symlink_to(tmp_path / "in" / "2024")
    (tmp_path / "in" / "latest").symlink_to(tmp_path / "in" / "2024")  # the same tree: listed once
    assert list(list_image_files(str(tmp_path / "in"), LOCAL)) == [
        str(tmp_path / "in" / "2024" / "c.jpg"), str(tmp_path / "in" / "a.jpg"),
        str(tmp_path / "in" / "coffee" / "deep" / "b.jpg")]
