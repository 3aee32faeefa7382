"""``lgca relabel``'s command line: SOURCE, flags and job files of kind relabel (the runs themselves
are tests/distributed/test_relabel.py)."""
from __future__ import annotations

import math

import pytest
import yaml

from pipeline.cli import build_parser, main
from pipeline.config import ConfigError, RelabelJob
from pipeline.options import build_job, job_from_args, job_to_options, read_job_file


def parsed(*argv: str) -> RelabelJob:
    return job_from_args(build_parser().parse_args(["relabel", *argv]), "relabel")


def test_flags_fill_the_text_side_and_the_rest_keeps_label_defaults():
    job = parsed("s3://b/labels", "--output", "s3://b/labels-b", "--classes", "dog,cat", "--method", "wca",
                 "--top-k", "3", "--steps", "1", "--lambda-t", "5", "--batch-size", "1024", "--device", "cpu")
    assert (job.source, job.output, job.text.classes) == ("s3://b/labels", "s3://b/labels-b", "dog,cat")
    assert (job.scoring.method, job.scoring.top_k, job.scoring.steps, job.scoring.lambda_t) == ("wca", 3, 1, 5.0)
    assert (job.resources.batch_size, job.model.device, job.model.name, job.name) == (1024, "cpu", "", "lgca-relabel")
    default = parsed("src", "--output", "out", "--classes", "a,b")
    assert (default.scoring.method, default.scoring.steps, default.scoring.aggregation) == ("lgca", -1, "mean")
    assert default.scoring.lambda_t == pytest.approx(math.e ** 2) and default.resources.file_rows == 4 * 4096


def test_a_job_file_of_kind_relabel_with_flags_winning(tmp_path):
    spec = tmp_path / "relabel.yaml"
    spec.write_text(yaml.safe_dump({"kind": "relabel", "source": "/data/labels", "output": "/data/b",
                                    "classes": "dog,cat", "top_k": 2, "name": "pets-b"}))
    job = parsed("--config", str(spec), "--top-k", "4")
    assert (job.source, job.output, job.scoring.top_k, job.name) == ("/data/labels", "/data/b", 4, "pets-b")
    assert parsed("/other", "--config", str(spec)).source == "/other"  # SOURCE given wins too
    options = job_to_options(job)
    assert options["kind"] == "relabel" and options["source"] == "/data/labels"
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(options))
    assert build_job(read_job_file(str(again), "relabel"), "relabel") == job


def test_a_job_file_of_the_other_kind_is_refused_with_the_command_to_run(tmp_path, capsys):
    relabel = tmp_path / "relabel.yaml"
    relabel.write_text(yaml.safe_dump({"kind": "relabel", "source": "/s", "output": "/o", "classes": "a"}))
    assert main(["label", "--config", str(relabel)]) == 2
    assert f"is a relabel job (kind: relabel); run it with lgca relabel --config {relabel}" in capsys.readouterr().err
    label = tmp_path / "label.yaml"
    label.write_text(yaml.safe_dump({"input": "/i", "output": "/o", "classes": "a"}))
    assert main(["relabel", "--config", str(label)]) == 2
    assert "is a label job (kind: label); run it with lgca label --config" in capsys.readouterr().err
    label.write_text(yaml.safe_dump({"kind": "relabel", "input": "/i", "output": "/o", "classes": "a"}))
    with pytest.raises(ConfigError, match="unknown key 'input'.*known keys: kind, source, output"):
        read_job_file(str(label), "relabel")
    label.write_text(yaml.safe_dump({"kind": "rescore"}))
    with pytest.raises(ConfigError, match="kind 'rescore' .* is not one of label, relabel"):
        read_job_file(str(label))


def test_a_relabel_needs_a_source_other_than_its_output(capsys):
    assert main(["relabel", "--output", "o", "--classes", "a"]) == 2
    assert "source: missing; give SOURCE or 'source:' in the job file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="output: must not be the source"):
        parsed("s3://b/x/", "--output", "s3://b/x", "--classes", "a")
