"""Shared fixtures: a real S3 API on loopback (moto), a real local Ray cluster, a tiny checkpoint."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import open_clip
import pytest
import torch
from moto.server import ThreadedMotoServer

from pipeline.model.loading import register_builtin_configs
from tests.support import free_port, s3_client

# Ray 2.60 starts clusters with token authentication; its clients send the token only when
# RAY_AUTH_MODE=token is set before Ray first reads it (at import), hence here. The session's
# own token keeps the tests independent of ~/.ray/auth_token (absent on a fresh machine).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


@pytest.fixture(scope="session")
def moto_endpoint() -> str:
    """A moto S3 server on loopback for the whole session; tests use their own buckets."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path) -> None:
    """Fake credentials and no stray AWS configuration from the host."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def bucket(moto_endpoint, aws_env) -> str:
    """A fresh, empty bucket on the loopback S3 server."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client(moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight lgca-tiny state_dict saved with torch.save (fixed seed)."""
    register_builtin_configs()
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(open_clip.create_model("lgca-tiny").state_dict(), path)
    return path


def stop_cluster(temp_dir: Path) -> None:
    """Kill the processes of the Ray cluster whose temp dir is ``temp_dir`` (and no other cluster)."""
    marker = str(temp_dir).encode()
    for _ in range(2):
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue
        time.sleep(0.5)


# A cluster's nodes have their own object-storage credentials (an instance profile, a
# Kubernetes Secret): the driver sends none (storage.worker_env). These are the loopback S3's.
NODE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_EC2_METADATA_DISABLED": "true"}


def start_cluster(temp_dir: Path, *extra: str) -> str:
    """``ray start --head`` on loopback with 2 CPUs, token authentication and the nodes' own
    credentials (:data:`NODE_CREDENTIALS`); returns the GCS address."""
    port = free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats", *extra],
                   check=True, capture_output=True, env={**os.environ, **NODE_CREDENTIALS})
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> str:
    """A real local Ray cluster (``ray start --head``), connected to from this process."""
    import ray

    temp = tmp_path_factory.mktemp("ray")
    address = start_cluster(temp, "--include-dashboard=false")
    ray.init(address=address)
    yield address
    ray.shutdown()
    stop_cluster(temp)
