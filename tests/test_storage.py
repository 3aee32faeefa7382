"""Tests of pipeline.storage: the one rule for what travels to Ray workers, redaction, JSON writes."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time

from pipeline.config import StorageConfig
from pipeline.storage import read_json, redact, worker_env, write_json

SHELL = {
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG", "AWS_SESSION_TOKEN": "FQoGZX",
    "AWS_SECURITY_TOKEN": "old-style-token", "AWS_CREDENTIAL_EXPIRATION": "2030-01-01T00:00:00Z",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9001",
    "AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1", "AWS_RETRY_MODE": "standard",
    "AWS_MAX_ATTEMPTS": "10", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_PROFILE": "dev", "AWS_DEFAULT_PROFILE": "dev", "AWS_CA_BUNDLE": "/etc/ssl/local.pem",
    "AWS_SHARED_CREDENTIALS_FILE": "/home/x/.aws/credentials", "AWS_CONFIG_FILE": "/home/x/.aws/config",
    "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/token", "AWS_ROLE_ARN": "arn:aws:iam::1:role/r",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/creds", "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_DB_PASSWORD": "hunter2hunter2", "RAY_AUTH_TOKEN": "ray-cluster-token", "HOME": "/home/x",
}
SETTINGS = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9001",
            "AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1", "AWS_RETRY_MODE": "standard",
            "AWS_MAX_ATTEMPTS": "10", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"}


def test_only_object_storage_settings_travel_by_default():
    assert worker_env(SHELL) == SETTINGS


def test_credentials_travel_only_when_asked_and_never_other_secrets_or_local_names():
    assert worker_env(SHELL, credentials=True) == {
        **SETTINGS, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG",
        "AWS_SESSION_TOKEN": "FQoGZX", "AWS_SECURITY_TOKEN": "old-style-token",
        "AWS_CREDENTIAL_EXPIRATION": "2030-01-01T00:00:00Z", "AWS_DB_PASSWORD": "hunter2hunter2"}
    assert worker_env({"HOME": "/root"}) == {}


def test_redact_replaces_every_secret_value_of_the_environment():
    message = ("read: PermissionError: signature for wJalrXUtnFEMI/K7MDENG and hunter2hunter2 "
               "via ray-cluster-token from AKIAEXAMPLEKEY in eu-west-1")
    assert redact(message, SHELL) == "read: PermissionError: signature for *** and *** via *** from " \
                                     "AKIAEXAMPLEKEY in eu-west-1"
    assert redact("testing testing", {"AWS_SECRET_ACCESS_KEY": "testing"}) == "testing testing"  # too short a word


def _write_forever(path: str, ready) -> None:
    """Rewrite ``path`` (a JSON file of about 1 MB, which takes a while to write) until killed."""
    count = 0
    while True:
        write_json(path, {"count": count, "items": list(range(100_000))}, StorageConfig())
        ready.set()
        count += 1


def test_a_writer_killed_while_writing_json_leaves_a_whole_file(tmp_path):
    path = str(tmp_path / "runs" / "r1.json")
    fork = multiprocessing.get_context("fork")
    for attempt in range(8):
        ready = fork.Event()
        writer = fork.Process(target=_write_forever, args=(path, ready))
        writer.start()
        assert ready.wait(60)
        time.sleep(0.05 * attempt)  # killed at different points of a write
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        record = read_json(path, StorageConfig())  # a cut file would raise JSONDecodeError here
        assert record["items"] == list(range(100_000))
    assert [p.name for p in (tmp_path / "runs").iterdir() if not p.name.endswith(".tmp")] == ["r1.json"]
