"""The container image of the models: the AWS PyTorch inference DLC, or the repository's Dockerfile (byoc).

``ContainerImage`` exposes ``image_uri`` and ``grant_pull(model)``; the stacks create one per stack and
hand it to every model they make, so the real-time, batch and async models always run the same image.
"""

from __future__ import annotations

from pathlib import Path

from aws_cdk import Aws, IgnoreMode
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_iam as iam
from constructs import Construct

from ..config import BYOC_CONTEXT_EXCLUDE, BYOC_DOCKERFILE, IMAGE_REPOSITORY, DeploySettings
from .model import EmbeddingModel

# The Docker build context of byoc: the repository root (infra/'s parent), of which the asset stages and
# hashes only the paths BYOC_CONTEXT_EXCLUDE lets through (the Dockerfile and inference/).
REPO_ROOT = Path(__file__).resolve().parents[2]


class ContainerImage(Construct):
    """``runtime``, ``image_uri``, ``asset`` (the DockerImageAsset on byoc, else None), ``grant_pull``.

    byoc: CDK builds ``Dockerfile`` for linux/amd64 and pushes it to its bootstrap ECR repository at
    deploy (``cdk deploy`` needs Docker then); synthesis only stages the build context into cdk.out.
    dlc: the pinned DLC image in AWS's regional registry account.
    """

    def __init__(self, scope: Construct, construct_id: str, *, settings: DeploySettings,
                 directory: Path = REPO_ROOT) -> None:
        super().__init__(scope, construct_id)
        self.runtime = settings.runtime
        self.asset: ecr_assets.DockerImageAsset | None = None
        if settings.is_byoc:
            self.asset = ecr_assets.DockerImageAsset(
                self, "Asset", directory=str(directory), file=BYOC_DOCKERFILE,
                platform=ecr_assets.Platform.LINUX_AMD64, exclude=list(BYOC_CONTEXT_EXCLUDE),
                ignore_mode=IgnoreMode.DOCKER, build_args=settings.byoc_build_args or None,
                display_name="jina-embeddings-v3 BYOC server")
            self.image_uri = self.asset.image_uri
            self.repository_arn = self.asset.repository.repository_arn
        else:
            self.image_uri = settings.dlc_image_uri
            self.repository_arn = (f"arn:{Aws.PARTITION}:ecr:{Aws.REGION}:{settings.dlc_account}:"
                                   f"repository/{IMAGE_REPOSITORY}")

    def grant_pull(self, model: EmbeddingModel) -> None:
        """Let ``model``'s execution role pull this image (and nothing else from ECR)."""
        if self.asset is not None:
            # CDK's grant on the bootstrap asset repository: pull actions on that repository and
            # ecr:GetAuthorizationToken (no resource-level permissions), in the role's default policy.
            self.asset.repository.grant_pull(model.role)
            return
        model.add_to_policy(iam.PolicyStatement(
            sid="PullDlcImage",
            actions=["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
            resources=[self.repository_arn]))
        model.add_to_policy(iam.PolicyStatement(
            sid="EcrLogin", actions=["ecr:GetAuthorizationToken"], resources=["*"]))

