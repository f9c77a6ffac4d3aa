"""S3 buckets with one house standard: KMS, TLS only, no public access, versioned, lifecycle, access logs."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct


class AccessLogBucket(Construct):
    """Target of S3 server access logs. ``bucket``.

    SSE-S3, not KMS: S3 log delivery cannot write to SSE-KMS buckets.
    """

    def __init__(self, scope: Construct, construct_id: str, *, retention_days: int = 365) -> None:
        super().__init__(scope, construct_id)
        self.bucket = s3.Bucket(
            self, "Bucket", encryption=s3.BucketEncryption.S3_MANAGED, enforce_ssl=True, minimum_tls_version=1.2,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL, object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            versioned=True, removal_policy=RemovalPolicy.RETAIN,
            lifecycle_rules=[s3.LifecycleRule(id="expire-logs", expiration=Duration.days(retention_days),
                                              noncurrent_version_expiration=Duration.days(30))])


class SecureBucket(Construct):
    """``bucket``: SSE-KMS with ``key`` (bucket keys on), TLS-only policy, public access blocked, versioned,
    server access logs to ``access_logs`` under ``<log_prefix>/``, lifecycle rules for stale data."""

    def __init__(self, scope: Construct, construct_id: str, *, key: kms.IKey, access_logs: s3.IBucket,
                 log_prefix: str, expiration: Duration | None = None,
                 infrequent_access_after_days: int | None = 30,
                 extra_rules: Sequence[s3.LifecycleRule] = ()) -> None:
        super().__init__(scope, construct_id)
        transitions = []
        if infrequent_access_after_days is not None:
            transitions.append(s3.Transition(storage_class=s3.StorageClass.INFREQUENT_ACCESS,
                                             transition_after=Duration.days(infrequent_access_after_days)))
        rules = [
            s3.LifecycleRule(id="tidy", abort_incomplete_multipart_upload_after=Duration.days(7),
                             noncurrent_version_expiration=Duration.days(30),
                             transitions=transitions or None, expiration=expiration),
            *extra_rules,
        ]
        self.bucket = s3.Bucket(
            self, "Bucket", encryption=s3.BucketEncryption.KMS, encryption_key=key, bucket_key_enabled=True,
            enforce_ssl=True, minimum_tls_version=1.2, block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED, versioned=True,
            server_access_logs_bucket=access_logs, server_access_logs_prefix=f"{log_prefix}/",
            lifecycle_rules=rules, removal_policy=RemovalPolicy.RETAIN)
