"""Settings resolution (context → JV3_* environment → default) and its validation errors."""

from __future__ import annotations

import re

import pytest

from infra.config import (
    CPU_IMAGE_TAG,
    DLC_ACCOUNTS,
    ENCODINGS,
    GPU_IMAGE_TAG,
    SETTINGS,
    TASKS,
    DeploySettings,
)
from infra.errors import InfraConfigError


def resolve(context=None, **environ) -> DeploySettings:
    return DeploySettings.resolve(context or {}, environ)


def test_defaults_are_a_single_g5_gpu_in_us_east_1_with_a_placeholder_artifact():
    s = resolve()
    assert s.instance_type == "ml.g5.xlarge" and s.is_gpu and s.gpu_count == 1
    assert s.image_uri == f"763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:{GPU_IMAGE_TAG}"
    assert s.image_tag == "2.6.0-gpu-py312-cu124-ubuntu22.04-sagemaker"
    assert s.artifact.is_placeholder
    assert (s.instance_count, s.min_instances, s.max_instances) == (1, 1, 4)
    assert s.async_enabled is False and s.data_capture_percent == 0
    assert s.max_batch_tokens == 65536 and s.model_server_workers == 1
    # g5 has NVMe instance storage: SageMaker refuses a volume KmsKeyId for it
    assert s.volume_kms_supported is False


def test_context_beats_environment_beats_default():
    s = resolve({"instance_type": "ml.g6.2xlarge"}, JV3_INSTANCE_TYPE="ml.g5.2xlarge", JV3_MAX_INSTANCES="9")
    assert s.instance_type == "ml.g6.2xlarge"
    assert s.max_instances == 9
    assert resolve(JV3_INSTANCE_TYPE="ml.g5.2xlarge").instance_type == "ml.g5.2xlarge"


def test_region_falls_back_to_cdk_default_region_and_picks_the_regional_dlc_account():
    assert resolve(CDK_DEFAULT_REGION="eu-south-1").image_uri.startswith("692866216735.dkr.ecr.eu-south-1.amazonaws.com/")
    assert resolve(JV3_REGION="cn-north-1").image_uri.startswith("727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/")
    assert resolve(JV3_REGION="ap-southeast-1", CDK_DEFAULT_REGION="eu-south-1").region == "ap-southeast-1"
    assert all(re.fullmatch(r"\d{12}", account) for account in DLC_ACCOUNTS.values())


def test_cpu_instance_gets_the_cpu_image_smaller_batches_and_the_volume_key():
    s = resolve(JV3_INSTANCE_TYPE="ml.c6i.2xlarge")
    assert not s.is_gpu and s.image_tag == CPU_IMAGE_TAG and "-cpu-" in s.image_uri
    assert s.max_batch_tokens == 8192 and s.volume_kms_supported


def test_multi_gpu_instances_run_one_worker_per_gpu():
    s = resolve(JV3_INSTANCE_TYPE="ml.g5.12xlarge")
    assert s.gpu_count == 4
    assert s.container_environment()["SAGEMAKER_MODEL_SERVER_WORKERS"] == "4"


def test_container_environment_carries_sdk_torchserve_and_jv3_names():
    env = resolve(JV3_DEFAULT_TASK="retrieval.query", JV3_DEFAULT_DIMENSIONS="256").container_environment()
    assert env["SAGEMAKER_PROGRAM"] == "inference.py"
    assert env["SAGEMAKER_SUBMIT_DIRECTORY"] == "/opt/ml/model/code"
    assert env["SAGEMAKER_REGION"] == "us-east-1"
    assert env["SAGEMAKER_MODEL_SERVER_WORKERS"] == "1"
    assert int(env["TS_MAX_REQUEST_SIZE"]) > 6 * 1000 * 1000
    assert int(env["TS_MAX_RESPONSE_SIZE"]) >= 40 * 1024 * 1024
    assert env["JV3_DEFAULT_TASK"] == "retrieval.query" and env["JV3_DEFAULT_DIMENSIONS"] == "256"
    assert env["JV3_TASKS"] == ",".join(TASKS)
    batch = resolve().container_environment("batch")
    assert int(batch["TS_MAX_REQUEST_SIZE"]) >= 100 * 1024 * 1024 and batch["TS_DEFAULT_RESPONSE_TIMEOUT"] == "3600"


def test_artifact_sources(tmp_path):
    s3 = resolve(JV3_MODEL_ARTIFACT="s3://my-models/jina/v3/model.tar.gz").artifact
    assert (s3.kind, s3.bucket, s3.key) == ("s3", "my-models", "jina/v3/model.tar.gz")
    (tmp_path / "model.tar.gz").write_bytes(b"x")
    local = DeploySettings.resolve({}, {"JV3_MODEL_ARTIFACT": "model.tar.gz"}, base_dir=tmp_path).artifact
    assert local.kind == "asset" and local.path == (tmp_path / "model.tar.gz").resolve()


def test_runtime_choices_match_the_handler():
    settings = pytest.importorskip("inference.settings")
    assert TASKS == settings.TASKS and ENCODINGS == settings.ENCODINGS
    handler_vars = {var for var, _, _ in settings.ENV.values()}
    container_vars = {k for k in resolve().container_environment() if k.startswith("JV3_")}
    assert container_vars <= handler_vars, container_vars - handler_vars


def test_every_setting_has_a_jv3_variable_and_help():
    for key, var, _default, help_text in SETTINGS.values():
        assert var.startswith("JV3_") and key and help_text


@pytest.mark.parametrize(("environ", "message"), [
    ({"JV3_INSTANCE_TYPE": "ml.x9.large"}, r"unknown instance family 'x9'; expected one of g4dn, g5.* c5"),
    ({"JV3_INSTANCE_TYPE": "g5.xlarge"}, r"not a SageMaker instance type like 'ml.g5.xlarge'"),
    ({"JV3_INSTANCE_TYPE": "ml.c7g.xlarge"}, r"unknown instance family 'c7g'"),
    ({"JV3_REQUIRE_ARTIFACT": "true"}, r"JV3_MODEL_ARTIFACT is not set"),
    ({"JV3_MODEL_ARTIFACT": "/nonexistent/model.tar.gz"}, r"no such file"),
    ({"JV3_MODEL_ARTIFACT": "s3://bucket"}, r"not an s3://bucket/key.tar.gz URI"),
    ({"JV3_REGION": "mars-north-1"}, r"no PyTorch DLC registry; expected one of af-south-1"),
    ({"JV3_MIN_INSTANCES": "3", "JV3_INSTANCE_COUNT": "2"}, r"JV3_MIN_INSTANCES ≤ JV3_INSTANCE_COUNT"),
    ({"JV3_MAX_INSTANCES": "zero"}, r"JV3_MAX_INSTANCES='zero' is not an integer"),
    ({"JV3_SUBNET_IDS": "subnet-0123456789abcdef0"}, r"set both or neither"),
    ({"JV3_SUBNET_IDS": "net-1", "JV3_SECURITY_GROUP_IDS": "sg-0123456789abcdef0"}, r"not an id like 'subnet-"),
    ({"JV3_DEFAULT_TASK": "retrival.query"}, r"expected one of retrieval.query, retrieval.passage"),
    ({"JV3_TASKS": "retrieval.query", "JV3_DEFAULT_TASK": "text-matching"}, r"not among JV3_TASKS"),
    ({"JV3_DEFAULT_DIMENSIONS": "2048"}, r"exceeds the model's 1024 dimensions"),
    ({"JV3_DEFAULT_ENCODING": "int8"}, r"expected one of float, base64, binary, ubinary"),
    ({"JV3_ASYNC": "maybe"}, r"JV3_ASYNC='maybe' is not a boolean"),
    ({"JV3_DATA_CAPTURE_PERCENT": "150"}, r"is a percentage"),
    ({"JV3_IMAGE_TAG": CPU_IMAGE_TAG}, r"does not match the instance type; expected a '-gpu-' tag"),
    ({"JV3_ALARM_EMAIL": "oncall"}, r"not an e-mail address"),
    ({"JV3_STACK_NAME": "9lives"}, r"must start with a letter"),
])
def test_invalid_settings_name_the_value_and_the_choices(environ, message):
    with pytest.raises(InfraConfigError, match=message):
        resolve(**environ)


def test_local_artifact_must_be_a_tarball(tmp_path):
    (tmp_path / "model.zip").write_bytes(b"x")
    with pytest.raises(InfraConfigError, match=r"must be a .tar.gz archive"):
        resolve(JV3_MODEL_ARTIFACT=str(tmp_path / "model.zip"))
