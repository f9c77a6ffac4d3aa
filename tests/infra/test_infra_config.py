"""Settings resolution (context → JV3_* environment → default) and its validation errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from infra_support import MANIFEST, tiny_archive

from infra.config import (
    CONTAINER_SETTINGS,
    CPU_IMAGE_TAG,
    DLC_ACCOUNTS,
    ENCODINGS,
    GPU_IMAGE_TAG,
    SETTINGS,
    TASKS,
    TS_HANDLER_SERVICE,
    DeploySettings,
    read_manifest,
)
from infra.errors import InfraConfigError

REPO = Path(__file__).resolve().parents[2]


def resolve(context=None, **environ) -> DeploySettings:
    return DeploySettings.resolve(context or {}, environ)


def test_defaults_are_a_single_g5_gpu_in_us_east_1_with_a_placeholder_artifact():
    s = resolve()
    assert s.instance_type == "ml.g5.xlarge" and s.is_gpu and s.gpu_count == 1
    assert s.runtime == "byoc" and s.is_byoc and s.image_tag == ""
    assert s.artifact.is_placeholder and s.checkpoint is None
    assert (s.instance_count, s.min_instances, s.max_instances) == (1, 1, 4)
    assert s.async_enabled is False and s.data_capture_percent == 0
    assert s.model_server_workers == 1
    # g5 has NVMe instance storage: SageMaker refuses a volume KmsKeyId for it
    assert s.volume_kms_supported is False


def test_dlc_runtime_pins_the_gpu_dlc_image():
    s = resolve(JV3_RUNTIME="dlc")
    assert s.runtime == "dlc" and not s.is_byoc
    assert s.dlc_image_uri == f"763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:{GPU_IMAGE_TAG}"
    assert s.image_tag == "2.6.0-gpu-py312-cu124-ubuntu22.04-sagemaker"
    assert resolve({"runtime": "dlc"}, JV3_RUNTIME="byoc").runtime == "dlc"  # context beats environment


def test_context_beats_environment_beats_default():
    s = resolve({"instance_type": "ml.g6.2xlarge"}, JV3_INSTANCE_TYPE="ml.g5.2xlarge", JV3_MAX_INSTANCES="9")
    assert s.instance_type == "ml.g6.2xlarge"
    assert s.max_instances == 9
    assert resolve(JV3_INSTANCE_TYPE="ml.g5.2xlarge").instance_type == "ml.g5.2xlarge"


def test_region_falls_back_to_cdk_default_region_and_picks_the_regional_dlc_account():
    dlc = {"JV3_RUNTIME": "dlc"}
    assert resolve(CDK_DEFAULT_REGION="eu-south-1", **dlc).dlc_image_uri.startswith(
        "692866216735.dkr.ecr.eu-south-1.amazonaws.com/")
    assert resolve(JV3_REGION="cn-north-1", **dlc).dlc_image_uri.startswith(
        "727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/")
    assert resolve(JV3_REGION="ap-southeast-1", CDK_DEFAULT_REGION="eu-south-1").region == "ap-southeast-1"
    assert all(re.fullmatch(r"\d{12}", account) for account in DLC_ACCOUNTS.values())
    # byoc builds its own image, so a region without a DLC registry is fine there
    assert resolve(JV3_REGION="eu-east-9").region == "eu-east-9"


def test_cpu_instance_gets_the_cpu_image_and_the_volume_key():
    s = resolve(JV3_INSTANCE_TYPE="ml.c6i.2xlarge", JV3_RUNTIME="dlc")
    assert not s.is_gpu and s.image_tag == CPU_IMAGE_TAG and "-cpu-" in s.dlc_image_uri
    assert s.volume_kms_supported
    assert resolve(JV3_INSTANCE_TYPE="ml.c6i.2xlarge").byoc_build_args == {"TORCH_INDEX": "https://download.pytorch.org/whl/cpu"}
    assert resolve().byoc_build_args == {}  # the Dockerfile's default: PyPI's torch, the CUDA build


# --- 1. workers: the toolkit's per-model block must not cap them at one --------------------------
@pytest.mark.parametrize(("instance_type", "workers"), [
    ("ml.g5.12xlarge", 4), ("ml.g5.xlarge", 1), ("ml.c6i.4xlarge", 1)])
def test_dlc_runs_one_torchserve_worker_per_gpu_whatever_sets_the_toolkits_worker_block(instance_type, workers):
    s = resolve(JV3_INSTANCE_TYPE=instance_type, JV3_RUNTIME="dlc")
    for mode in ("realtime", "batch", "async"):
        env = s.container_environment(mode)
        assert any(k.startswith("SAGEMAKER_TS_") for k in env)  # what makes the toolkit write the block
        assert env["SAGEMAKER_MODEL_SERVER_WORKERS"] == str(workers)
        assert env["SAGEMAKER_TS_MIN_WORKERS"] == str(workers)
        assert env["SAGEMAKER_TS_MAX_WORKERS"] == str(workers)


# --- 2. the handler service --------------------------------------------------------------------
def test_dlc_selects_the_archives_handler_service():
    assert TS_HANDLER_SERVICE == "jv3_inference.sagemaker_service"
    package, _, module = TS_HANDLER_SERVICE.partition(".")
    # the archive's code/jv3_inference is the repository's inference/ package
    assert (REPO / "inference" / f"{module}.py").is_file()
    build = pytest.importorskip("model_package.build")
    assert build.CODE_PACKAGE == package
    for mode in ("realtime", "batch", "async"):
        assert resolve(JV3_RUNTIME="dlc").container_environment(mode)["TS_DEFAULT_SERVICE_HANDLER"] == TS_HANDLER_SERVICE


def test_container_environment_carries_sdk_torchserve_and_jv3_names():
    env = resolve(JV3_DEFAULT_TASK="retrieval.query", JV3_DEFAULT_DIMENSIONS="256",
                  JV3_RUNTIME="dlc").container_environment()
    assert env["SAGEMAKER_PROGRAM"] == "inference.py"
    assert env["SAGEMAKER_SUBMIT_DIRECTORY"] == "/opt/ml/model/code"
    assert env["SAGEMAKER_REGION"] == "us-east-1"
    assert env["SAGEMAKER_MODEL_SERVER_WORKERS"] == "1"
    assert int(env["TS_MAX_REQUEST_SIZE"]) > 6 * 1000 * 1000
    assert int(env["TS_MAX_RESPONSE_SIZE"]) >= 40 * 1024 * 1024
    assert env["JV3_DEFAULT_TASK"] == "retrieval.query" and env["JV3_DEFAULT_DIMENSIONS"] == "256"
    assert "JV3_TASKS" not in env and "JV3_DEFAULT_ENCODING" not in env
    # our handler, not TorchServe, refuses an oversized body or response, with a 413 naming the cap
    assert int(env["TS_MAX_REQUEST_SIZE"]) > int(env["JV3_MAX_REQUEST_BYTES"])
    assert env["JV3_MAX_RESPONSE_BYTES"] == env["TS_MAX_RESPONSE_SIZE"]
    batch = resolve(JV3_RUNTIME="dlc").container_environment("batch")
    assert int(batch["TS_MAX_REQUEST_SIZE"]) >= 100 * 1024 * 1024 and batch["TS_DEFAULT_RESPONSE_TIMEOUT"] == "3600"


# --- 5. byoc: only what inference.serve reads ----------------------------------------------------
def test_byoc_environment_is_the_servers_own_sized_to_the_mode():
    s = resolve()
    realtime, batch, async_ = (s.container_environment(m) for m in ("realtime", "batch", "async"))
    assert realtime == {"JV3_MAX_REQUEST_BYTES": str(8 * 1024 * 1024), "JV3_MAX_RESPONSE_BYTES": str(64 * 1024 * 1024),
                        "JV3_REQUEST_TIMEOUT_S": "55"}  # fmt: skip
    assert batch == async_ == {"JV3_MAX_REQUEST_BYTES": str(100 * 1024 * 1024), "JV3_MAX_RESPONSE_BYTES": str(1024**3),
                               "JV3_REQUEST_TIMEOUT_S": "3600"}  # fmt: skip
    given = resolve(JV3_DEFAULT_TASK="separation", JV3_TASKS="separation,classification",
                    JV3_INSTANCE_TYPE="ml.g5.12xlarge").container_environment()
    assert given["JV3_DEFAULT_TASK"] == "separation" and given["JV3_TASKS"] == "separation,classification"
    assert not [k for k in given if k.startswith(("SAGEMAKER_", "TS_"))]


@pytest.mark.parametrize(("environ", "message"), [
    ({"JV3_RUNTIME": "docker"}, r"JV3_RUNTIME='docker' is not valid; expected one of byoc, dlc"),
    ({"JV3_IMAGE_TAG": GPU_IMAGE_TAG}, r"applies to JV3_RUNTIME=dlc only"),
    ({"JV3_RUNTIME": "dlc", "JV3_REGION": "eu-east-9"}, r"no PyTorch DLC registry"),
    ({"JV3_REGION": "Mars"}, r"not an AWS region"),
])
def test_runtime_setting_is_validated(environ, message):
    with pytest.raises(InfraConfigError, match=message):
        resolve(**environ)


# --- 3. one default per setting: the container's -------------------------------------------------
def test_container_settings_default_to_unset_and_reach_the_model_only_when_given():
    for name in CONTAINER_SETTINGS:
        assert SETTINGS[name][2] == "", name
    # no infra-side table (the old 32768 on g4dn, 65536 on GPU, 8192 on CPU): the container picks per device
    for runtime in ("byoc", "dlc"):
        for instance_type in ("ml.g4dn.xlarge", "ml.g5.xlarge", "ml.c6i.2xlarge"):
            s = resolve(JV3_RUNTIME=runtime, JV3_INSTANCE_TYPE=instance_type)
            assert (s.default_task, s.default_dimensions, s.default_encoding, s.max_batch_tokens, s.tasks) == \
                (None,) * 5
            env = s.container_environment()
            for var in ("JV3_DEFAULT_TASK", "JV3_DEFAULT_DIMENSIONS", "JV3_DEFAULT_ENCODING",
                        "JV3_MAX_BATCH_TOKENS", "JV3_TASKS"):
                assert var not in env, (runtime, instance_type, var)
    given = {"JV3_DEFAULT_TASK": "classification", "JV3_DEFAULT_DIMENSIONS": "64", "JV3_DEFAULT_ENCODING": "binary",
             "JV3_MAX_BATCH_TOKENS": "4096", "JV3_TASKS": "classification"}
    for runtime in ("byoc", "dlc"):
        env = resolve(JV3_RUNTIME=runtime, **given).container_environment()
        assert {k: env[k] for k in given} == given


def test_artifact_sources(tmp_path):
    s3 = resolve(JV3_MODEL_ARTIFACT="s3://my-models/jina/v3/model.tar.gz").artifact
    assert (s3.kind, s3.bucket, s3.key) == ("s3", "my-models", "jina/v3/model.tar.gz")
    tiny_archive(tmp_path / "model.tar.gz")
    local = DeploySettings.resolve({}, {"JV3_MODEL_ARTIFACT": "model.tar.gz"}, base_dir=tmp_path).artifact
    assert local.kind == "asset" and local.path == (tmp_path / "model.tar.gz").resolve()


def test_runtime_choices_match_the_handler():
    settings = pytest.importorskip("inference.settings")
    assert TASKS == settings.TASKS and ENCODINGS == settings.ENCODINGS
    handler_vars = {var for var, _, _ in settings.ENV.values()}
    given = {"JV3_DEFAULT_TASK": "classification", "JV3_DEFAULT_DIMENSIONS": "64", "JV3_DEFAULT_ENCODING": "binary",
             "JV3_MAX_BATCH_TOKENS": "4096", "JV3_TASKS": "classification"}
    for runtime in ("byoc", "dlc"):
        container_vars = {k for k in resolve(JV3_RUNTIME=runtime, **given).container_environment()
                          if k.startswith("JV3_")}
        assert container_vars <= handler_vars, container_vars - handler_vars


# --- 4. validated against the checkpoint's manifest.json ------------------------------------------
def _manifest(hidden_size=1024, tasks=TASKS, python="3.12", **extra):
    return {**MANIFEST, "checkpoint": {"hidden_size": hidden_size, "tasks": list(tasks)},
            "target": {"python": python}, **extra}


def _with_archive(tmp_path, manifest, **environ):
    path = tiny_archive(tmp_path / "model.tar.gz", manifest)
    return resolve(JV3_MODEL_ARTIFACT=str(path), **environ)


def test_manifest_facts_are_read(tmp_path):
    s = _with_archive(tmp_path, _manifest(hidden_size=64, tasks=("retrieval.query", "retrieval.passage")),
                      JV3_TASKS="retrieval.query", JV3_DEFAULT_TASK="retrieval.query", JV3_DEFAULT_DIMENSIONS="32")
    assert s.checkpoint.hidden_size == 64 and s.checkpoint.tasks == ("retrieval.query", "retrieval.passage")
    assert s.checkpoint.python == "3.12" and s.default_dimensions == 32


def test_dimensions_above_the_checkpoints_hidden_size_are_refused(tmp_path):
    with pytest.raises(InfraConfigError, match=r"JV3_DEFAULT_DIMENSIONS=256 exceeds the checkpoint's hidden size "
                                               r"of 64 \(JV3_MODEL_ARTIFACT=.*model.tar.gz\)"):
        _with_archive(tmp_path, _manifest(hidden_size=64), JV3_DEFAULT_DIMENSIONS="256")
    # unset: the container's default (the full size) applies, nothing to refuse
    assert _with_archive(tmp_path, _manifest(hidden_size=64)).default_dimensions is None


def test_tasks_the_checkpoint_lacks_are_refused(tmp_path):
    two = _manifest(tasks=("retrieval.query", "retrieval.passage"))
    with pytest.raises(InfraConfigError, match=r"JV3_TASKS=retrieval.query,text-matching names text-matching, which "
                                               r"the checkpoint lacks: it has retrieval.query, retrieval.passage"):
        _with_archive(tmp_path, two, JV3_TASKS="retrieval.query,text-matching", JV3_DEFAULT_TASK="retrieval.query")
    with pytest.raises(InfraConfigError, match=r"has only the task adapters retrieval.query, retrieval.passage.*"
                                               r"set JV3_TASKS"):
        _with_archive(tmp_path, two)


def test_a_default_task_outside_the_served_tasks_is_refused(tmp_path):
    with pytest.raises(InfraConfigError, match=r"JV3_DEFAULT_TASK='separation' is not among "
                                               r"JV3_TASKS=retrieval.query: expected one of retrieval.query"):
        _with_archive(tmp_path, _manifest(), JV3_TASKS="retrieval.query", JV3_DEFAULT_TASK="separation")
    with pytest.raises(InfraConfigError, match=r"JV3_TASKS=retrieval.query is set without JV3_DEFAULT_TASK"):
        _with_archive(tmp_path, _manifest(), JV3_TASKS="retrieval.query")
    s = _with_archive(tmp_path, _manifest(), JV3_DEFAULT_TASK="separation")  # all five served
    assert s.default_task == "separation" and s.tasks is None


def test_an_archive_without_a_manifest_is_not_checked(tmp_path):
    s = _with_archive(tmp_path, None, JV3_DEFAULT_DIMENSIONS="1024", JV3_RUNTIME="dlc")
    assert s.checkpoint is None and s.default_dimensions == 1024


def test_the_manifest_is_read_without_reading_past_it(tmp_path):
    """Stops at manifest.json: a truncated weights member after it is never reached."""
    weights = bytes(range(256)) * 40000
    for manifest in (_manifest(hidden_size=64), None):
        path = tiny_archive(tmp_path / "model.tar.gz", manifest, weights=weights)
        path.write_bytes(path.read_bytes()[:-2000])
        if manifest is not None:
            assert read_manifest(path).hidden_size == 64
        else:  # without a manifest the whole archive is read, and the truncation shows
            with pytest.raises(InfraConfigError, match="not a readable .tar.gz"):
                read_manifest(path)


@pytest.mark.parametrize(("setup", "message"), [
    (lambda p: p.write_bytes(b"not a tar"), r"is not a readable .tar.gz archive"),
    (lambda p: p.write_bytes(_tar_with_manifest_bytes(b"{oops")), r"manifest.json is not JSON"),
])
def test_an_unreadable_archive_or_manifest_is_refused(tmp_path, setup, message):
    path = tmp_path / "model.tar.gz"
    setup(path)
    with pytest.raises(InfraConfigError, match=message):
        resolve(JV3_MODEL_ARTIFACT=str(path))


def _tar_with_manifest_bytes(data: bytes) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_dlc_refuses_an_archive_it_could_not_start(tmp_path):
    with pytest.raises(InfraConfigError, match=r"built for Python 3.11 \(manifest target.python\) but the image "
                                               r"2.6.0-gpu-py312.* runs Python 3.12"):
        _with_archive(tmp_path, _manifest(python="3.11"), JV3_RUNTIME="dlc")
    old = _manifest(files={"code/inference.py": {}, "code/jv3_inference/inference.py": {}})
    with pytest.raises(InfraConfigError, match=r"has no code/jv3_inference/sagemaker_service.py"):
        _with_archive(tmp_path, old, JV3_RUNTIME="dlc")
    # byoc runs its own image's code and Python: neither matters there
    assert _with_archive(tmp_path, _manifest(python="3.11")).runtime == "byoc"
    assert _with_archive(tmp_path, old).runtime == "byoc"


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
    ({"JV3_REGION": "mars-north-1", "JV3_RUNTIME": "dlc"}, r"no PyTorch DLC registry; expected one of af-south-1"),
    ({"JV3_MIN_INSTANCES": "3", "JV3_INSTANCE_COUNT": "2"}, r"JV3_MIN_INSTANCES ≤ JV3_INSTANCE_COUNT"),
    ({"JV3_MAX_INSTANCES": "zero"}, r"JV3_MAX_INSTANCES='zero' is not an integer"),
    ({"JV3_SUBNET_IDS": "subnet-0123456789abcdef0"}, r"set both or neither"),
    ({"JV3_SUBNET_IDS": "net-1", "JV3_SECURITY_GROUP_IDS": "sg-0123456789abcdef0"}, r"not an id like 'subnet-"),
    ({"JV3_DEFAULT_TASK": "retrival.query"}, r"expected one of retrieval.query, retrieval.passage"),
    ({"JV3_TASKS": "retrieval.query,sentiment"}, r"JV3_TASKS='sentiment' is not valid"),
    ({"JV3_MAX_BATCH_TOKENS": "100"}, r"JV3_MAX_BATCH_TOKENS=100 must be at least 512"),
    ({"JV3_DEFAULT_DIMENSIONS": "0"}, r"JV3_DEFAULT_DIMENSIONS=0 must be at least 1"),
    ({"JV3_TASKS": "retrieval.query", "JV3_DEFAULT_TASK": "text-matching"}, r"not among JV3_TASKS"),
    ({"JV3_DEFAULT_DIMENSIONS": "2048"}, r"exceeds the model's 1024 dimensions"),
    ({"JV3_DEFAULT_ENCODING": "int8"}, r"expected one of float, base64, binary, ubinary"),
    ({"JV3_ASYNC": "maybe"}, r"JV3_ASYNC='maybe' is not a boolean"),
    ({"JV3_DATA_CAPTURE_PERCENT": "150"}, r"is a percentage"),
    ({"JV3_IMAGE_TAG": CPU_IMAGE_TAG, "JV3_RUNTIME": "dlc"}, r"does not match the instance type; expected a '-gpu-' tag"),
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


# --- 7. docs/deploy.md lists the same table ---------------------------------------------------------
def test_deploy_md_lists_every_setting_with_its_default():
    doc = (REPO / "docs" / "deploy.md").read_text()
    for key, var, default, _help in SETTINGS.values():
        shown = f"`{default}`" if default else "(empty)"
        assert f"| `{var}` | `{key}` | {shown} |" in doc, var
    for needle in ("## Runtime: byoc or dlc", "**Default: `byoc`.**", "SAGEMAKER_TS_MIN_WORKERS",
                   "SAGEMAKER_TS_MAX_WORKERS", f"TS_DEFAULT_SERVICE_HANDLER={TS_HANDLER_SERVICE}",
                   "empty means unset on the model", "manifest.json"):
        assert needle in doc, needle
