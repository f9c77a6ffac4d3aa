"""Helpers for reading synthesised templates in the infra tests."""

from __future__ import annotations

from aws_cdk.assertions import Template


def resources(template: Template, type_name: str) -> dict[str, dict]:
    return template.find_resources(type_name)


def only(template: Template, type_name: str) -> dict:
    found = resources(template, type_name)
    assert len(found) == 1, f"expected one {type_name}, found {sorted(found)}"
    return next(iter(found.values()))


# Everything a fully-featured deployment turns on, with a CPU instance type (EBS volume: KMS key applies).
FULL_ENV = {
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
    "JV3_DISABLE_SCALE_IN": "true",
}
