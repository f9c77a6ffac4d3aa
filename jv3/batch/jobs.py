"""Stage 2 of a batch run: the transform job. ``JobSettings`` say where it runs (from the infra
stack's outputs, from options, or read back from a job for its re-run); ``job_request`` is the
``CreateTransformJob`` request (SplitType Line, BatchStrategy MultiRecord, JSON Lines in and out,
AssembleWith Line), with ``MaxPayloadInMB`` sized by ``max_payload_mb`` so that a mini-batch's
request fits the container and its response stays moderate; ``submit`` creates it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import botocore.exceptions

from .. import aws
from ..errors import BatchJobError, InvalidArgument
from ..wire import response_bytes_per_item
from .manifest import JSONLINES, Manifest, MiB, Part, job_environment

# The container refuses bodies over JV3_MAX_REQUEST_BYTES (6 MiB by default), so a mini-batch must too.
CONTAINER_MAX_PAYLOAD_MB = 6
# SageMaker: MaxPayloadInMB × MaxConcurrentTransforms must not exceed 100.
SAGEMAKER_PAYLOAD_BUDGET_MB = 100
# Bytes of one JSON Lines output record around its embedding: {"id":...,"index":...,"tokens":...,"embedding":...}
RECORD_OVERHEAD = 96

# The infra stack's CloudFormation outputs this client reads (docs/deploy.md, "Stack outputs"):
# the one place that names them. Optional ones may be absent.
STACK_OUTPUTS = {
    "model_name": "BatchModelName",
    "input_bucket": "BatchInputBucket",
    "output_bucket": "BatchOutputBucket",
    "role_arn": "TransformRoleArn",
    "kms_key_arn": "KmsKeyArn",
}
OPTIONAL_STACK_OUTPUTS = ("role_arn", "kms_key_arn")


def max_payload_mb(
    *,
    avg_record_bytes: float,
    max_record_bytes: int,
    dimensions: int | None,
    embedding_type: str,
    response_budget_mb: float = 24,
    container_limit_mb: int = CONTAINER_MAX_PAYLOAD_MB,
) -> int:
    """``MaxPayloadInMB`` for a corpus: big enough for the largest record, small enough that the
    request fits the container (``JV3_MAX_REQUEST_BYTES``) and that the response of a full
    mini-batch (embeddings are far larger than short texts) stays near ``response_budget_mb``."""
    needed = max(1, math.ceil(max_record_bytes / MiB))
    if needed > container_limit_mb:
        raise InvalidArgument(
            f"a record of {max_record_bytes:,} bytes exceeds the container's {container_limit_mb} MB request limit"
        )
    records = response_budget_mb * MiB / response_bytes_per_item(dimensions, embedding_type, overhead=RECORD_OVERHEAD)
    by_response = math.floor(records * max(avg_record_bytes, 1) / MiB)
    return max(needed, min(container_limit_mb, by_response))


@dataclass
class JobSettings:
    """Where a transform job runs; ``from_stack`` reads them from the infra stack's outputs."""

    model_name: str
    input_bucket: str
    output_bucket: str
    role_arn: str | None = None  # the Model carries the execution role; kept for reference
    kms_key_arn: str | None = None  # encrypts the outputs (TransformOutput.KmsKeyId)
    instance_type: str = "ml.g5.xlarge"
    instance_count: int = 1
    max_concurrent_transforms: int = 1

    @classmethod
    def from_stack(
        cls, stack_name: str, *, cloudformation=None, region_name: str | None = None, **overrides
    ) -> JobSettings:
        """The stack's outputs, overridden by the ``overrides`` that are not None; ``cloudformation``
        is made for ``region_name`` unless given."""
        cloudformation = cloudformation or aws.client("cloudformation", region_name=region_name)
        outputs = stack_outputs(stack_name, cloudformation=cloudformation)
        values = {}
        for attribute, output in STACK_OUTPUTS.items():
            if output in outputs:
                values[attribute] = outputs[output]
            elif attribute not in OPTIONAL_STACK_OUTPUTS and overrides.get(attribute) is None:
                raise InvalidArgument(
                    f"stack {stack_name!r} has no output {output!r}; it has {', '.join(sorted(outputs)) or 'none'}"
                )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_job(cls, description: dict, manifest: Manifest) -> JobSettings:
        """The settings a job created by ``submit`` ran with, read back from its description, so
        that a re-run is the same job on fewer parts: model, buckets, instances, concurrency and the
        KMS key of the outputs."""
        resources = description["TransformResources"]
        return cls(
            model_name=description["ModelName"],
            input_bucket=aws.split_s3_uri(manifest.run_uri)[0],
            output_bucket=aws.split_s3_uri(manifest.output_uri)[0],
            kms_key_arn=description.get("TransformOutput", {}).get("KmsKeyId"),
            instance_type=resources["InstanceType"],
            instance_count=resources["InstanceCount"],
            max_concurrent_transforms=description.get("MaxConcurrentTransforms", 1),
        )


def stack_outputs(stack_name: str, *, cloudformation) -> dict[str, str]:
    """``{OutputKey: OutputValue}`` of a deployed CloudFormation stack."""
    try:
        stacks = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    except botocore.exceptions.ClientError as exc:
        raise InvalidArgument(f"cannot read stack {stack_name!r}: {exc.response['Error'].get('Message', exc)}") from exc
    return {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}


def job_request(
    manifest: Manifest,
    settings: JobSettings,
    *,
    job_name: str,
    parts: Sequence[Part] | None = None,
    manifest_file_uri: str | None = None,
    payload_mb: int | None = None,
) -> dict:
    """The ``CreateTransformJob`` arguments for the whole corpus, or for ``parts`` listed in the
    SageMaker manifest file at ``manifest_file_uri``."""
    chosen = list(parts) if parts is not None else manifest.parts
    total = sum(p.records for p in chosen)
    payload_mb = payload_mb or max_payload_mb(
        avg_record_bytes=sum(p.bytes for p in chosen) / max(total, 1),
        max_record_bytes=max(p.max_record_bytes for p in chosen),
        dimensions=manifest.dimensions,
        embedding_type=manifest.embedding_type,
    )
    concurrency = max(1, min(settings.max_concurrent_transforms, SAGEMAKER_PAYLOAD_BUDGET_MB // payload_mb))
    environment = job_environment(
        task=manifest.task, dimensions=manifest.dimensions, embedding_type=manifest.embedding_type
    )
    data_source = (
        {"S3DataType": "ManifestFile", "S3Uri": manifest_file_uri}
        if manifest_file_uri
        else {"S3DataType": "S3Prefix", "S3Uri": manifest.parts_uri}
    )
    output = {"S3OutputPath": manifest.output_uri + "/", "Accept": JSONLINES, "AssembleWith": "Line"}
    if settings.kms_key_arn:
        output["KmsKeyId"] = settings.kms_key_arn
    return {
        "TransformJobName": job_name,
        "ModelName": settings.model_name,
        "MaxConcurrentTransforms": concurrency,
        "MaxPayloadInMB": payload_mb,
        "BatchStrategy": "MultiRecord",
        "Environment": environment,
        "TransformInput": {
            "DataSource": {"S3DataSource": data_source},
            "ContentType": JSONLINES,
            "CompressionType": "None",
            "SplitType": "Line",
        },
        "TransformOutput": output,
        "TransformResources": {"InstanceType": settings.instance_type, "InstanceCount": settings.instance_count},
    }


def submit(
    manifest: Manifest,
    settings: JobSettings,
    *,
    sagemaker,
    s3,
    parts: Sequence[Part] | None = None,
    job_name: str | None = None,
    payload_mb: int | None = None,
) -> str:
    """Create the transform job; with ``parts``, one that re-runs only those. Returns its name."""
    manifest_file_uri = None
    if parts is not None:
        if not parts:
            raise InvalidArgument("no parts to re-run: every part has complete outputs")
        job_name = job_name or f"{Path(manifest.run_uri).name}-r{len(manifest.jobs)}"[:63]
        # a SageMaker manifest file: a common prefix, then object names relative to it; outputs are
        # named by those relative names, so they overwrite the failed parts' outputs in place
        manifest_file_uri = aws.join_s3_uri(manifest.run_uri, f"{job_name}.manifest")
        listing = [{"prefix": manifest.parts_uri}, *(p.name for p in parts)]
        aws.put_s3_object(s3, manifest_file_uri, json.dumps(listing).encode(), "application/json")
    job_name = job_name or Path(manifest.run_uri).name
    request = job_request(
        manifest, settings, job_name=job_name, parts=parts, manifest_file_uri=manifest_file_uri, payload_mb=payload_mb
    )
    try:
        sagemaker.create_transform_job(**request)
    except botocore.exceptions.ClientError as exc:
        raise BatchJobError(f"cannot create transform job {job_name!r}: {exc.response['Error'].get('Message', exc)}") from exc
    manifest.jobs.append(job_name)
    manifest.save(s3)
    return job_name


def describe(job_name: str, *, sagemaker) -> dict:
    try:
        return sagemaker.describe_transform_job(TransformJobName=job_name)
    except botocore.exceptions.ClientError as exc:
        raise BatchJobError(f"cannot describe transform job {job_name!r}: {exc.response['Error'].get('Message', exc)}") from exc


def run_uri_of(description: dict) -> str:
    """The run folder (where manifest.json lies) of a job created by ``submit``."""
    uri = description["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"]
    if "/parts" in uri:
        return uri[: uri.rindex("/parts")]
    return uri.rsplit("/", 1)[0]


def manifest_of_job(job_name: str, *, sagemaker, s3) -> Manifest:
    return Manifest.load(run_uri_of(describe(job_name, sagemaker=sagemaker)), s3)
