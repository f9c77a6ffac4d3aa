"""Buckets of batch transform: corpora go in, embeddings come out."""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from .storage import SecureBucket


class BatchTransformStorage(Construct):
    """``input_bucket`` (corpora, kept) and ``output_bucket`` (results, expire after ``output_retention_days``).

    CreateTransformJob runs under the execution role of the model it names, so the stack grants that
    model's role read on the input and write on the output bucket.
    """

    def __init__(self, scope: Construct, construct_id: str, *, key: kms.IKey, access_logs: s3.IBucket,
                 output_retention_days: int = 90) -> None:
        super().__init__(scope, construct_id)
        self.input_bucket = SecureBucket(self, "Input", key=key, access_logs=access_logs,
                                         log_prefix="batch-input").bucket
        self.output_bucket = SecureBucket(self, "Output", key=key, access_logs=access_logs,
                                          log_prefix="batch-output", expiration=Duration.days(output_retention_days)).bucket
