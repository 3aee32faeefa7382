"""``lgca submit``: validate a job spec here, then run it on a Ray cluster as a Ray job.

A submission is idempotent per slot: its id is ``<job name>-<slot>`` (the slot is today's
UTC date unless given), and a slot that was already submitted is reported, never run
twice. Every run is incremental, so a schedule (cron, systemd, Kubernetes) is a repeated
submit. What travels with the job, and how:

- the spec, inside the entrypoint, as a base64 ``data:`` URI that ``lgca label --config``
  (``lgca relabel --config`` for a spec with ``kind: relabel``) opens with fsspec: the
  cluster needs no copy of the file and runs exactly the spec that was validated here;
- the code, as the runtime_env ``working_dir`` (the project root by default), unless the
  cluster's image has the package installed (``--no-working-dir``);
- the ``AWS_*`` settings of the submitting shell, as runtime_env ``env_vars``: endpoint,
  region, retries, never a profile name nor local paths, and credentials only with
  ``--forward-credentials`` (see :func:`forwarded_env`; the nodes' own credentials are the rule);
- the token of a cluster with token authentication, only in the HTTP ``Authorization``
  header (see :func:`auth_token`); it is never written into the job's runtime_env.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import shlex
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, TextIO

import yaml

from pipeline.config import ConfigError, LabelJob, RelabelJob, SubmitError
from pipeline.model.loading import check_names
from pipeline.options import build_job, read_job_spec
from pipeline.storage import is_credential, worker_env

log = logging.getLogger(__name__)

# Kept out of the working_dir upload (gitignore syntax; Ray also honours .gitignore files).
DEFAULT_EXCLUDES = (".git", ".venv", "venv", "**/__pycache__", ".pytest_cache", "*.egg-info",
                    "/out/", "/build/", "/dist/")
# The driver's tasks and actors carry the same AWS_* settings in their own runtime_env
# (plan.remote_env); inside a Ray job those keys are already in the job's env_vars, and Ray
# refuses to merge equal keys unless this is set (the values are the same).
MERGE_ENV = {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray lets these win over address=
# The dashboard of a `ray start --head` on this machine, where the job server listens by default.
# Asked over HTTP like any cluster (with the token in the header); Ray's own lookup of a local
# cluster goes through the GCS, which refuses a client whose RAY_AUTH_MODE is not 'token'.
LOCAL_DASHBOARD = "http://127.0.0.1:8265"
POLL_SECONDS = 1.0




@dataclass(frozen=True)
class Submission:
    """One Ray job, ready to submit."""

    submission_id: str  # '<job name>-<slot>', the key that makes a slot run once
    entrypoint: str  # shell command the job runs on the cluster
    runtime_env: dict[str, Any]  # working_dir + excludes (optional) and env_vars
    entrypoint_num_cpus: float  # 0 pins the driver to the head node (see docs/operations.md)
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SubmitResult:
    """What happened to a submission: submitted now, or found from an earlier submit."""

    submission_id: str
    created: bool  # False: a job with this id existed, nothing was submitted
    status: str  # job status when last seen (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)


def default_slot(now: datetime | None = None) -> str:
    """Today's UTC date as ``YYYYMMDD``: a daily schedule submits each day's slot once."""
    return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y%m%d")


def check_slot(slot: str) -> str:
    """A slot may hold ASCII letters, digits, '-', '_' and '.' (it becomes part of the job id)."""
    if re.fullmatch(r"[A-Za-z0-9_.-]+", slot) is None:
        raise ConfigError(f"slot: {slot!r} may hold only ASCII letters, digits, '-', '_' and '.', "
                          "for example 20250131 or 2025-W05")
    return slot


def load_spec(uri: str) -> tuple[dict[str, Any], LabelJob | RelabelJob]:
    """Read and validate a job spec (``kind: label``, the default, or ``kind: relabel``); returns
    its options (without ``address``, with ``kind`` for a relabel) and the job.

    ``address`` is dropped: a submitted driver runs inside the cluster and connects
    through the ``RAY_ADDRESS`` the job server gives it.
    """
    kind, options = read_job_spec(uri)
    if options.pop("address", None):
        log.info("ignoring 'address' of %s: the job runs inside the cluster it is submitted to", uri)
    job = build_job(options, kind)
    return ({**options, "kind": kind} if kind != "label" else options), job


def spec_data_uri(options: Mapping[str, Any]) -> str:
    """The options as a YAML ``data:`` URI, which ``lgca label --config`` reads like a file."""
    text = yaml.safe_dump(dict(options), sort_keys=True)
    return "data:application/yaml;base64," + base64.b64encode(text.encode()).decode()


def project_root() -> Path:
    """The source checkout this package runs from (the default working_dir upload)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(
            f"working_dir: {root} is not a source checkout of lgca-pipeline; pass --working-dir DIR, "
            "or --no-working-dir when the cluster's image has lgca-pipeline installed")
    return root


def forwarded_env(environ: Mapping[str, str], credentials: bool = False) -> dict[str, str]:
    """The variables to send with the job: :func:`~pipeline.storage.worker_env`'s (credentials
    only when asked), plus the merge switch when there are any. Forwarded credentials are
    announced with where they can be read."""
    env = worker_env(environ, credentials)
    if credentials:
        sent = sorted(name for name in env if is_credential(name))
        if not sent:
            raise ConfigError("forward_credentials: this shell has no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                              "to send (profiles and ~/.aws files never travel); export them, or drop "
                              "--forward-credentials and give the cluster's nodes their own credentials")
        log.warning("--forward-credentials: %s go into the job's runtime_env, which the Ray dashboard and job "
                    "API show to anyone who can reach them, and which Ray writes to the logs of every node "
                    "(runtime_env_agent.log, ray-data/*.log under the session folder); give the nodes their own "
                    "credentials instead (docs/operations.md, Credentials)", ", ".join(sent))
    return {**env, **MERGE_ENV} if env else {}


def build_submission(spec: str, slot: str, working_dir: str | None, forward_aws: bool,
                     entrypoint_num_cpus: float, environ: Mapping[str, str],
                     forward_credentials: bool = False) -> Submission:
    """Validate ``spec`` and describe its job; raises ConfigError before any cluster is contacted.

    ``working_dir`` '' uploads the project root, None uploads nothing (the package must
    then be installed on the cluster). ``forward_aws`` sends the AWS_* settings,
    ``forward_credentials`` the credentials too (see :func:`forwarded_env`).
    """
    if forward_credentials and not forward_aws:
        raise ConfigError("forward_credentials: --forward-credentials sends AWS settings, --no-forward-aws-env "
                          "sends none; drop one")
    options, job = load_spec(spec)
    kind = options.get("kind", "label")
    if isinstance(job, LabelJob):  # a relabel's model is its source's, read where it runs
        check_names(job.model)
    runtime_env: dict[str, Any] = {}
    if working_dir == "":
        working_dir = str(project_root())
    if working_dir is not None:
        if not Path(working_dir).is_dir():
            raise ConfigError(f"working_dir: {working_dir} is not a folder")
        runtime_env.update(working_dir=str(Path(working_dir).resolve()), excludes=list(DEFAULT_EXCLUDES))
    env = forwarded_env(environ, forward_credentials) if forward_aws else {}
    if env:
        runtime_env["env_vars"] = env
    if entrypoint_num_cpus < 0:
        raise ConfigError(f"entrypoint_num_cpus: must be 0 or more, got {entrypoint_num_cpus}")
    entrypoint = f"python -m pipeline.cli {kind} --config {shlex.quote(spec_data_uri(options))}"
    return Submission(submission_id=f"{job.name}-{check_slot(slot)}", entrypoint=entrypoint,
                      runtime_env=runtime_env, entrypoint_num_cpus=entrypoint_num_cpus,
                      metadata={"lgca_spec": spec, "lgca_name": job.name, "lgca_slot": slot})


def auth_token(environ: Mapping[str, str]) -> str | None:
    """The Ray auth token to send, found where Ray's own loader looks, in its order.

    ``RAY_AUTH_TOKEN``, then the file named by ``RAY_AUTH_TOKEN_PATH``, then
    ``~/.ray/auth_token``; none with ``RAY_AUTH_MODE=disabled``. The token is sent even
    when ``RAY_AUTH_MODE`` is unset (Ray's client sends it only in token mode), because a
    cluster without authentication ignores it and one with authentication needs it.
    """
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    named = environ.get("RAY_AUTH_TOKEN_PATH", "")
    if named and not Path(named).is_file():
        raise ConfigError(f"RAY_AUTH_TOKEN_PATH: {named} is not a file")
    home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    path = Path(named) if named else home / ".ray" / "auth_token"
    token = path.read_text().strip() if path.is_file() else ""
    return token or None


def job_server_address(address: str | None, environ: Mapping[str, str]) -> str | None:
    """Where to submit: ``--address``; else None where RAY_API_SERVER_ADDRESS or RAY_ADDRESS is set
    (Ray reads them); else the local dashboard (LOCAL_DASHBOARD)."""
    if address:
        for name in ADDRESS_VARIABLES:
            if environ.get(name) and environ[name] != address:
                raise ConfigError(f"address: {name}={environ[name]} is set, and Ray uses it instead of "
                                  f"--address {address}; unset {name} or drop --address")
        return address
    return None if any(environ.get(name) for name in ADDRESS_VARIABLES) else LOCAL_DASHBOARD


def connect(address: str | None, environ: Mapping[str, str]):
    """A JobSubmissionClient for the dashboard at ``address`` (see :func:`job_server_address`)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = job_server_address(address, environ)
    token = auth_token(environ)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        if token is None:
            raise SubmitError("the cluster requires an auth token and none was found: set RAY_AUTH_TOKEN or "
                              "RAY_AUTH_TOKEN_PATH, or write it to ~/.ray/auth_token (`ray get-auth-token` on "
                              "the head prints it)") from None
        raise SubmitError(f"the cluster refused the token: {exc}\nSet RAY_AUTH_TOKEN (or "
                          "RAY_AUTH_TOKEN_PATH) to the cluster's token (`ray get-auth-token` on the head)") from None
    except ConnectionError as exc:
        where = f" at {address}" if address else ""
        raise SubmitError(f"cannot reach the Ray job server{where}: {exc}. Start a local Ray with `ray start "
                          "--head`, or give the dashboard URL with --address http://HEAD:8265 (for `ray up` "
                          "clusters: `ray dashboard cluster.yaml`)") from None


def find_job(client, submission_id: str):
    """The job's details, or None when no job has this submission id."""
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as exc:
        if "status code 404" in str(exc):
            return None
        raise SubmitError(f"cannot look up job {submission_id}: {exc}") from None


def submit(client, submission: Submission) -> SubmitResult:
    """Submit unless a job with the same id exists (also when another submitter just won the race)."""
    existing = find_job(client, submission.submission_id)
    if existing is not None:
        return SubmitResult(submission.submission_id, created=False, status=str(existing.status))
    try:
        client.submit_job(entrypoint=submission.entrypoint, submission_id=submission.submission_id,
                          runtime_env=submission.runtime_env, metadata=submission.metadata,
                          entrypoint_num_cpus=submission.entrypoint_num_cpus)
    except RuntimeError as exc:
        raced = find_job(client, submission.submission_id) if "already exists" in str(exc) else None
        if raced is None:
            raise SubmitError(f"the cluster refused job {submission.submission_id}: {exc}") from None
        return SubmitResult(submission.submission_id, created=False, status=str(raced.status))
    return SubmitResult(submission.submission_id, created=True, status="PENDING")


async def _print_logs(client, submission_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        out.write(chunk)
        out.flush()


def wait_for(client, submission_id: str, out: TextIO):
    """Stream the job's logs to ``out`` until it ends; returns its final details."""
    try:
        asyncio.run(_print_logs(client, submission_id, out))
    except RuntimeError as exc:
        log.warning("log stream of %s ended early (%s); waiting for the job to finish", submission_id, exc)
    while True:
        details = find_job(client, submission_id)
        if details is None:
            raise SubmitError(f"job {submission_id} disappeared from the cluster while waiting for it")
        if details.status.is_terminal():
            return details
        time.sleep(POLL_SECONDS)


def _reason(details) -> str:
    """': <why>' for a job that did not succeed: the first line of Ray's message, without the log
    excerpt Ray appends (the logs were streamed already)."""
    if str(details.status) == "SUCCEEDED" or not details.message:
        return ""
    return ": " + details.message.splitlines()[0].partition(", last available logs")[0]


def run_submit(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    """``lgca submit``: validate, submit once per slot, optionally wait; returns the exit status."""
    working_dir = None if args.no_working_dir else (args.working_dir or "")
    submission = build_submission(args.spec, args.slot or default_slot(), working_dir,
                                  args.forward_aws_env, args.entrypoint_num_cpus, environ,
                                  args.forward_credentials)
    client = connect(args.address, environ)
    result = submit(client, submission)
    if result.created:
        print(f"{result.submission_id} submitted", file=out)
    else:
        print(f"{result.submission_id} {result.status} (already submitted; this slot is not run again)",
              file=out)
    if not args.wait:
        return 0
    details = wait_for(client, result.submission_id, out)
    print(f"{result.submission_id} {details.status}{_reason(details)}", file=out)
    return 0 if str(details.status) == "SUCCEEDED" else 1


def _handle(args: argparse.Namespace) -> int:
    return run_submit(args, os.environ, sys.stdout)


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``submit`` subcommand to the ``lgca`` command line."""
    parser = commands.add_parser(
        "submit", help="submit a job spec to a Ray cluster as a Ray job (once per slot)",
        description="Validate a job spec here, then run `lgca label` (or `lgca relabel` for a spec with "
                    "'kind: relabel') with it on a Ray cluster. "
                    "The job id is <name>-<slot>; a slot that was already submitted is not run again.")
    parser.add_argument("spec", help="YAML job spec (the file `lgca label --config` or `lgca relabel --config` reads)")
    parser.add_argument("--address", help="Ray dashboard URL, e.g. http://HEAD:8265 (default: "
                                          "RAY_API_SERVER_ADDRESS, RAY_ADDRESS, else the local Ray's "
                                          f"{LOCAL_DASHBOARD})")
    parser.add_argument("--slot", help="schedule slot in the job id (default: today's UTC date, YYYYMMDD)")
    parser.add_argument("--wait", action="store_true",
                        help="stream the job's logs and exit non-zero unless it succeeds")
    code = parser.add_mutually_exclusive_group()
    code.add_argument("--working-dir", "--runtime-env-working-dir", dest="working_dir",
                      help="folder uploaded as the job's working_dir (default: the project root)")
    code.add_argument("--no-working-dir", action="store_true",
                      help="upload no code: the cluster's image has lgca-pipeline installed")
    parser.add_argument("--forward-aws-env", action=argparse.BooleanOptionalAction, default=True,
                        help="send this shell's AWS_* settings (endpoint, region, retries) with the job, not "
                             "credentials, AWS_PROFILE nor file paths (default: yes)")
    parser.add_argument("--forward-credentials", action="store_true",
                        help="also send AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN: the "
                             "dashboard shows them and Ray logs them; prefer the nodes' own credentials")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=0.0,
                        help="CPUs reserved for the driver; 0 (default) runs it on the head node")
    parser.set_defaults(handler=_handle)
