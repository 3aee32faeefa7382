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


def lgca_script() -> str:
    """The ``lgca`` console script of this virtualenv, as a newcomer runs it."""
    import sys
    from pathlib import Path

    return str(Path(sys.executable).with_name("lgca"))


def newcomer_env(home) -> dict[str, str]:
    """The environment of someone who just installed the package: ``home`` as HOME (no caches, no
    ~/.ray), no Ray, AWS or Hugging Face settings, this virtualenv first on PATH, and no internet:
    the Hugging Face Hub's address is a closed port here, so a download fails at once (also where
    the machine has internet, as in CI)."""
    import os
    import sys
    from pathlib import Path

    dropped = ("RAY_", "AWS_", "HF_", "HUGGINGFACE_", "XDG_CACHE_HOME", "TORCH_HOME")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(HOME=str(home), HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


# Lines that a normal `lgca label` run printed before (issue "The first hour"): none may come back.
NOISE = ("Token authentication is enabled", "RayDeprecationWarning", "max_restarts", "No pretrained weights loaded",
         "does not have any available CPUs", "Traceback", "Progress bars disabled", "logging_progress",
         "Execution plan of Dataset", "Started a local Ray instance", "INFO root:")
