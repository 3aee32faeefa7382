"""Job specs: one option table for flags and YAML, flags winning, typed conversion."""
from __future__ import annotations

import argparse
import re

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.options import (OPTIONS, add_label_arguments, build_job, job_from_args, job_to_options,
                              parse_actors, read_job_file)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_label_arguments(parser)
    return parser.parse_args(argv)


def test_yaml_keys_are_the_flag_names_and_flags_win(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "input": ["s3://b/one/", "s3://b/two/"], "output": "s3://b/labels", "classes": "cat,dog",
        "gpus_per_actor": 1, "actors": "2-8", "crops": 30, "anon": True, "method": "wca"}))
    job = job_from_args(parse("--config", str(spec), "--crops", "45", "--input", "/data/x"))
    assert job.inputs.uris == ("/data/x",)  # a repeated flag replaces the file's list
    assert job.scoring.crops == 45 and job.scoring.method == "wca"
    assert (job.resources.actors_min, job.resources.actors_max, job.resources.gpus_per_actor) == (2, 8, 1.0)
    assert job.storage.anon is True and job.output == "s3://b/labels"


def test_defaults_are_the_method_references():
    job = build_job({"input": ["x"], "output": "o", "classes": "a,b"})
    assert (job.scoring.crops, job.scoring.alpha, job.scoring.beta, job.scoring.steps,
            job.scoring.expand_top, job.scoring.expand_ratio, job.scoring.method) == (60, 0.5, 0.9, 3, 6, 1.25, "lgca")
    assert job.resources.gpus_per_actor == 0 and job.model.name == "ViT-B-32"


def test_round_trip_through_options():
    job = build_job({"input": ["x", "y"], "output": "o", "classes": "a,b", "actors": "3", "seed": 7,
                     "aggregation": "0.1,0.2,0.3,0.4"})
    assert build_job(job_to_options(job)) == job


@pytest.mark.parametrize("options,message", [
    ({"output": "o", "classes": "a"}, "input: missing"),
    ({"input": ["x"], "output": "o", "classes": "a", "crops": "many"}, "crops: 'many' is not valid"),
    ({"input": ["x"], "output": "o", "classes": "a", "actors": "two"}, "actors: 'two' is not N or MIN-MAX"),
    ({"input": ["x"], "output": "o", "classes": "a", "anon": "maybe"}, "anon: 'maybe' is not valid"),
    ({"input": ["x"], "output": "o", "classes": "a", "device": "cuda"}, "needs gpus_per_actor > 0"),
    ({"input": ["x"], "output": "o", "classes": "a", "name": "my job"}, "name: 'my job'"),
])
def test_invalid_options_name_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        build_job(options)


def test_job_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_job_file(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [x\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_job_file(str(bad))
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_job_file(str(listed))


def job_file(tmp_path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text("input: [x]\noutput: o\nclasses: a,b\n" + text)
    return str(path)


@pytest.mark.parametrize("text,message", [
    ("crops: 2.9\n", "crops: 2.9 is not valid; expected a whole number for N, random square crops per image"),
    ("seed: 1.7\n", "seed: 1.7 is not valid; expected a whole number"),
    ("top-k: true\n", "top-k: True is not valid; expected a whole number"),
    ("alpha: false\n", "alpha: False is not valid; expected a number"),
    ("name: 2025\n", "name: 2025 is not valid; expected a string for job name, the start of its submission ids; put it in quotes if it is meant "
                     "as text (name: \"2025\")"),
    ("model: [ViT-B-32]\n", "model: ['ViT-B-32'] is not valid; expected a string"),
    ("anon: 'yes'\n", "anon: 'yes' is not valid; expected true or false"),
    ("overwrite: 1\n", "overwrite: 1 is not valid; expected true or false"),
])
def test_yaml_values_of_another_type_are_refused_not_forced(tmp_path, text, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        build_job(read_job_file(job_file(tmp_path, text)))


def test_a_yaml_list_is_refused_for_classes_and_taken_for_inputs(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: [x, y]\noutput: o\nclasses: [cat, dog]\n")
    with pytest.raises(ConfigError, match=re.escape("classes: ['cat', 'dog'] is not valid; expected a string")):
        build_job(read_job_file(str(path)))
    path.write_text("input: [x, [y]]\noutput: o\nclasses: a,b\n")
    with pytest.raises(ConfigError, match=re.escape("input: ['y'] is not valid; expected a string")):
        build_job(read_job_file(str(path)))
    assert build_job(read_job_file(job_file(tmp_path, ""))).inputs.uris == ("x",)


def test_numbers_may_be_yaml_numbers_or_flag_strings(tmp_path):
    job = build_job(read_job_file(job_file(tmp_path, "crops: '12'\nalpha: '0.25'\nbeta: 1\nseed: 3\n")))
    assert (job.scoring.crops, job.scoring.alpha, job.scoring.beta, job.scoring.seed) == (12, 0.25, 1.0, 3)
    job = job_from_args(parse("--config", job_file(tmp_path, "anon: true\n"), "--crops", "7", "--alpha", "0.3"))
    assert (job.scoring.crops, job.scoring.alpha, job.storage.anon) == (7, 0.3, True)
    job = job_from_args(parse("--config", job_file(tmp_path, "anon: 'True'\noverwrite: 'false'\n")))
    assert (job.storage.anon, job.overwrite) == (True, False)  # the words true/false, quoted, as before


@pytest.mark.parametrize("key", ["output", "pretrained", "gpus_per_actor"])
def test_an_empty_job_file_key_is_refused(tmp_path, key):
    path = tmp_path / "job.yaml"
    path.write_text(f"input: [x]\nclasses: a,b\n{key}:\n")
    with pytest.raises(ConfigError, match=f"^config: job file key '{key}' is empty; give a value or remove the key$"):
        read_job_file(str(path))


def test_a_job_file_key_given_twice_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML: key 'crops' is given twice; keep one"):
        read_job_file(job_file(tmp_path, "crops: 60\ncrops: 6\n"))
    with pytest.raises(ConfigError, match="'expand_top' and 'expand-top' in .* both give expand-top; keep one"):
        read_job_file(job_file(tmp_path, "expand_top: 6\nexpand-top: 2\n"))


def test_actor_ranges():
    assert parse_actors("4") == (4, 4) and parse_actors("1-8") == (1, 8) and parse_actors(2) == (2, 2)


def test_every_option_has_a_flag_and_help():
    parser = argparse.ArgumentParser()
    add_label_arguments(parser)
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings}
    assert {f"--{o.flag}" for o in OPTIONS} <= flags
    assert all(o.help for o in OPTIONS)


def test_other_commands_take_label_options_with_the_same_names_types_and_help():
    import argparse

    from pipeline.options import add_option_arguments, given_options

    parser = argparse.ArgumentParser()
    add_option_arguments(parser, ("crops", "alpha", "anon", "classes", "model"), required=("classes",))
    args = parser.parse_args(["--crops", "12", "--alpha", "0.3", "--anon", "--classes", "a,b"])
    given = given_options(args, ("crops", "alpha", "anon", "classes", "model"))
    assert given["scoring"] == {"crops": 12, "alpha": 0.3}  # typed; model was not given
    assert given["storage"] == {"anon": True} and given["text"] == {"classes": "a,b"} and given["model"] == {}
    with pytest.raises(SystemExit):  # a required option is still required
        parser.parse_args(["--crops", "12"])


def test_retry_errors_alone_means_read_and_takes_stages(tmp_path):
    base = ("--input", "/data/x", "--output", "/o", "--classes", "cat")
    assert job_from_args(parse(*base)).retry_errors == ""
    assert job_from_args(parse(*base, "--retry-errors")).retry_errors == "read"
    assert job_from_args(parse(*base, "--retry-errors", "read,score")).retry_errors == "read,score"
    spec = job_file(tmp_path, "retry-errors: read,tar\nretries: 4\n")
    job = job_from_args(parse("--config", spec))
    assert (job.retry_errors, job.storage.retries) == ("read,tar", 4)
    assert build_job(job_to_options(job)) == job
