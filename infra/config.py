"""Every deployment setting, resolved CDK context → ``JV3_*`` environment variable → default.

One table (``SETTINGS``) names each setting's context key, environment variable, default and help;
docs/deploy.md lists the same rows. ``DeploySettings.resolve`` reads them at call time and validates
them, raising ``InfraConfigError`` with the bad value and the valid choices.

The endpoint's runtime variables (``JV3_DEFAULT_TASK`` …) keep the names that
``inference/settings.py`` reads; ``infra`` never imports ``inference`` (they meet only through these
names), so the task and encoding choices are repeated here and a test pins them to the handler's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InfraConfigError

# --- the container image -------------------------------------------------------------------------
# AWS Deep Learning Container for PyTorch inference (SageMaker flavour), pinned to one release line.
PYTORCH_VERSION = "2.6.0"
IMAGE_REPOSITORY = "pytorch-inference"
GPU_IMAGE_TAG = f"{PYTORCH_VERSION}-gpu-py312-cu124-ubuntu22.04-sagemaker"
CPU_IMAGE_TAG = f"{PYTORCH_VERSION}-cpu-py312-ubuntu22.04-sagemaker"

# Registry account of the DLC ``pytorch-inference`` 2.6.0 images per region, as the SageMaker Python
# SDK's image_uri_config/pytorch.json lists them.
DLC_ACCOUNTS: dict[str, str] = {
    "af-south-1": "626614931356",
    "ap-east-1": "871362719292",
    "ap-east-2": "975050140332",
    "ap-northeast-1": "763104351884",
    "ap-northeast-2": "763104351884",
    "ap-northeast-3": "364406365360",
    "ap-south-1": "763104351884",
    "ap-south-2": "772153158452",
    "ap-southeast-1": "763104351884",
    "ap-southeast-2": "763104351884",
    "ap-southeast-3": "907027046896",
    "ap-southeast-4": "457447274322",
    "ap-southeast-5": "550225433462",
    "ap-southeast-6": "633930458069",
    "ap-southeast-7": "590183813437",
    "ca-central-1": "763104351884",
    "ca-west-1": "204538143572",
    "cn-north-1": "727897471807",
    "cn-northwest-1": "727897471807",
    "eu-central-1": "763104351884",
    "eu-central-2": "380420809688",
    "eu-north-1": "763104351884",
    "eu-south-1": "692866216735",
    "eu-south-2": "503227376785",
    "eu-west-1": "763104351884",
    "eu-west-2": "763104351884",
    "eu-west-3": "763104351884",
    "il-central-1": "780543022126",
    "me-central-1": "914824155844",
    "me-south-1": "217643126080",
    "mx-central-1": "637423239942",
    "sa-east-1": "763104351884",
    "us-east-1": "763104351884",
    "us-east-2": "763104351884",
    "us-gov-east-1": "446045086412",
    "us-gov-west-1": "442386744353",
    "us-west-1": "763104351884",
    "us-west-2": "763104351884",
}

# --- instance types ------------------------------------------------------------------------------
# x86 families only: the DLC images above are built for x86_64.
GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5")
CPU_FAMILIES = ("c5", "c5d", "c6i", "c7i", "m5", "m5d", "m6i", "m7i", "r5", "r6i", "r7i")
# Families whose instances carry NVMe instance storage: SageMaker encrypts it in hardware and
# CreateEndpointConfig fails when a KmsKeyId is given for them, so the volume key applies elsewhere only.
LOCAL_STORAGE_FAMILIES = ("g4dn", "g5", "g6", "g6e", "p4d", "p4de", "p5", "c5d", "m5d")
_INSTANCE_RE = re.compile(r"^ml\.(?P<family>[a-z0-9]+)\.(?P<size>medium|large|metal|\d*xlarge)$")
# GPUs per instance where it is not one (size → count); CloudWatch's GPUUtilization sums over GPUs.
_MULTI_GPU = {
    "g4dn.12xlarge": 4, "g4dn.metal": 8,
    "g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8,
    "g6.12xlarge": 4, "g6.24xlarge": 4, "g6.48xlarge": 8,
    "g6e.12xlarge": 4, "g6e.24xlarge": 4, "g6e.48xlarge": 8,
    "p3.8xlarge": 4, "p3.16xlarge": 8, "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8,
}

# --- runtime choices the handler accepts (pinned to inference/settings.py by a test) -------------
TASKS = ("retrieval.query", "retrieval.passage", "separation", "classification", "text-matching")
ENCODINGS = ("float", "base64", "binary", "ubinary")
FULL_DIMENSIONS = 1024

PLACEHOLDER_ARTIFACT = "s3://jv3-placeholder-set-JV3_MODEL_ARTIFACT/model.tar.gz"

# name: (context key, environment variable, default, help)
SETTINGS: dict[str, tuple[str, str, str, str]] = {
    "model_artifact": ("model_artifact", "JV3_MODEL_ARTIFACT", "",
                       "local model.tar.gz (uploaded as a CDK file asset) or an s3://bucket/key.tar.gz URI"),
    "require_artifact": ("require_artifact", "JV3_REQUIRE_ARTIFACT", "false",
                         "refuse the synth placeholder artifact (make deploy sets true)"),
    "stack_name": ("stack_name", "JV3_STACK_NAME", "Jv3Embeddings", "name of the main stack; the async stack adds 'Async'"),
    "region": ("region", "JV3_REGION", "", "AWS region (empty: CDK_DEFAULT_REGION, then us-east-1)"),
    "instance_type": ("instance_type", "JV3_INSTANCE_TYPE", "ml.g5.xlarge",
                      "endpoint instance type: GPU (" + ", ".join(GPU_FAMILIES) + ") or CPU (" + ", ".join(CPU_FAMILIES) + ")"),
    "image_tag": ("image_tag", "JV3_IMAGE_TAG", "",
                  f"pytorch-inference image tag (empty: {GPU_IMAGE_TAG} on GPU, {CPU_IMAGE_TAG} on CPU)"),
    "instance_count": ("instance_count", "JV3_INSTANCE_COUNT", "1", "instances the real-time endpoint starts with"),
    "min_instances": ("min_instances", "JV3_MIN_INSTANCES", "1", "autoscaling floor of the real-time endpoint"),
    "max_instances": ("max_instances", "JV3_MAX_INSTANCES", "4", "autoscaling ceiling of the real-time endpoint"),
    "invocations_per_instance": ("invocations_per_instance", "JV3_SCALE_INVOCATIONS_PER_INSTANCE", "300",
                                 "target of SageMakerVariantInvocationsPerInstance (invocations per minute)"),
    "gpu_utilization": ("gpu_utilization", "JV3_SCALE_GPU_UTILIZATION", "70",
                        "target GPUUtilization per GPU in percent (CPUUtilization per vCPU on CPU types)"),
    "disable_scale_in": ("disable_scale_in", "JV3_DISABLE_SCALE_IN", "false",
                         "scale-in protection: target tracking only adds instances"),
    "data_capture_percent": ("data_capture_percent", "JV3_DATA_CAPTURE_PERCENT", "0",
                             "percent of real-time requests captured to S3 (0: off)"),
    "subnet_ids": ("subnet_ids", "JV3_SUBNET_IDS", "", "comma-separated private subnets for the model (empty: no VPC)"),
    "security_group_ids": ("security_group_ids", "JV3_SECURITY_GROUP_IDS", "",
                           "comma-separated security groups; required with JV3_SUBNET_IDS"),
    "network_isolation": ("network_isolation", "JV3_NETWORK_ISOLATION", "false",
                          "EnableNetworkIsolation on the models (the archive must vendor its wheels)"),
    "alarm_email": ("alarm_email", "JV3_ALARM_EMAIL", "", "e-mail subscribed to the alarm topic (empty: none)"),
    "latency_p99_ms": ("latency_p99_ms", "JV3_ALARM_LATENCY_P99_MS", "2000", "ModelLatency p99 alarm threshold in ms"),
    "async_enabled": ("async_enabled", "JV3_ASYNC", "false", "also deploy the async-inference stack"),
    "async_max_instances": ("async_max_instances", "JV3_ASYNC_MAX_INSTANCES", "2", "async endpoint ceiling (floor is 0)"),
    "async_notifications": ("async_notifications", "JV3_ASYNC_NOTIFICATIONS", "true",
                            "SNS success and error topics for async results"),
    "default_task": ("default_task", "JV3_DEFAULT_TASK", "text-matching", "container: task when a request names none"),
    "default_dimensions": ("default_dimensions", "JV3_DEFAULT_DIMENSIONS", str(FULL_DIMENSIONS),
                           "container: Matryoshka size when a request names none"),
    "default_encoding": ("default_encoding", "JV3_DEFAULT_ENCODING", "float", "container: encoding when a request names none"),
    "max_batch_tokens": ("max_batch_tokens", "JV3_MAX_BATCH_TOKENS", "",
                         "container: tokens per forward pass (empty: 32768 on g4dn, 65536 on other GPUs, 8192 on CPU)"),
    "tasks": ("tasks", "JV3_TASKS", ",".join(TASKS), "container: task adapters to prepare"),
}


@dataclass(frozen=True)
class ModelArtifact:
    """Where ``model.tar.gz`` comes from: a local file (CDK asset), an S3 object, or the synth placeholder."""

    kind: str  # "asset" | "s3" | "placeholder"
    path: Path | None = None
    bucket: str | None = None
    key: str | None = None

    @property
    def is_placeholder(self) -> bool:
        return self.kind == "placeholder"


@dataclass(frozen=True)
class DeploySettings:
    artifact: ModelArtifact
    stack_name: str
    region: str
    account: str | None
    instance_type: str
    image_tag: str
    instance_count: int
    min_instances: int
    max_instances: int
    invocations_per_instance: int
    gpu_utilization: int
    disable_scale_in: bool
    data_capture_percent: int
    subnet_ids: tuple[str, ...]
    security_group_ids: tuple[str, ...]
    network_isolation: bool
    alarm_email: str
    latency_p99_ms: int
    async_enabled: bool
    async_max_instances: int
    async_notifications: bool
    default_task: str
    default_dimensions: int
    default_encoding: str
    max_batch_tokens: int
    tasks: tuple[str, ...]

    # --- derived ---------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.instance_type.split(".")[1]

    @property
    def is_gpu(self) -> bool:
        return self.family in GPU_FAMILIES

    @property
    def gpu_count(self) -> int:
        if not self.is_gpu:
            return 0
        return _MULTI_GPU.get(self.instance_type.removeprefix("ml."), 1)

    @property
    def volume_kms_supported(self) -> bool:
        """EBS-backed instance types take the customer-managed volume key; NVMe ones are hardware-encrypted."""
        return self.family not in LOCAL_STORAGE_FAMILIES

    @property
    def dlc_account(self) -> str:
        return DLC_ACCOUNTS[self.region]

    @property
    def image_uri(self) -> str:
        suffix = ".amazonaws.com.cn" if self.region.startswith("cn-") else ".amazonaws.com"
        return f"{self.dlc_account}.dkr.ecr.{self.region}{suffix}/{IMAGE_REPOSITORY}:{self.image_tag}"

    @property
    def model_server_workers(self) -> int:
        """One model copy per GPU; on CPU one worker that uses every core through torch's threads."""
        return max(self.gpu_count, 1)

    def container_environment(self, mode: str = "realtime") -> dict[str, str]:
        """What the SageMaker SDK would set for a PyTorch model, TorchServe limits, and our ``JV3_*``.

        ``mode`` sizes TorchServe for the caller: ``realtime`` (6 MB requests, 60 s invocations) or
        ``batch``/``async`` (MaxPayloadInMB up to 100 MB, invocations up to an hour).
        """
        if mode == "realtime":
            request_bytes = 8 * 1024 * 1024  # above SageMaker's 6 MB cap, so SageMaker refuses first
            response_bytes = 64 * 1024 * 1024  # 2048 float vectors of 1024 dims as JSON ≈ 40 MB
            timeout_s = 120
        elif mode in ("batch", "async"):
            request_bytes = 100 * 1024 * 1024
            response_bytes = 1024 * 1024 * 1024  # JSON embeddings are ~20x the bytes of their text
            timeout_s = 3600
        else:
            raise InfraConfigError(f"container mode {mode!r} is not valid; expected one of realtime, batch, async")
        return {
            "SAGEMAKER_PROGRAM": "inference.py",
            "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
            "SAGEMAKER_REGION": self.region,
            "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
            "SAGEMAKER_MODEL_SERVER_WORKERS": str(self.model_server_workers),
            # TorchServe reads TS_* (enable_envvars_config), the SageMaker toolkit reads SAGEMAKER_TS_*.
            "TS_MAX_REQUEST_SIZE": str(request_bytes),
            "TS_MAX_RESPONSE_SIZE": str(response_bytes),
            "TS_DEFAULT_RESPONSE_TIMEOUT": str(timeout_s),
            "SAGEMAKER_TS_MAX_REQUEST_SIZE": str(request_bytes),
            "SAGEMAKER_TS_MAX_RESPONSE_SIZE": str(response_bytes),
            "SAGEMAKER_TS_RESPONSE_TIMEOUT": str(timeout_s),
            "JV3_DEFAULT_TASK": self.default_task,
            "JV3_DEFAULT_DIMENSIONS": str(self.default_dimensions),
            "JV3_DEFAULT_ENCODING": self.default_encoding,
            "JV3_MAX_BATCH_TOKENS": str(self.max_batch_tokens),
            "JV3_TASKS": ",".join(self.tasks),
            # The BYOC server (inference.serve) enforces this itself; keep it equal to TorchServe's.
            "JV3_MAX_REQUEST_BYTES": str(request_bytes),
        }

    # --- resolution ------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, context: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
                *, base_dir: Path | None = None) -> DeploySettings:
        """CDK context wins over ``JV3_*`` environment variables, which win over the defaults."""
        context = context or {}
        environ = os.environ if environ is None else environ
        raw: dict[str, str] = {}
        for name, (key, var, default, _) in SETTINGS.items():
            value = context.get(key)
            if value is None or value == "":
                value = environ.get(var, default)
            raw[name] = str(value).strip()

        instance_type = _instance_type(raw["instance_type"])
        is_gpu = instance_type.split(".")[1] in GPU_FAMILIES
        region = raw["region"] or environ.get("CDK_DEFAULT_REGION", "") or "us-east-1"
        if region not in DLC_ACCOUNTS:
            raise InfraConfigError(
                f"JV3_REGION={region!r} has no PyTorch DLC registry; expected one of {', '.join(sorted(DLC_ACCOUNTS))}")

        instance_count = _int(raw["instance_count"], "JV3_INSTANCE_COUNT", 1)
        min_instances = _int(raw["min_instances"], "JV3_MIN_INSTANCES", 1)
        max_instances = _int(raw["max_instances"], "JV3_MAX_INSTANCES", 1)
        if not min_instances <= instance_count <= max_instances:
            raise InfraConfigError(
                f"instance counts must satisfy JV3_MIN_INSTANCES ≤ JV3_INSTANCE_COUNT ≤ JV3_MAX_INSTANCES; "
                f"got {min_instances} ≤ {instance_count} ≤ {max_instances}")

        subnets = _list(raw["subnet_ids"])
        groups = _list(raw["security_group_ids"])
        if bool(subnets) != bool(groups):
            raise InfraConfigError("JV3_SUBNET_IDS and JV3_SECURITY_GROUP_IDS go together: set both or neither")
        for value, var, prefix in [(s, "JV3_SUBNET_IDS", "subnet") for s in subnets] + \
                                  [(g, "JV3_SECURITY_GROUP_IDS", "sg") for g in groups]:
            if not re.fullmatch(rf"{prefix}-[0-9a-f]{{8,17}}", value):
                raise InfraConfigError(f"{var} entry {value!r} is not an id like '{prefix}-0123456789abcdef0'")

        alarm_email = raw["alarm_email"]
        if alarm_email and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", alarm_email):
            raise InfraConfigError(f"JV3_ALARM_EMAIL={alarm_email!r} is not an e-mail address")

        stack_name = raw["stack_name"]
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,100}", stack_name):
            raise InfraConfigError(f"JV3_STACK_NAME={stack_name!r} must start with a letter and hold only letters, digits, '-'")

        tasks = _tasks(raw["tasks"])
        default_task = _choice(raw["default_task"], TASKS, "JV3_DEFAULT_TASK")
        if default_task not in tasks:
            raise InfraConfigError(f"JV3_DEFAULT_TASK={default_task!r} is not among JV3_TASKS={','.join(tasks)}")
        family = instance_type.split(".")[1]
        default_tokens = 32768 if family == "g4dn" else 65536 if is_gpu else 8192
        return cls(
            artifact=_artifact(raw["model_artifact"], _bool(raw["require_artifact"], "JV3_REQUIRE_ARTIFACT"), base_dir),
            stack_name=stack_name,
            region=region,
            account=environ.get("CDK_DEFAULT_ACCOUNT") or None,
            instance_type=instance_type,
            image_tag=_image_tag(raw["image_tag"], is_gpu),
            instance_count=instance_count,
            min_instances=min_instances,
            max_instances=max_instances,
            invocations_per_instance=_int(raw["invocations_per_instance"], "JV3_SCALE_INVOCATIONS_PER_INSTANCE", 1),
            gpu_utilization=_percent(raw["gpu_utilization"], "JV3_SCALE_GPU_UTILIZATION", 1),
            disable_scale_in=_bool(raw["disable_scale_in"], "JV3_DISABLE_SCALE_IN"),
            data_capture_percent=_percent(raw["data_capture_percent"], "JV3_DATA_CAPTURE_PERCENT", 0),
            subnet_ids=subnets,
            security_group_ids=groups,
            network_isolation=_bool(raw["network_isolation"], "JV3_NETWORK_ISOLATION"),
            alarm_email=alarm_email,
            latency_p99_ms=_int(raw["latency_p99_ms"], "JV3_ALARM_LATENCY_P99_MS", 1),
            async_enabled=_bool(raw["async_enabled"], "JV3_ASYNC"),
            async_max_instances=_int(raw["async_max_instances"], "JV3_ASYNC_MAX_INSTANCES", 1),
            async_notifications=_bool(raw["async_notifications"], "JV3_ASYNC_NOTIFICATIONS"),
            default_task=default_task,
            default_dimensions=_dimensions(raw["default_dimensions"]),
            default_encoding=_choice(raw["default_encoding"], ENCODINGS, "JV3_DEFAULT_ENCODING"),
            max_batch_tokens=_int(raw["max_batch_tokens"], "JV3_MAX_BATCH_TOKENS", 512) if raw["max_batch_tokens"] else default_tokens,
            tasks=tasks,
        )


def context_keys() -> list[str]:
    return [key for key, *_ in SETTINGS.values()]


# --- validators ----------------------------------------------------------------------------------
def _instance_type(value: str) -> str:
    match = _INSTANCE_RE.match(value)
    if not match:
        raise InfraConfigError(f"JV3_INSTANCE_TYPE={value!r} is not a SageMaker instance type like 'ml.g5.xlarge'")
    family = match["family"]
    if family not in GPU_FAMILIES + CPU_FAMILIES:
        raise InfraConfigError(
            f"JV3_INSTANCE_TYPE={value!r}: unknown instance family {family!r}; expected one of "
            f"{', '.join(GPU_FAMILIES)} (GPU) or {', '.join(CPU_FAMILIES)} (CPU)")
    return value


def _image_tag(value: str, is_gpu: bool) -> str:
    if not value:
        return GPU_IMAGE_TAG if is_gpu else CPU_IMAGE_TAG
    kind = "gpu" if is_gpu else "cpu"
    if f"-{kind}-" not in value:
        raise InfraConfigError(f"JV3_IMAGE_TAG={value!r} does not match the instance type; expected a '-{kind}-' tag "
                               f"such as {GPU_IMAGE_TAG if is_gpu else CPU_IMAGE_TAG}")
    return value


def _artifact(value: str, required: bool, base_dir: Path | None) -> ModelArtifact:
    if not value:
        if required:
            raise InfraConfigError("JV3_MODEL_ARTIFACT is not set; give a local model.tar.gz (make package builds one) "
                                   "or an s3://bucket/key.tar.gz URI")
        return ModelArtifact(kind="placeholder", bucket="jv3-placeholder-set-JV3_MODEL_ARTIFACT", key="model.tar.gz")
    if value == PLACEHOLDER_ARTIFACT and required:
        raise InfraConfigError("JV3_MODEL_ARTIFACT is the synth placeholder; deploy needs a real model.tar.gz")
    if value.startswith("s3://"):
        match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(.+\.tar\.gz)", value)
        if not match:
            raise InfraConfigError(f"JV3_MODEL_ARTIFACT={value!r} is not an s3://bucket/key.tar.gz URI")
        return ModelArtifact(kind="s3", bucket=match[1], key=match[2])
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise InfraConfigError(f"JV3_MODEL_ARTIFACT={value!r}: no such file (resolved to {path})")
    if not path.name.endswith(".tar.gz"):
        raise InfraConfigError(f"JV3_MODEL_ARTIFACT={value!r} must be a .tar.gz archive (make package builds model.tar.gz)")
    return ModelArtifact(kind="asset", path=path.resolve())


def _bool(value: str, name: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise InfraConfigError(f"{name}={value!r} is not a boolean; expected true or false")


def _int(value: str, name: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InfraConfigError(f"{name}={value!r} is not an integer") from None
    if number < minimum:
        raise InfraConfigError(f"{name}={number} must be at least {minimum}")
    return number


def _percent(value: str, name: str, minimum: int) -> int:
    number = _int(value, name, minimum)
    if number > 100:
        raise InfraConfigError(f"{name}={number} is a percentage; expected {minimum}..100")
    return number


def _choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise InfraConfigError(f"{name}={value!r} is not valid; expected one of {', '.join(choices)}")
    return value


def _dimensions(value: str) -> int:
    number = _int(value, "JV3_DEFAULT_DIMENSIONS", 1)
    if number > FULL_DIMENSIONS:
        raise InfraConfigError(f"JV3_DEFAULT_DIMENSIONS={number} exceeds the model's {FULL_DIMENSIONS} dimensions")
    return number


def _tasks(value: str) -> tuple[str, ...]:
    names = _list(value)
    if not names:
        raise InfraConfigError("JV3_TASKS names no task; expected some of " + ", ".join(TASKS))
    for name in names:
        _choice(name, TASKS, "JV3_TASKS")
    return names


def _list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())
