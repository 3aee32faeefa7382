"""Tests of ``lgca submit`` (pipeline.commands.submit): spec validation, job ids, auth tokens, and real
submissions to a local Ray cluster with a job server and token authentication."""
from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
import skimage.data
import yaml
from PIL import Image

from pipeline import cli
from pipeline.commands import submit
from pipeline.config import ConfigError
from pipeline.options import build_job, read_job_file
from tests.support import free_port

CLASSES = "cat,astronaut,coffee,rocket"
PHOTOS = {"chelsea": (451, 300), "astronaut": (512, 512), "coffee": (600, 400), "rocket": (640, 427),
          "camera": (512, 512), "hubble_deep_field": (1000, 872)}  # skimage photo: (width, height)


@dataclass(frozen=True)
class JobServer:
    url: str  # the dashboard (job server) URL
    token: str  # the cluster's auth token


@pytest.fixture(scope="module")
def job_server(tmp_path_factory) -> JobServer:
    """A local Ray head with the job server and token authentication; stopped (only it) afterwards.

    `ray start --block` keeps the head in the foreground, so terminating that one process
    stops exactly this cluster. PATH starts with this virtualenv, as on a real node whose
    `python` has the dependencies.
    """
    token, temp = secrets.token_hex(16), tmp_path_factory.mktemp("ray-jobs")
    port, dashboard, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    log = open(temp / "head.log", "w")
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_server(url, token, head, temp / "head.log")
        yield JobServer(url, token)
    finally:
        head.terminate()
        head.wait(timeout=60)
        log.close()


def _wait_for_job_server(url: str, token: str, head: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            reply = requests.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=5)
            if reply.status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the job server at {url} did not come up:\n{log.read_text()[-3000:]}")


@pytest.fixture
def lgca():
    """``lgca`` as the console script runs it."""
    return cli.main


@pytest.fixture
def clean_env(monkeypatch):
    """No Ray address, auth or AWS settings from the host; one AWS variable to forward."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")


def save_photos(folder: Path, names: list[str]) -> list[str]:
    """skimage photos saved as JPEG files in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.jpg"
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path, quality=90)
        paths.append(str(path))
    return paths


def write_spec(path: Path, **options) -> Path:
    path.write_text(yaml.safe_dump(options))
    return path


def tiny_spec(tmp_path: Path, checkpoint: Path, name: str, images: Path, output: Path) -> Path:
    """A fast job spec: lgca-tiny, 8 crops, 1 expansion step, CPU actors."""
    return write_spec(tmp_path / f"{name}.yaml", name=name, input=[str(images)], output=str(output),
                      classes=CLASSES, model="lgca-tiny", pretrained=str(checkpoint), crops=8,
                      steps=1, **{"expand-top": 2, "batch-size": 4, "actors": "1"})


def read_rows(output: Path) -> list[dict]:
    columns = ["id", "uri", "status", "width", "height", "label", "topk_labels", "run_id"]
    return pq.read_table(output / "data", columns=columns).to_pylist()


def run_record(output: Path, run_id: str) -> dict:
    return json.loads((output / "_lgca" / "runs" / f"{run_id}.json").read_text())


# --- without a cluster ---------------------------------------------------------------------------

def test_default_slot_is_the_utc_date():
    evening_in_new_york = datetime(2025, 1, 31, 20, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert submit.default_slot(evening_in_new_york) == "20250201"
    assert submit.default_slot(datetime(2025, 1, 31, 0, 0, tzinfo=timezone.utc)) == "20250131"


SUBMITTING_SHELL = {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret-key-value",
                    "AWS_SESSION_TOKEN": "session-token-value", "RAY_AUTH_TOKEN": "tok", "HOME": "/home/x",
                    "AWS_MAX_ATTEMPTS": "10", "AWS_RETRY_MODE": "standard", "AWS_REGION": "eu-west-1",
                    "AWS_PROFILE": "dev", "AWS_CA_BUNDLE": "/etc/ssl/l.pem",
                    "AWS_SHARED_CREDENTIALS_FILE": "/home/x/.aws/credentials"}  # the last three are never sent
SENT_SETTINGS = {"AWS_MAX_ATTEMPTS": "10", "AWS_RETRY_MODE": "standard", "AWS_REGION": "eu-west-1",
                 "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}


def test_submission_carries_the_validated_spec_and_aws_settings_not_credentials(tmp_path, tiny_checkpoint, caplog):
    spec = tiny_spec(tmp_path, tiny_checkpoint, "pets", tmp_path / "img", tmp_path / "out")
    with spec.open("a") as handle:
        handle.write("address: ray://elsewhere:10001\n")
    job = submit.build_submission(str(spec), "20250131", str(tmp_path), True, 0.0, SUBMITTING_SHELL)

    assert job.submission_id == "pets-20250131"
    assert job.entrypoint_num_cpus == 0.0
    assert job.runtime_env["working_dir"] == str(tmp_path.resolve())
    assert ".git" in job.runtime_env["excludes"]
    assert job.runtime_env["env_vars"] == SENT_SETTINGS
    for secret in ("tok", "secret-key-value", "session-token-value"):
        assert secret not in json.dumps(job.runtime_env) and secret not in job.entrypoint
    assert "--forward-credentials" not in caplog.text
    argv = shlex.split(job.entrypoint)
    assert argv[:5] == ["python", "-m", "pipeline.cli", "label", "--config"]
    shipped = read_job_file(argv[5])
    expected = read_job_file(str(spec))
    expected.pop("address")
    assert shipped == expected
    assert build_job(shipped) == build_job(expected)
    assert yaml.safe_load(base64.b64decode(argv[5].split(",", 1)[1]))["crops"] == 8


def test_credentials_travel_only_with_forward_credentials_which_says_where_they_show(tmp_path, tiny_checkpoint,
                                                                                    caplog):
    spec = tiny_spec(tmp_path, tiny_checkpoint, "pets", tmp_path / "img", tmp_path / "out")
    job = submit.build_submission(str(spec), "1", None, True, 0.0, SUBMITTING_SHELL, forward_credentials=True)
    assert job.runtime_env["env_vars"] == {**SENT_SETTINGS, "AWS_ACCESS_KEY_ID": "key",
                                           "AWS_SECRET_ACCESS_KEY": "secret-key-value",
                                           "AWS_SESSION_TOKEN": "session-token-value"}
    assert "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN go into the job's runtime_env" in caplog.text
    assert "dashboard" in caplog.text and "runtime_env_agent.log" in caplog.text
    assert "secret-key-value" not in caplog.text
    with pytest.raises(ConfigError, match="no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY to send"):
        submit.build_submission(str(spec), "1", None, True, 0.0, {"AWS_REGION": "eu-west-1"}, forward_credentials=True)
    with pytest.raises(ConfigError, match="drop one"):
        submit.build_submission(str(spec), "1", None, False, 0.0, SUBMITTING_SHELL, forward_credentials=True)


def test_a_relabel_spec_runs_lgca_relabel_with_its_kind(tmp_path):
    spec = write_spec(tmp_path / "relabel.yaml", kind="relabel", name="pets-b", source="s3://b/labels",
                      output="s3://b/labels-b", classes="dog,cat", method="wca", address="ray://elsewhere:10001")
    job = submit.build_submission(str(spec), "20250131", None, False, 0.0, {})
    argv = shlex.split(job.entrypoint)
    assert job.submission_id == "pets-b-20250131"
    assert argv[:5] == ["python", "-m", "pipeline.cli", "relabel", "--config"]
    assert yaml.safe_load(base64.b64decode(argv[5].split(",", 1)[1])) == {
        "kind": "relabel", "name": "pets-b", "source": "s3://b/labels", "output": "s3://b/labels-b",
        "classes": "dog,cat", "method": "wca"}
    relabel = build_job(read_job_file(argv[5], "relabel"), "relabel")
    assert (relabel.source, relabel.scoring.method, relabel.text.classes) == ("s3://b/labels", "wca", "dog,cat")


def test_no_working_dir_and_no_aws_forwarding(tmp_path, tiny_checkpoint):
    spec = tiny_spec(tmp_path, tiny_checkpoint, "pets", tmp_path / "img", tmp_path / "out")
    job = submit.build_submission(str(spec), "w05", None, False, 1.0, {"AWS_REGION": "eu-west-1"})
    assert job.runtime_env == {}
    assert job.entrypoint_num_cpus == 1.0
    assert job.metadata == {"lgca_spec": str(spec), "lgca_name": "pets", "lgca_slot": "w05"}


def test_default_working_dir_is_the_project_root(tmp_path, tiny_checkpoint):
    spec = tiny_spec(tmp_path, tiny_checkpoint, "pets", tmp_path / "img", tmp_path / "out")
    job = submit.build_submission(str(spec), "1", "", False, 0.0, {})
    root = Path(job.runtime_env["working_dir"])
    assert (root / "pipeline" / "commands" / "submit.py").is_file() and (root / "pyproject.toml").is_file()


@pytest.mark.parametrize("model, pretrained, message", [
    ("ViT-B-32x", "none", r"model: 'ViT-B-32x' not found; did you mean ViT-B-32"),
    ("ViT-B-32", "opneai", r"'opneai' is not a pretrained tag of 'ViT-B-32' \(available tags: .*openai"),
])
def test_a_spec_naming_an_unknown_model_or_tag_is_not_submitted(tmp_path, model, pretrained, message):
    spec = write_spec(tmp_path / "bad.yaml", name="bad", input=["s3://b/images/"], output="s3://b/labels/",
                      classes="cat,dog", model=model, pretrained=pretrained)
    with pytest.raises(ConfigError, match=message):
        submit.build_submission(str(spec), "20250131", None, False, 0.0, {})


def test_checkpoint_paths_are_left_to_the_cluster(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mycheckpoint").write_bytes(b"uploaded with the job")
    for pretrained in ("weights/model.pt", "model.safetensors", "s3://b/model.pt", "mycheckpoint"):
        spec = write_spec(tmp_path / "ok.yaml", name="ok", input=["s3://b/images/"], output="s3://b/labels/",
                          classes="cat,dog", model="ViT-B-32", pretrained=pretrained)
        assert submit.build_submission(str(spec), "20250131", None, False, 0.0, {}).submission_id == "ok-20250131"


@pytest.mark.parametrize("slot", ["", "2025/01/31", "a b", "été"])
def test_bad_slots_are_refused(slot):
    with pytest.raises(ConfigError, match="slot"):
        submit.check_slot(slot)


def test_auth_token_sources_in_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    named = tmp_path / "named-token"
    named.write_text("  from-path  \n")
    env = {"HOME": str(home)}
    assert submit.auth_token({**env, "RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(named)}) == "from-env"
    assert submit.auth_token({**env, "RAY_AUTH_TOKEN_PATH": str(named)}) == "from-path"
    assert submit.auth_token(env) == "from-home"
    assert submit.auth_token({**env, "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}) is None
    assert submit.auth_token({"HOME": str(tmp_path / "nobody")}) is None
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN_PATH: .*missing is not a file"):
        submit.auth_token({**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_bad_spec_fails_before_the_cluster_is_contacted(tmp_path, lgca, clean_env, capsys):
    spec = write_spec(tmp_path / "bad.yaml", name="pets", input=["s3://b/img"], output="s3://b/out",
                      classes="cat,dog", crops=0)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: contacting it would exit 1
    assert lgca(["submit", str(spec), "--address", closed]) == 2
    assert "lgca submit: error: crops: must be at least 1, got 0" in capsys.readouterr().err
    write_spec(spec, name="pets", output="s3://b/out", classes="cat,dog")
    assert lgca(["submit", str(spec), "--address", closed]) == 2
    assert "input: missing" in capsys.readouterr().err
    assert lgca(["submit", str(tmp_path / "absent.yaml"), "--address", closed]) == 2
    assert "not found" in capsys.readouterr().err


def test_forward_credentials_is_a_flag_of_lgca_submit(tmp_path, lgca, clean_env, capsys, tiny_checkpoint):
    spec = tiny_spec(tmp_path, tiny_checkpoint, "pets", tmp_path / "img", tmp_path / "out")
    closed = f"http://127.0.0.1:{free_port()}"  # refused before it is contacted
    assert lgca(["submit", str(spec), "--address", closed, "--forward-credentials", "--no-forward-aws-env"]) == 2
    assert "--forward-credentials sends AWS settings, --no-forward-aws-env sends none" in capsys.readouterr().err
    assert lgca(["submit", str(spec), "--address", closed, "--forward-credentials"]) == 2  # clean_env: no keys
    assert "this shell has no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY to send" in capsys.readouterr().err


def test_unreachable_cluster_says_how_to_connect(tmp_path, lgca, clean_env, capsys, tiny_checkpoint):
    spec = tiny_spec(tmp_path, tiny_checkpoint, "pets", tmp_path / "img", tmp_path / "out")
    assert lgca(["submit", str(spec), "--address", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "cannot reach the Ray job server" in capsys.readouterr().err


def test_ray_address_overriding_address_is_an_error(tmp_path, lgca, clean_env, monkeypatch, capsys,
                                                    tiny_checkpoint):
    spec = tiny_spec(tmp_path, tiny_checkpoint, "pets", tmp_path / "img", tmp_path / "out")
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert lgca(["submit", str(spec), "--address", "http://127.0.0.1:8265"]) == 2
    assert "RAY_ADDRESS=http://10.0.0.1:8265 is set" in capsys.readouterr().err


def test_without_an_address_the_local_dashboard_is_asked_unless_ray_variables_say_otherwise():
    assert submit.job_server_address(None, {}) == submit.LOCAL_DASHBOARD == "http://127.0.0.1:8265"
    assert submit.job_server_address(None, {"RAY_ADDRESS": "http://head:8265"}) is None  # Ray reads it
    assert submit.job_server_address("http://head:8265", {}) == "http://head:8265"


# --- against a real cluster ----------------------------------------------------------------------

def test_a_local_ray_is_reached_without_address_with_the_token_of_its_home(tmp_path, job_server, lgca, clean_env,
                                                                          monkeypatch, capsys, tiny_checkpoint):
    """`ray start --head` here, then `lgca submit JOB.yaml`: no --address, no RAY_AUTH_* variables, the
    token where `ray start` left it (~/.ray/auth_token)."""
    monkeypatch.setattr(submit, "LOCAL_DASHBOARD", job_server.url)  # the fixture's head is not on port 8265
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(job_server.token + "\n")
    spec = tiny_spec(tmp_path, tiny_checkpoint, "lgca-here", tmp_path / "absent", tmp_path / "labels")
    assert lgca(["submit", str(spec), "--slot", "s1"]) == 0
    assert capsys.readouterr().out == "lgca-here-s1 submitted\n"
    client = submit.connect(job_server.url, {"RAY_AUTH_TOKEN": job_server.token})
    assert client.get_job_info("lgca-here-s1").submission_id == "lgca-here-s1"


def test_wrong_or_missing_token_is_refused(tmp_path, job_server, lgca, clean_env, monkeypatch, capsys,
                                           tiny_checkpoint):
    spec = tiny_spec(tmp_path, tiny_checkpoint, "pets", tmp_path / "img", tmp_path / "out")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert lgca(["submit", str(spec), "--address", job_server.url]) == 1
    assert "the cluster refused the token" in capsys.readouterr().err
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    assert lgca(["submit", str(spec), "--address", job_server.url]) == 1
    assert "the cluster requires an auth token and none was found" in capsys.readouterr().err


def test_slots_label_only_new_images_and_run_once(tmp_path, job_server, lgca, clean_env, monkeypatch,
                                                  capsys, tiny_checkpoint):
    monkeypatch.setenv("RAY_AUTH_TOKEN", job_server.token)
    images, output = tmp_path / "images", tmp_path / "labels"
    first = save_photos(images, ["chelsea", "astronaut", "coffee", "rocket"])
    spec = tiny_spec(tmp_path, tiny_checkpoint, "lgca-nightly", images, output)

    assert lgca(["submit", str(spec), "--address", job_server.url, "--slot", "day1", "--wait"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lgca-nightly-day1 submitted\n")
    assert "4 ok, 0 error rows, 0 already labelled" in out
    assert out.rstrip().endswith("lgca-nightly-day1 SUCCEEDED")
    rows = read_rows(output)
    assert sorted(r["uri"] for r in rows) == sorted(first)
    assert [r["id"] for r in rows] == [r["uri"] for r in rows]
    for row in rows:
        assert row["status"] == "ok"
        assert (row["width"], row["height"]) == PHOTOS[Path(row["uri"]).stem]
        assert row["label"] == row["topk_labels"][0]
        assert sorted(row["topk_labels"]) == sorted(CLASSES.split(","))
    (run1,) = {r["run_id"] for r in rows}
    assert run_record(output, run1)["counts"] == {"ok": 4, "error": 0, "skipped": 0, "skipped_shards": 0}

    second = save_photos(images, ["camera", "hubble_deep_field"])
    assert lgca(["submit", str(spec), "--address", job_server.url, "--slot", "day2", "--wait"]) == 0
    assert "2 ok, 0 error rows, 4 already labelled" in capsys.readouterr().out
    rows = read_rows(output)
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    new = [r for r in rows if r["run_id"] != run1]
    assert sorted(r["uri"] for r in new) == sorted(second)
    assert run_record(output, new[0]["run_id"])["counts"] == {"ok": 2, "error": 0, "skipped": 4, "skipped_shards": 0}

    data_files = sorted((output / "data").iterdir())
    assert lgca(["submit", str(spec), "--address", job_server.url, "--slot", "day2"]) == 0
    assert capsys.readouterr().out == ("lgca-nightly-day2 SUCCEEDED "
                                       "(already submitted; this slot is not run again)\n")
    assert lgca(["submit", str(spec), "--address", job_server.url, "--slot", "day1", "--wait"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("lgca-nightly-day1 SUCCEEDED")
    assert sorted((output / "data").iterdir()) == data_files

    client = submit.connect(job_server.url, os.environ)
    ours = sorted(j.submission_id for j in client.list_jobs() if j.submission_id.startswith("lgca-nightly-"))
    assert ours == ["lgca-nightly-day1", "lgca-nightly-day2"]
    details = client.get_job_info("lgca-nightly-day2")
    assert details.runtime_env["env_vars"] == {"AWS_DEFAULT_REGION": "eu-west-1",
                                               "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    assert job_server.token not in json.dumps(details.runtime_env) + details.entrypoint
    assert details.metadata == {"lgca_spec": str(spec), "lgca_name": "lgca-nightly", "lgca_slot": "day2"}


def test_job_failing_on_the_cluster_exits_non_zero_with_the_reason(tmp_path, job_server, lgca, clean_env,
                                                                    monkeypatch, capsys, tiny_checkpoint):
    monkeypatch.setenv("RAY_AUTH_TOKEN", job_server.token)
    missing = tmp_path / "not-on-the-cluster"
    spec = tiny_spec(tmp_path, tiny_checkpoint, "lgca-broken", missing, tmp_path / "labels")
    assert lgca(["submit", str(spec), "--address", job_server.url, "--slot", "s1", "--wait"]) == 1
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert f"lgca label: error: {missing}: no such file, folder or prefix" in lines
    assert lines[-1] == "lgca-broken-s1 FAILED: Job entrypoint command failed with exit code 2"
    assert not (tmp_path / "labels" / "data").exists()
