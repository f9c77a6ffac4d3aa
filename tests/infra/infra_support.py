"""Helpers for reading synthesised templates in the infra tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from aws_cdk.assertions import Template


def resources(template: Template, type_name: str) -> dict[str, dict]:
    return template.find_resources(type_name)


def only(template: Template, type_name: str) -> dict:
    found = resources(template, type_name)
    assert len(found) == 1, f"expected one {type_name}, found {sorted(found)}"
    return next(iter(found.values()))


# Everything a fully-featured deployment turns on, with a CPU instance type (EBS volume: KMS key applies),
# on the DLC runtime (the default runtime, byoc, is what the default and gpu-async synths use).
FULL_ENV = {
    "JV3_RUNTIME": "dlc",
    "JV3_INSTANCE_TYPE": "ml.c6i.2xlarge",
    "JV3_REGION": "eu-west-1",
    "JV3_INSTANCE_COUNT": "2",
    "JV3_MIN_INSTANCES": "2",
    "JV3_MAX_INSTANCES": "6",
    "JV3_ASYNC": "true",
    "JV3_ASYNC_MAX_INSTANCES": "3",
    "JV3_DATA_CAPTURE_PERCENT": "20",
    "JV3_SUBNET_IDS": "subnet-0123456789abcdef0,subnet-0fedcba9876543210",
    "JV3_SECURITY_GROUP_IDS": "sg-0123456789abcdef0",
    "JV3_NETWORK_ISOLATION": "true",
    "JV3_ALARM_EMAIL": "oncall@example.com",
    "JV3_DEFAULT_TASK": "retrieval.passage",
    "JV3_DEFAULT_DIMENSIONS": "512",
    "JV3_TASKS": "retrieval.query,retrieval.passage",
    "JV3_DEFAULT_ENCODING": "base64",
    "JV3_MAX_BATCH_TOKENS": "16384",
    "JV3_DISABLE_SCALE_IN": "true",
}


# What model_package writes into manifest.json, reduced to what infra reads.
MANIFEST = {
    "format": 1,
    "model": "jina-embeddings-v3",
    "checkpoint": {"hidden_size": 1024, "tasks": ["retrieval.query", "retrieval.passage", "separation",
                                                  "classification", "text-matching"]},
    "code_package": "jv3_inference",
    "target": {"python": "3.12"},
    "files": {"code/inference.py": {}, "code/jv3_inference/sagemaker_service.py": {}, "manifest.json": {}},
}


def tiny_archive(path: Path, manifest: dict | None = None, *, weights: bytes = b"") -> Path:
    """A model.tar.gz stand-in: CDK only hashes and stages it; infra reads its manifest.json if given.

    Members in model_package's order (sorted paths): code/…, manifest.json, then model.safetensors.
    """
    members = [("code/inference.py", b"def model_fn(model_dir):\n    return None\n")]
    if manifest is not None:
        members.append(("manifest.json", json.dumps(manifest).encode()))
    if weights:
        members.append(("model.safetensors", weights))
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path
