"""Tests of jobs/: the example job specs, and the cron, systemd and KubeRay schedules that submit them."""
from __future__ import annotations

import configparser
import re
import shlex
from importlib import metadata
from pathlib import Path

import pytest
import ray
import yaml

from pipeline.commands.submit import build_submission
from pipeline.options import build_job, job_to_options, read_job_file, read_job_spec

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"
SPECS = sorted(JOBS.glob("*.yaml"))
CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))  # minute hour day-of-month month day-of-week
IMAGE = f"registry.example.com/lgca-pipeline:{metadata.version('lgca-pipeline')}-ray{ray.__version__}-py311-gpu"


def cron_field_ok(field: str, low: int, high: int) -> bool:
    """One numeric cron field: '*', 'N', 'A-B', each optionally '/STEP', comma-separated."""
    for part in field.split(","):
        match = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
        if not match:
            return False
        start, end, step = match.group(2), match.group(3), match.group(4)
        numbers = [int(n) for n in (start, end) if n is not None]
        if any(not low <= n <= high for n in numbers) or (end and int(end) < int(start)) or step == "0":
            return False
    return True


def check_schedule(schedule: str) -> None:
    fields = schedule.split()
    assert len(fields) == 5, schedule
    for field, (low, high) in zip(fields, CRON_RANGES):
        assert cron_field_ok(field, low, high), f"{field!r} in {schedule!r}"


def test_cron_field_checker_rejects_bad_fields():
    assert cron_field_ok("*/15", 0, 59) and cron_field_ok("1-5,7", 0, 7) and cron_field_ok("15", 0, 59)
    assert not cron_field_ok("60", 0, 59) and not cron_field_ok("5-1", 0, 23) and not cron_field_ok("*/0", 0, 59)
    assert not cron_field_ok("x", 0, 59)


def test_every_spec_builds_a_named_job_that_round_trips():
    assert [p.name for p in SPECS] == ["example-local.yaml", "example-pets-relabel.yaml", "example-pets.yaml"]
    names = set()
    for path in SPECS:
        kind, options = read_job_spec(str(path))
        job = build_job(options, kind)
        names.add(job.name)
        again = job_to_options(job)
        assert again.pop("kind", "label") == kind and build_job(again, kind) == job
        assert not job.address  # a spec is submitted to a cluster, never bound to one
    assert names == {"lgca-local", "lgca-pets", "lgca-pets-groups"}


def test_pets_relabel_spec_scores_the_pets_labels_states_with_other_classes():
    job = build_job(read_job_file(str(JOBS / "example-pets-relabel.yaml"), "relabel"), "relabel")
    pets = build_job(read_job_file(str(JOBS / "example-pets.yaml")))
    assert job.source == pets.output and job.output != pets.output
    assert (job.scoring.method, job.scoring.steps, job.model.name) == ("lgca", -1, "")  # the source's model and T
    assert job.storage == pets.storage


def test_pets_spec_runs_lgca_on_gpus_from_s3():
    job = build_job(read_job_file(str(JOBS / "example-pets.yaml")))
    assert job.inputs.uris == ("s3://my-lgca-bucket/pets/images/",)
    assert job.output == "s3://my-lgca-bucket/pets/labels/"
    assert job.text.descriptions == "s3://my-lgca-bucket/text/oxford_pet/cupl.json"
    assert (job.model.name, job.model.pretrained, job.model.precision) == ("ViT-B-32", "openai", "fp16")
    assert job.scoring.method == "lgca" and (job.scoring.crops, job.scoring.steps) == (60, 3)
    assert job.scoring.lambda_v == pytest.approx(54.59815, rel=1e-6)  # the default e^4, not a rounding
    res = job.resources
    assert (res.actors_min, res.actors_max, res.gpus_per_actor, res.cpus_per_actor) == (1, 8, 1.0, 2.0)
    assert job.storage.region == "us-east-1"


def test_local_spec_needs_no_download_and_no_gpu():
    job = build_job(read_job_file(str(JOBS / "example-local.yaml")))
    assert (job.model.name, job.model.pretrained, job.model.device) == ("lgca-tiny", "none", "cpu")
    assert job.inputs.uris == ("photos",) and job.output == "labels"  # the README's quick start makes them
    assert job.resources.gpus_per_actor == 0.0
    assert job.text.classes == "classes.txt"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_spec_is_submittable(path):
    submission = build_submission(str(path), "20250131", None, False, 0.0, {})
    kind, options = read_job_spec(str(path))
    assert submission.submission_id == f"{build_job(options, kind).name}-20250131"
    assert submission.entrypoint.startswith(f"python -m pipeline.cli {kind} --config 'data:")


def test_cron_line_submits_the_pets_spec_nightly_without_overlap():
    lines = [line for line in (JOBS / "cron" / "lgca-pets.crontab").read_text().splitlines()
             if line.strip() and not line.startswith("#") and "=" not in line.split()[0]]
    (line,) = lines
    fields = line.split(None, 5)
    check_schedule(" ".join(fields[:5]))
    command = shlex.split(fields[5])
    assert command[command.index("flock") + 1] == "-n"
    lgca = command.index("./venv/bin/lgca")
    assert command[lgca + 1:lgca + 6] == ["submit", "jobs/example-pets.yaml", "--address",
                                         "http://127.0.0.1:8265", "--wait"]


def read_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((JOBS / "systemd" / name).read_text())
    return unit


def test_systemd_timer_starts_a_oneshot_submit():
    timer, service = read_unit("lgca-pets.timer"), read_unit("lgca-pets.service")
    assert timer["Timer"]["OnCalendar"] == "*-*-* 02:15:00 UTC"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["Unit"] == "lgca-pets.service"
    assert timer["Install"]["WantedBy"] == "timers.target"
    assert service["Service"]["Type"] == "oneshot"
    command = shlex.split(service["Service"]["ExecStart"])
    assert command[:3] == ["/opt/lgca/venv/bin/lgca", "submit", "jobs/example-pets.yaml"]
    assert "--wait" in command and (JOBS.parent / command[2]).is_file()


@pytest.fixture(scope="module")
def kube() -> dict[str, dict]:
    """Every Kubernetes object of jobs/kuberay, by kind."""
    objects = [doc for path in sorted((JOBS / "kuberay").glob("*.yaml"))
               for doc in yaml.safe_load_all(path.read_text()) if doc]
    by_kind = {doc["kind"]: doc for doc in objects}
    assert sorted(by_kind) == ["ConfigMap", "CronJob", "RayCluster"] and len(objects) == 3
    return by_kind


def test_cronjob_submits_with_lgca_nightly_and_never_overlaps(kube):
    cron = kube["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    check_schedule(cron["spec"]["schedule"])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    command = container["command"]
    assert command[:2] == ["lgca", "submit"] and "--wait" in command and "--no-working-dir" in command
    address = command[command.index("--address") + 1]
    assert address == f"http://{kube['RayCluster']['metadata']['name']}-head-svc:8265"
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert volume["name"] == mount["name"] and volume["configMap"]["name"] == kube["ConfigMap"]["metadata"]["name"]
    spec_key = command[2].removeprefix(mount["mountPath"] + "/")
    assert spec_key in kube["ConfigMap"]["data"]
    (token,) = container["env"]
    assert token["name"] == "RAY_AUTH_TOKEN"
    assert token["valueFrom"]["secretKeyRef"] == {"name": kube["RayCluster"]["spec"]["authOptions"]["secretName"],
                                                 "key": "auth_token"}


def test_configmap_spec_is_a_valid_job(kube, tmp_path):
    for key, text in kube["ConfigMap"]["data"].items():
        path = tmp_path / key
        path.write_text(text)
        job = build_job(read_job_file(str(path)))
        assert job.name == "lgca-pets" and job.resources.gpus_per_actor == 1.0


def test_raycluster_head_takes_no_work_and_gpu_workers_scale_from_zero(kube):
    cluster = kube["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = spec["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (0, 8)
    pods = [spec["headGroupSpec"]["template"]["spec"], group["template"]["spec"]]
    assert all(c["image"] == IMAGE for pod in pods for c in pod["containers"])
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_ray_pods_read_s3_keys_from_a_secret_and_no_key_is_written_anywhere(kube):
    """Credentials come to the nodes (a Secret, or the ServiceAccount's role when the Secret is
    absent), never with a job: the CronJob's submit sends no AWS settings at all."""
    cluster = kube["RayCluster"]["spec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]]
    for pod in pods:
        assert pod["serviceAccountName"] == "lgca"
        (container,) = pod["containers"]
        assert {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container["env"]} == {
            "AWS_ACCESS_KEY_ID": {"name": "lgca-s3", "key": "access_key_id", "optional": True},
            "AWS_SECRET_ACCESS_KEY": {"name": "lgca-s3", "key": "secret_access_key", "optional": True}}
    submit = kube["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert "--no-forward-aws-env" in submit["command"] and "--forward-credentials" not in submit["command"]
    for path in [*(JOBS / "kuberay").glob("*.yaml"), JOBS.parent / "cluster.yaml", *JOBS.glob("*.yaml")]:
        for doc in yaml.safe_load_all(path.read_text()):
            assert all("value" not in entry for entry in _aws_entries(doc)), path  # no AWS_* given a literal


def _aws_entries(node) -> list:
    """Every mapping with a name starting AWS_ in a parsed YAML document."""
    if isinstance(node, dict):
        own = [node] if str(node.get("name", "")).startswith("AWS_") else []
        return own + [entry for value in node.values() for entry in _aws_entries(value)]
    if isinstance(node, list):
        return [entry for value in node for entry in _aws_entries(value)]
    return []


def test_dockerfile_builds_on_the_pinned_ray_image():
    lines = (JOBS / "kuberay" / "Dockerfile").read_text().splitlines()
    (base,) = [line for line in lines if line.startswith("FROM ")]
    assert base == f"FROM rayproject/ray:{ray.__version__}-py311-gpu"
    assert "RUN pip install --no-cache-dir ." in lines
    build = next(line for line in lines if "docker build" in line)
    assert IMAGE in build
