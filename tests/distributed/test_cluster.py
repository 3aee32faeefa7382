"""Tests of cluster.yaml, the Ray cluster-launcher config, against the installed Ray."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_validates_against_the_installed_ray_schema(cluster):
    """What `ray up` does before it contacts AWS: fill in the provider defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_image_matches_the_pinned_ray_version(cluster):
    assert cluster["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    pinned = [line for line in (ROOT / "pyproject.toml").read_text().splitlines() if '"ray[' in line]
    assert pinned and all(f"=={ray.__version__}" in line for line in pinned)


def test_head_takes_no_work_and_gpu_workers_scale_from_zero_on_spot(cluster):
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    worker = types["gpu_worker"]
    assert worker["min_workers"] == 0
    assert worker["max_workers"] == cluster["max_workers"] == 8
    assert worker["resources"] == {"CPU": 4, "GPU": 1}
    assert worker["node_config"]["InstanceType"] == "g5.xlarge"
    assert worker["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert "InstanceMarketOptions" not in types["head"]["node_config"]
    assert cluster["idle_timeout_minutes"] == 10
    assert cluster["upscaling_speed"] == 1.0


def test_nodes_install_this_checkout(cluster):
    """The mounted folder is this project (relative to where `ray up` runs), and it is installed."""
    (remote, local), = cluster["file_mounts"].items()
    assert (ROOT / local / "pyproject.toml").is_file() and (ROOT / local / "pipeline" / "commands" / "submit.py").is_file()
    assert cluster["setup_commands"] == [f"pip install --no-cache-dir -e {remote}"]
    assert "**/.git" in cluster["rsync_exclude"]


def test_head_serves_the_job_api_on_the_default_port(cluster):
    (start,) = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert "--head" in start and "--dashboard-host=0.0.0.0" in start
    assert "--dashboard-port" not in start  # the default 8265 that docs and lgca submit use
    assert all("--num-cpus" not in c for c in cluster["head_start_ray_commands"])  # resources: {CPU: 0} decides


def test_nodes_have_their_own_s3_credentials_and_none_is_written_here(cluster):
    """The workers' instance profile gives them S3 access; no AWS key is in the file (the head's
    role is Ray's default profile, to which docs/operations.md has the S3 policy attached)."""
    worker = cluster["available_node_types"]["gpu_worker"]["node_config"]
    assert worker["IamInstanceProfile"] == {"Name": "lgca-s3"}
    text = (ROOT / "cluster.yaml").read_text()
    assert "AWS_ACCESS_KEY_ID" not in text and "AWS_SECRET_ACCESS_KEY" not in text
