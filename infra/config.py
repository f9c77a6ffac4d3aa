"""Every deployment setting, resolved CDK context → ``JV3_*`` environment variable → default.

One table (``SETTINGS``) names each setting's context key, environment variable, default and help;
docs/deploy.md lists the same rows. ``DeploySettings.resolve`` reads them at call time and validates
them, raising ``InfraConfigError`` with the bad value and the valid choices.

The endpoint's runtime variables (``JV3_DEFAULT_TASK`` …) keep the names that
``inference/settings.py`` reads; ``infra`` never imports ``inference`` (they meet only through these
names), so the task and encoding choices are repeated here and a test pins them to the handler's.
Their *defaults* are not repeated: ``inference/settings.py`` holds the one default of each, and
``container_environment`` sets such a variable only when the operator gave a value.

A local ``model.tar.gz`` is checked against the checkpoint it carries: its ``manifest.json`` (written
by model_package) gives the hidden size, the task adapters and the Python its wheels were built for.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InfraConfigError

# --- the container runtime -----------------------------------------------------------------------
# byoc: the repository's Dockerfile, built and pushed to CDK's bootstrap ECR repository at deploy;
#       the server is `python -m inference.serve serve` (cross-request batching, one engine per GPU).
# dlc:  the AWS PyTorch inference DLC below with the archive's code/ run by the SageMaker toolkit
#       under TorchServe. Its 2.6.0 line is the last PyTorch inference DLC and is past its end of
#       patching (2026-06-30). docs/deploy.md ("Runtime") weighs the two.
RUNTIMES = ("byoc", "dlc")
DEFAULT_RUNTIME = "byoc"
# What the byoc image is built from: the Dockerfile at the repository root, which copies inference/ only.
BYOC_DOCKERFILE = "Dockerfile"
# The asset is staged (and hashed) from these paths alone, so an edit elsewhere in the repository does
# not rebuild the image; a test checks the Dockerfile's COPY sources are covered. Docker ignore syntax.
BYOC_CONTEXT_EXCLUDE = ("*", "!Dockerfile", "!inference/**", "**/__pycache__", "**/*.pyc")
# The Dockerfile installs PyPI's torch by default, the CUDA build (its wheels carry the CUDA libraries;
# the instance provides the driver), on python:3.12-slim, which keeps receiving security rebuilds. CPU
# instance types get the same torch version from PyTorch's CPU index: gigabytes smaller, nothing unused.
BYOC_CPU_BUILD_ARGS = {"TORCH_INDEX": "https://download.pytorch.org/whl/cpu"}

# dlc: the TorchServe handler service TorchServe loads instead of the toolkit's (TS_DEFAULT_SERVICE_HANDLER;
# TorchServe reads TS_* variables over its config file). It is inference/sagemaker_service.py, which
# model_package copies into the archive's code/ as package jv3_inference; code/ is on the worker's path.
TS_HANDLER_SERVICE = "jv3_inference.sagemaker_service"

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
# x86 families only: the DLC images above and the byoc image (linux/amd64) are built for x86_64.
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
FULL_DIMENSIONS = 1024  # jina-embeddings-v3; a local archive's manifest.json gives its checkpoint's own size
MANIFEST = "manifest.json"  # model_package writes it at the archive root
MANIFEST_MAX_BYTES = 64 * 1024 * 1024

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
    "runtime": ("runtime", "JV3_RUNTIME", DEFAULT_RUNTIME,
                "container: byoc (the repository's Dockerfile, built by CDK at deploy: needs Docker) or dlc "
                "(the AWS PyTorch 2.6 inference DLC)"),
    "image_tag": ("image_tag", "JV3_IMAGE_TAG", "",
                  f"dlc only: pytorch-inference image tag (empty: {GPU_IMAGE_TAG} on GPU, {CPU_IMAGE_TAG} on CPU)"),
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
                          "EnableNetworkIsolation on the models (dlc: the archive must vendor its wheels, as make package does)"),
    "alarm_email": ("alarm_email", "JV3_ALARM_EMAIL", "", "e-mail subscribed to the alarm topic (empty: none)"),
    "latency_p99_ms": ("latency_p99_ms", "JV3_ALARM_LATENCY_P99_MS", "2000", "ModelLatency p99 alarm threshold in ms"),
    "async_enabled": ("async_enabled", "JV3_ASYNC", "false", "also deploy the async-inference stack"),
    "async_max_instances": ("async_max_instances", "JV3_ASYNC_MAX_INSTANCES", "2", "async endpoint ceiling (floor is 0)"),
    "async_notifications": ("async_notifications", "JV3_ASYNC_NOTIFICATIONS", "true",
                            "SNS success and error topics for async results"),
    # Container settings: empty means unset on the model, so the container's own default applies
    # (inference/settings.py); a given value is validated here and, for a local archive, against its checkpoint.
    "default_task": ("default_task", "JV3_DEFAULT_TASK", "",
                     "container: task when a request names none (empty: the container's default)"),
    "default_dimensions": ("default_dimensions", "JV3_DEFAULT_DIMENSIONS", "",
                           "container: Matryoshka size when a request names none (empty: the container's default)"),
    "default_encoding": ("default_encoding", "JV3_DEFAULT_ENCODING", "",
                         "container: encoding when a request names none (empty: the container's default)"),
    "max_batch_tokens": ("max_batch_tokens", "JV3_MAX_BATCH_TOKENS", "",
                         "container: tokens per forward pass (empty: the container's default)"),
    "tasks": ("tasks", "JV3_TASKS", "",
              "container: comma-separated task adapters to prepare (empty: the container's default)"),
}
# The rows above that only reach the container (as the same variable), unset when empty.
CONTAINER_SETTINGS = ("default_task", "default_dimensions", "default_encoding", "max_batch_tokens", "tasks")


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
class CheckpointFacts:
    """What a local archive's ``manifest.json`` says about the checkpoint inside it (None: not stated)."""

    hidden_size: int | None
    tasks: tuple[str, ...] | None
    python: str | None  # the Python the vendored wheels in code/ were built for (target.python)
    code_package: str | None
    files: frozenset[str] | None  # archive paths, when the manifest lists them


@dataclass(frozen=True)
class DeploySettings:
    artifact: ModelArtifact
    stack_name: str
    region: str
    account: str | None
    instance_type: str
    runtime: str
    image_tag: str  # dlc only ("" with byoc)
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
    # container settings: None when the operator gave none (the container's default applies)
    default_task: str | None
    default_dimensions: int | None
    default_encoding: str | None
    max_batch_tokens: int | None
    tasks: tuple[str, ...] | None
    checkpoint: CheckpointFacts | None = None  # from a local archive's manifest.json

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
    def is_byoc(self) -> bool:
        return self.runtime == "byoc"

    @property
    def dlc_account(self) -> str:
        return DLC_ACCOUNTS[self.region]

    @property
    def dlc_image_uri(self) -> str:
        """The DLC image of ``JV3_RUNTIME=dlc`` (the byoc image URI exists only in the stack, from its asset)."""
        suffix = ".amazonaws.com.cn" if self.region.startswith("cn-") else ".amazonaws.com"
        return f"{self.dlc_account}.dkr.ecr.{self.region}{suffix}/{IMAGE_REPOSITORY}:{self.image_tag}"

    @property
    def model_server_workers(self) -> int:
        """One model copy per GPU; on CPU one worker that uses every core through torch's threads."""
        return max(self.gpu_count, 1)

    @property
    def byoc_build_args(self) -> dict[str, str]:
        return {} if self.is_gpu else dict(BYOC_CPU_BUILD_ARGS)

    def container_environment(self, mode: str = "realtime") -> dict[str, str]:
        """The model's environment for ``mode``: ``realtime`` (6 MB requests, 60 s invocations) or
        ``batch``/``async`` (MaxPayloadInMB up to 100 MB, invocations up to an hour).

        dlc: what the SageMaker SDK would set for a PyTorch model, TorchServe's workers, limits and
        handler service. byoc: only what ``inference.serve`` reads. Both: the container settings the
        operator gave (an unset one keeps the container's default).
        """
        if mode == "realtime":
            request_bytes = 8 * 1024 * 1024  # above SageMaker's 6 MB cap, so SageMaker refuses first
            response_bytes = 64 * 1024 * 1024  # 2048 float vectors of 1024 dims as JSON ≈ 40 MB
            timeout_s = 120  # TorchServe: above SageMaker's 60 s, so SageMaker times out first
            # byoc: answer 503 (naming JV3_REQUEST_TIMEOUT_S) just before SageMaker's 60 s invocation
            # timeout, so the caller gets the server's reason and the batcher drops the abandoned work
            server_timeout_s = 55
        elif mode in ("batch", "async"):
            request_bytes = 100 * 1024 * 1024
            response_bytes = 1024 * 1024 * 1024  # JSON embeddings are ~20x the bytes of their text
            timeout_s = server_timeout_s = 3600
        else:
            raise InfraConfigError(f"container mode {mode!r} is not valid; expected one of realtime, batch, async")
        jv3 = {var: value for var, value in self._container_settings().items() if value is not None}
        # Both runtimes' handlers enforce these caps themselves, answering a 413 that names them.
        # TorchServe's own request limit sits at twice ours, so that an oversized body reaches our
        # handler (TorchServe's own 413 has an empty body), and its response limit equals our cap.
        jv3["JV3_MAX_REQUEST_BYTES"] = str(request_bytes)
        jv3["JV3_MAX_RESPONSE_BYTES"] = str(response_bytes)
        torchserve_request_bytes = str(2 * request_bytes)
        if self.is_byoc:
            return {**jv3, "JV3_REQUEST_TIMEOUT_S": str(server_timeout_s)}
        workers = str(self.model_server_workers)
        return {
            "SAGEMAKER_PROGRAM": "inference.py",
            "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
            "SAGEMAKER_REGION": self.region,
            "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
            "SAGEMAKER_MODEL_SERVER_WORKERS": workers,
            # Once any SAGEMAKER_TS_* variable is set, the toolkit writes a per-model block with
            # minWorkers=SAGEMAKER_TS_MIN_WORKERS and maxWorkers=SAGEMAKER_TS_MAX_WORKERS (both default 1)
            # that overrides SAGEMAKER_MODEL_SERVER_WORKERS: without these a 4-GPU instance runs one worker.
            "SAGEMAKER_TS_MIN_WORKERS": workers,
            "SAGEMAKER_TS_MAX_WORKERS": workers,
            # TorchServe reads TS_* (enable_envvars_config), the SageMaker toolkit reads SAGEMAKER_TS_*.
            "TS_MAX_REQUEST_SIZE": torchserve_request_bytes,
            "TS_MAX_RESPONSE_SIZE": str(response_bytes),
            "TS_DEFAULT_RESPONSE_TIMEOUT": str(timeout_s),
            "TS_DEFAULT_SERVICE_HANDLER": TS_HANDLER_SERVICE,
            "SAGEMAKER_TS_MAX_REQUEST_SIZE": torchserve_request_bytes,
            "SAGEMAKER_TS_MAX_RESPONSE_SIZE": str(response_bytes),
            "SAGEMAKER_TS_RESPONSE_TIMEOUT": str(timeout_s),
            **jv3,
        }

    def _container_settings(self) -> dict[str, str | None]:
        return {
            "JV3_DEFAULT_TASK": self.default_task,
            "JV3_DEFAULT_DIMENSIONS": None if self.default_dimensions is None else str(self.default_dimensions),
            "JV3_DEFAULT_ENCODING": self.default_encoding,
            "JV3_MAX_BATCH_TOKENS": None if self.max_batch_tokens is None else str(self.max_batch_tokens),
            "JV3_TASKS": None if self.tasks is None else ",".join(self.tasks),
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
        runtime = _choice(raw["runtime"], RUNTIMES, "JV3_RUNTIME")
        region = raw["region"] or environ.get("CDK_DEFAULT_REGION", "") or "us-east-1"
        if runtime == "dlc" and region not in DLC_ACCOUNTS:
            raise InfraConfigError(
                f"JV3_REGION={region!r} has no PyTorch DLC registry; expected one of {', '.join(sorted(DLC_ACCOUNTS))} "
                "(or JV3_RUNTIME=byoc, which builds its own image)")
        if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d{1,2}", region):
            raise InfraConfigError(f"JV3_REGION={region!r} is not an AWS region like 'us-east-1'")
        if runtime == "byoc" and raw["image_tag"]:
            raise InfraConfigError(f"JV3_IMAGE_TAG={raw['image_tag']!r} pins a DLC image; it applies to JV3_RUNTIME=dlc "
                                   "only (byoc builds the repository's Dockerfile)")

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

        artifact = _artifact(raw["model_artifact"], _bool(raw["require_artifact"], "JV3_REQUIRE_ARTIFACT"), base_dir)
        checkpoint = read_manifest(artifact.path) if artifact.kind == "asset" else None
        image_tag = _image_tag(raw["image_tag"], is_gpu) if runtime == "dlc" else ""
        container = _container_settings(raw, checkpoint, artifact)
        if checkpoint is not None and runtime == "dlc":
            _check_dlc_archive(checkpoint, image_tag, artifact)
        return cls(
            artifact=artifact,
            stack_name=stack_name,
            region=region,
            account=environ.get("CDK_DEFAULT_ACCOUNT") or None,
            instance_type=instance_type,
            runtime=runtime,
            image_tag=image_tag,
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
            **container,
            checkpoint=checkpoint,
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


def _container_settings(raw: Mapping[str, str], checkpoint: CheckpointFacts | None,
                        artifact: ModelArtifact) -> dict[str, Any]:
    """The container settings the operator gave, validated (alone, together, against the checkpoint).

    An empty one stays None: the container's own default applies. Infra does not know those defaults
    (inference/settings.py holds them), so where a default could clash with a given value it asks for
    the value instead of guessing: JV3_TASKS needs JV3_DEFAULT_TASK, and a checkpoint that lacks some of
    the task adapters needs JV3_TASKS.
    """
    where = f" (JV3_MODEL_ARTIFACT={artifact.path})" if checkpoint is not None else ""
    tasks = _tasks(raw["tasks"]) if raw["tasks"] else None
    default_task = _choice(raw["default_task"], TASKS, "JV3_DEFAULT_TASK") if raw["default_task"] else None
    dimensions = _dimensions(raw["default_dimensions"], checkpoint, where) if raw["default_dimensions"] else None
    encoding = _choice(raw["default_encoding"], ENCODINGS, "JV3_DEFAULT_ENCODING") if raw["default_encoding"] else None
    tokens = _int(raw["max_batch_tokens"], "JV3_MAX_BATCH_TOKENS", 512) if raw["max_batch_tokens"] else None

    has = checkpoint.tasks if checkpoint is not None else None
    if has is not None:
        if tasks is not None:
            missing = [t for t in tasks if t not in has]
            if missing:
                raise InfraConfigError(
                    f"JV3_TASKS={','.join(tasks)} names {', '.join(missing)}, which the checkpoint lacks: it has "
                    f"{', '.join(has) or 'no task adapters'}{where}")
        elif set(TASKS) - set(has):
            raise InfraConfigError(
                f"the checkpoint has only the task adapters {', '.join(has) or '(none)'}{where}: set JV3_TASKS to "
                "those it should serve (the container's own default may name others and fail at start-up)")
    if tasks is not None and default_task is None:
        raise InfraConfigError(
            f"JV3_TASKS={','.join(tasks)} is set without JV3_DEFAULT_TASK: name the default task too (one of "
            f"{', '.join(tasks)}); the container's own default may not be among these tasks")
    served = tasks if tasks is not None else has
    if default_task is not None and served is not None and default_task not in served:
        source = f"JV3_TASKS={','.join(tasks)}" if tasks is not None else f"the checkpoint's task adapters{where}"
        raise InfraConfigError(f"JV3_DEFAULT_TASK={default_task!r} is not among {source}: expected one of "
                               f"{', '.join(served)}")
    return {"default_task": default_task, "default_dimensions": dimensions, "default_encoding": encoding,
            "max_batch_tokens": tokens, "tasks": tasks}


def _dimensions(value: str, checkpoint: CheckpointFacts | None, where: str) -> int:
    number = _int(value, "JV3_DEFAULT_DIMENSIONS", 1)
    if checkpoint is not None and checkpoint.hidden_size is not None:
        if number > checkpoint.hidden_size:
            raise InfraConfigError(f"JV3_DEFAULT_DIMENSIONS={number} exceeds the checkpoint's hidden size of "
                                   f"{checkpoint.hidden_size}{where}")
    elif number > FULL_DIMENSIONS:
        raise InfraConfigError(f"JV3_DEFAULT_DIMENSIONS={number} exceeds the model's {FULL_DIMENSIONS} dimensions")
    return number


def _check_dlc_archive(checkpoint: CheckpointFacts, image_tag: str, artifact: ModelArtifact) -> None:
    """What would stop the DLC from starting this archive: its handler service or its wheels' Python."""
    where = f"JV3_MODEL_ARTIFACT={artifact.path}"
    package, _, module = TS_HANDLER_SERVICE.partition(".")
    if checkpoint.code_package is not None and checkpoint.code_package != package:
        raise InfraConfigError(f"{where} carries its code as {checkpoint.code_package!r}, but the DLC's handler "
                               f"service is {TS_HANDLER_SERVICE!r}: rebuild it with this repository's model_package")
    handler_file = f"code/{package}/{module}.py"
    if checkpoint.files is not None and handler_file not in checkpoint.files:
        raise InfraConfigError(f"{where} has no {handler_file} (TS_DEFAULT_SERVICE_HANDLER={TS_HANDLER_SERVICE}): "
                               "it was built before the handler service existed; rebuild it (make package)")
    match = re.search(r"-py(\d)(\d+)-", image_tag)
    if checkpoint.python and match:
        image_python = f"{match[1]}.{match[2]}"
        if checkpoint.python != image_python:
            raise InfraConfigError(
                f"{where} was built for Python {checkpoint.python} (manifest target.python) but the image "
                f"{image_tag} runs Python {image_python}: rebuild it with --python-version {image_python}")


def read_manifest(path: Path | None) -> CheckpointFacts | None:
    """The checkpoint facts of a local archive's ``manifest.json``; None when it has none.

    Reads the gzip stream member by member and stops at the manifest (model_package writes members in
    path order, so it comes before the weights); nothing is extracted to disk.
    """
    if path is None:
        return None
    try:
        with tarfile.open(path, "r|gz") as archive:
            for member in archive:
                if member.name.removeprefix("./") != MANIFEST or not member.isfile():
                    continue
                if member.size > MANIFEST_MAX_BYTES:
                    raise InfraConfigError(f"JV3_MODEL_ARTIFACT={path}: {MANIFEST} is {member.size} bytes, "
                                           f"more than a manifest should be ({MANIFEST_MAX_BYTES})")
                data = archive.extractfile(member).read()
                break
            else:
                return None
    except (tarfile.TarError, OSError, EOFError) as error:
        raise InfraConfigError(f"JV3_MODEL_ARTIFACT={path} is not a readable .tar.gz archive "
                               f"({type(error).__name__}: {error})") from None
    try:
        manifest = json.loads(data)
    except ValueError as error:
        raise InfraConfigError(f"JV3_MODEL_ARTIFACT={path}: {MANIFEST} is not JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise InfraConfigError(f"JV3_MODEL_ARTIFACT={path}: {MANIFEST} is not a JSON object")
    checkpoint = manifest.get("checkpoint") if isinstance(manifest.get("checkpoint"), dict) else {}
    target = manifest.get("target") if isinstance(manifest.get("target"), dict) else {}
    hidden_size = checkpoint.get("hidden_size")
    tasks = checkpoint.get("tasks")
    files = manifest.get("files")
    return CheckpointFacts(
        hidden_size=hidden_size if isinstance(hidden_size, int) and hidden_size > 0 else None,
        tasks=tuple(str(t) for t in tasks) if isinstance(tasks, list) else None,
        python=str(target["python"]) if target.get("python") else None,
        code_package=str(manifest["code_package"]) if manifest.get("code_package") else None,
        files=frozenset(files) if isinstance(files, dict) else None,
    )


def _tasks(value: str) -> tuple[str, ...]:
    names = _list(value)
    if not names:
        raise InfraConfigError("JV3_TASKS names no task; expected some of " + ", ".join(TASKS))
    for name in names:
        _choice(name, TASKS, "JV3_TASKS")
    return names


def _list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())
