"""Helpers shared by tests (not fixtures): S3 clients and real photos as files."""
from __future__ import annotations

import io
import socket
import tarfile

import boto3
import numpy as np
from PIL import Image


def s3_client(endpoint: str):
    """A boto3 client for the loopback S3 server."""
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def upload(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    """Put ``{key: bytes}`` into ``bucket``."""
    client = s3_client(endpoint)
    for key, payload in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=payload)


def encode(image: np.ndarray | Image.Image, fmt: str = "JPEG", **params) -> bytes:
    """An image encoded to bytes with Pillow."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    pil.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def make_tar(members: dict[str, bytes]) -> bytes:
    """A tar archive (WebDataset shard) holding ``{name: bytes}``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
