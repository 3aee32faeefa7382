"""Config validation: every bad value names its field and what to do."""
from __future__ import annotations

import math

import pytest

from pipeline.config import (ConfigError, InputConfig, LabelJob, ModelConfig, ResourceConfig, ScoringParams,
                             StorageConfig, TextConfig, parse_aggregation)


def test_aggregation_weights():
    assert parse_aggregation("mean", 3) == (0.25, 0.25, 0.25, 0.25)
    assert parse_aggregation("last", 2) == (0.0, 0.0, 1.0)
    assert parse_aggregation("0.5,0.25,0.25", 2) == (0.5, 0.25, 0.25)
    assert ScoringParams(steps=0).step_weights == (1.0,)


def test_method_costs():
    assert ScoringParams().encoder_inputs_per_image() == 79
    assert ScoringParams(method="wca").encoder_inputs_per_image() == 61
    assert ScoringParams(method="clip").encoder_inputs_per_image() == 1
    assert ScoringParams().lambda_v == pytest.approx(math.e ** 4)
    assert ScoringParams().lambda_t == pytest.approx(math.e ** 2)


@pytest.mark.parametrize("make,field", [
    (lambda: ScoringParams(method="xyz"), "method"),
    (lambda: ScoringParams(alpha=0.9, beta=0.5), "alpha/beta"),
    (lambda: ScoringParams(expand_top=61), "expand_top"),
    (lambda: ScoringParams(expand_ratio=0.9), "expand_ratio"),
    (lambda: ScoringParams(aggregation="median"), "aggregation"),
    (lambda: ScoringParams(steps=-1), "steps"),
    (lambda: ModelConfig(precision="fp8"), "precision"),
    (lambda: ModelConfig(device="tpu"), "device"),
    (lambda: TextConfig(classes=" "), "classes"),
    (lambda: InputConfig(()), "input"),
    (lambda: InputConfig(("x",), format="zip"), "input_format"),
    (lambda: ResourceConfig(actors_min=0), "actors"),
    (lambda: ResourceConfig(batch_size=0), "batch_size"),
    (lambda: ResourceConfig(rows_per_file=-1), "rows_per_file"),
    (lambda: StorageConfig(endpoint_url="localhost:9000"), "endpoint_url"),
    (lambda: StorageConfig(retries=0), "retries: must be at least 1"),
    (lambda: LabelJob(inputs=InputConfig(("x",)), output="", text=TextConfig("a")), "output"),
    (lambda: ResourceConfig(gpus_per_actor=math.inf), "gpus_per_actor"),
    (lambda: ResourceConfig(cpus_per_actor=math.nan), "cpus_per_actor"),
    (lambda: LabelJob(inputs=InputConfig(("x",)), output="s3://b/exp[12]", text=TextConfig("a")), "output"),
    (lambda: LabelJob(inputs=InputConfig(("x",)), output="o", text=TextConfig("a"), name=""), "name"),
    (lambda: LabelJob(inputs=InputConfig(("x",)), output="o", text=TextConfig("a"), name="-x"), "name"),
    (lambda: LabelJob(inputs=InputConfig(("x",)), output="o", text=TextConfig("a"), name="étiquettes"), "name"),
])
def test_invalid_values_name_their_field(make, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        make()


def test_rows_per_file_auto_is_one_call_on_cpus_and_4096_rows_with_gpus():
    assert ResourceConfig(batch_size=16).file_rows == 16
    assert ResourceConfig(batch_size=16, gpus_per_actor=1).file_rows == 4096
    assert ResourceConfig(batch_size=16, rows_per_file=100).file_rows == 100
    assert ResourceConfig(batch_size=16, rows_per_file=5, gpus_per_actor=1).file_rows == 16  # never below a call


def test_a_job_name_must_make_a_submission_id():
    with pytest.raises(ConfigError, match="^name: '' must start with a letter or digit"):
        LabelJob(inputs=InputConfig(("x",)), output="o", text=TextConfig("a"), name="")
    assert LabelJob(inputs=InputConfig(("x",)), output="o", text=TextConfig("a"), name="pets_v2.1").name == "pets_v2.1"
    # a local folder may hold them: local deletes take paths literally
    assert LabelJob(inputs=InputConfig(("x",)), output="/data/exp[12]", text=TextConfig("a")).output == "/data/exp[12]"


def test_gpus_for_a_cpu_model_are_refused_and_auto_may_take_them():
    def job(device: str, gpus: float) -> LabelJob:
        return LabelJob(inputs=InputConfig(("x",)), output="o", text=TextConfig("a"),
                        model=ModelConfig(device=device), resources=ResourceConfig(gpus_per_actor=gpus))

    for gpus, shown in ((1, "1"), (0.5, "0.5")):
        with pytest.raises(ConfigError, match=f"^gpus_per_actor: {shown} with device cpu reserves GPUs the model "
                                              "never uses; use --gpus-per-actor 0 or --device cuda/auto"):
            job("cpu", gpus)
    assert [job(d, g).resources.file_rows for d, g in (("cpu", 0), ("auto", 0), ("auto", 1), ("cuda:0", 1))] == [
        32, 32, 4096, 4096]
