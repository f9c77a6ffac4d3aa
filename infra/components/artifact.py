"""Where the SageMaker model reads ``model.tar.gz``: a CDK file asset, an existing S3 object, or a placeholder."""

from __future__ import annotations

from aws_cdk import Aws
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3_assets as s3_assets
from constructs import Construct

from ..config import ModelArtifact


class ModelArtifactSource(Construct):
    """Exposes ``model_data_url``, ``bucket_name``, ``object_key``, ``object_arn`` of the archive."""

    def __init__(self, scope: Construct, construct_id: str, *, artifact: ModelArtifact) -> None:
        super().__init__(scope, construct_id)
        self.artifact = artifact
        self.asset: s3_assets.Asset | None = None
        if artifact.kind == "asset":
            self.asset = s3_assets.Asset(self, "Archive", path=str(artifact.path))
            self.bucket_name = self.asset.s3_bucket_name
            self.object_key = self.asset.s3_object_key
        else:
            self.bucket_name = artifact.bucket
            self.object_key = artifact.key
        self.model_data_url = f"s3://{self.bucket_name}/{self.object_key}"
        self.object_arn = f"arn:{Aws.PARTITION}:s3:::{self.bucket_name}/{self.object_key}"

    def read_statement(self) -> iam.PolicyStatement:
        """s3:GetObject on exactly the archive (no bucket listing, no other keys)."""
        return iam.PolicyStatement(sid="ReadModelArchive", actions=["s3:GetObject"], resources=[self.object_arn])
