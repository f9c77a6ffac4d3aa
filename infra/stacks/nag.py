"""cdk-nag v3 acknowledgements (``Validations.of(c).acknowledge``); each names the rule, the resource, the reason.

cdk-nag v3 matches a wildcard finding by its exact id, e.g. ``AwsSolutions-IAM5[Resource::<Bucket.Arn>/*]``.
``acknowledge_wildcards`` therefore reads the role's finished policy, flattens each wildcard resource the
way cdk-nag does, and acknowledges it with the reason registered for the statement's Sid. A wildcard in a
statement without a registered reason stays unacknowledged, so the nag test fails on it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aws_cdk import Acknowledgment, Stack, Validations
from aws_cdk import aws_iam as iam
from constructs import IConstruct

# Sid → why its resources hold a wildcard. Only these statements may.
WILDCARD_REASONS: dict[str, str] = {
    "EcrLogin": "ecr:GetAuthorizationToken has no resource-level permissions; image pulls are scoped to the "
                "one DLC repository by the PullDlcImage statement",
    "PublishMetrics": "cloudwatch:PutMetricData has no resource-level permissions; a cloudwatch:namespace "
                      "condition limits it to the SageMaker endpoint and transform-job namespaces",
    "VpcNetworkInterfaces": "SageMaker creates the model's ENIs in the configured subnets; these EC2 actions "
                            "are not resource-scoped when the interface does not exist yet",
    "WriteOwnLogGroup": "log stream names are chosen by SageMaker per instance or job inside the one log group",
    "ReadCorpora": "transform jobs read whatever corpus objects the client uploads to the batch input bucket",
    "WriteEmbeddings": "transform jobs write one result object per input object to the batch output bucket",
    "WriteCaptures": "data capture writes objects named by SageMaker under the capture/ prefix",
    "ReadRequests": "async requests are objects the client uploads under the requests/ prefix",
    "WriteResults": "async results and failures are objects named by SageMaker under results/ and failures/",
}


def acknowledge(construct: IConstruct, rule_id: str, reason: str) -> None:
    Validations.of(construct).acknowledge(Acknowledgment(id=rule_id, reason=reason))


def acknowledge_wildcards(policy: iam.ManagedPolicy, reasons: Mapping[str, str] = WILDCARD_REASONS) -> None:
    """Acknowledge AwsSolutions-IAM5 for each wildcard resource of ``policy``, by statement Sid."""
    stack = Stack.of(policy)
    document = stack.resolve(policy.node.default_child.policy_document)
    for statement in document.get("Statement", []):
        if statement.get("Effect") != "Allow":
            continue
        resources = statement.get("Resource", [])
        for resource in resources if isinstance(resources, list) else [resources]:
            flat = _flatten(resource)
            if "*" not in flat:
                continue
            sid = statement.get("Sid", "")
            if sid in reasons:
                acknowledge(policy, f"AwsSolutions-IAM5[Resource::{flat}]", f"{sid}: {reasons[sid]}")


def acknowledge_access_log_bucket(bucket: IConstruct) -> None:
    loop = "this is the server access log bucket; logging it to itself would loop"
    acknowledge(bucket, "AwsSolutions-S1", loop)
    acknowledge(bucket, "NIST.800.53.R5-S3BucketLoggingEnabled", loop)
    acknowledge(bucket, "NIST.800.53.R5-S3DefaultEncryptionKMS", "S3 server access log delivery supports SSE-S3 only")
    acknowledge(bucket, "NIST.800.53.R5-S3BucketReplicationEnabled",
                "access logs are kept a year in-region; cross-region replication is the operator's DR choice")


def acknowledge_data_buckets(buckets: list[IConstruct]) -> None:
    for bucket in buckets:
        acknowledge(bucket, "NIST.800.53.R5-S3BucketReplicationEnabled",
                    "corpora, embeddings, captures and async results are re-creatable from the client's data; "
                    "versioning guards against deletion, cross-region replication is the operator's DR choice")


def acknowledge_instance_storage(endpoint_config: IConstruct, instance_type: str) -> None:
    acknowledge(endpoint_config, "NIST.800.53.R5-SageMakerEndpointConfigurationKMSKeyConfigured",
                f"{instance_type} has NVMe instance storage that SageMaker encrypts in hardware; "
                "CreateEndpointConfig rejects a KmsKeyId for such instance types")


def _flatten(node: Any) -> str:
    """cdk-nag's flattenCfnReference: Ref → <Id>, GetAtt → <Id.Attr>, Join → joined, Sub → ${} as <>."""
    if node is None:
        return ""
    if isinstance(node, str):
        return node.replace("${", "<").replace("}", ">")
    if isinstance(node, dict):
        if "Fn::Join" in node:
            delimiter, items = node["Fn::Join"]
            return delimiter.join(_flatten(item) for item in items)
        if "Fn::Sub" in node:
            return _flatten(node["Fn::Sub"])
        if "Fn::GetAtt" in node:
            resource, attribute = node["Fn::GetAtt"]
            return f"<{_flatten(resource)}.{_flatten(attribute)}>"
        if "Fn::ImportValue" in node:
            return _flatten(node["Fn::ImportValue"])
        if "Ref" in node:
            return f"<{_flatten(node['Ref'])}>"
    return json.dumps(node, separators=(",", ":"))



def acknowledge_image_pull_grant(model: Any, image: Any) -> None:
    """byoc: the pull grant CDK writes for the bootstrap asset repository (``ContainerImage.grant_pull``).

    ``Repository.grant_pull`` adds its statements to the role's default policy, an ``AWS::IAM::Policy``:
    ECR pull actions on the one asset repository and ``ecr:GetAuthorizationToken`` on ``*``. Acknowledged
    only while that is all the default policy holds, so anything else added there is still reported.
    """
    if getattr(image, "asset", None) is None:
        return
    policy = model.role.node.try_find_child("DefaultPolicy")
    if policy is None:
        return
    document = Stack.of(policy).resolve(policy.node.default_child.policy_document)
    allowed = {"ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer",
               "ecr:GetAuthorizationToken"}
    for statement in document.get("Statement", []):
        actions = statement.get("Action", [])
        actions = set(actions if isinstance(actions, list) else [actions])
        if statement.get("Effect") != "Allow" or not actions <= allowed:
            return
        if statement.get("Resource") == "*" and actions != {"ecr:GetAuthorizationToken"}:
            return
    acknowledge(policy, "AwsSolutions-IAM5[Resource::*]",
                "ecr:GetAuthorizationToken has no resource-level permissions; the image pull actions are scoped "
                "to the CDK bootstrap container-asset repository that holds the byoc image")
    acknowledge(policy, "NIST.800.53.R5-IAMNoInlinePolicy",
                "CDK's grant_pull on the bootstrap container-asset repository (not owned by this stack) writes "
                "this default policy: ECR pull on that one repository and ecr:GetAuthorizationToken, nothing else")
