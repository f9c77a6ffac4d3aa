"""Grants shared by the stacks, written out action by action (no ``*`` actions, no managed policies)."""

from __future__ import annotations

from aws_cdk import Aws
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms

from ..components.model import EmbeddingModel

KEY_USE = ["kms:Decrypt", "kms:DescribeKey", "kms:Encrypt", "kms:GenerateDataKey"]


def log_group_arn(name: str) -> str:
    return f"arn:{Aws.PARTITION}:logs:{Aws.REGION}:{Aws.ACCOUNT_ID}:log-group:{name}"


def grant_logs(model: EmbeddingModel, log_group_name: str) -> None:
    """Create and write the one log group the container logs to (SageMaker names it, streams vary)."""
    model.add_to_policy(iam.PolicyStatement(
        sid="WriteOwnLogGroup",
        actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:DescribeLogStreams", "logs:PutLogEvents"],
        resources=[log_group_arn(log_group_name), f"{log_group_arn(log_group_name)}:log-stream:*"]))


def grant_key_use(model: EmbeddingModel, key: kms.IKey, sid: str = "UseDataKey") -> None:
    model.add_to_policy(iam.PolicyStatement(sid=sid, actions=KEY_USE, resources=[key.key_arn]))


def allow_cloudwatch_alarms(key: kms.Key) -> None:
    """CloudWatch alarms publish to KMS-encrypted SNS topics only when the key policy lets CloudWatch use the key."""
    key.add_to_resource_policy(iam.PolicyStatement(
        sid="CloudWatchAlarmsPublishToEncryptedTopics",
        principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
        actions=["kms:Decrypt", "kms:GenerateDataKey"], resources=["*"],
        conditions={"StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID}}))
