"""A SageMaker Model (DLC or BYOC image, see ``ContainerImage``) and its own execution role."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aws_cdk import aws_iam as iam
from aws_cdk import aws_sagemaker as sagemaker
from constructs import Construct

# CloudWatch namespaces SageMaker writes on the container's behalf (endpoint and transform job metrics).
METRIC_NAMESPACES = ("/aws/sagemaker/Endpoints", "/aws/sagemaker/TransformJobs")


class EmbeddingModel(Construct):
    """``role`` (assumed by SageMaker), ``policy`` (its managed policy), ``model`` (CfnModel), ``model_name``.

    The role can publish metrics to the SageMaker namespaces; ``ContainerImage.grant_pull`` lets it pull
    its image, and the stack grants it the archive, its log group, its key and whatever buckets it writes.
    """

    def __init__(self, scope: Construct, construct_id: str, *, image_uri: str, model_data_url: str,
                 environment: Mapping[str, str], subnet_ids: Sequence[str] = (),
                 security_group_ids: Sequence[str] = (), network_isolation: bool = False) -> None:
        super().__init__(scope, construct_id)
        self.role = iam.Role(self, "ExecutionRole", assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
                             description="SageMaker execution role of the jina-embeddings-v3 model")
        # A customer-managed policy rather than an inline one: versioned, reviewable on its own.
        self.policy = iam.ManagedPolicy(self, "Policy", roles=[self.role],
                                        description="What the jina-embeddings-v3 container may touch")
        self.add_to_policy(iam.PolicyStatement(
            sid="PublishMetrics", actions=["cloudwatch:PutMetricData"], resources=["*"],
            conditions={"StringEquals": {"cloudwatch:namespace": list(METRIC_NAMESPACES)}}))

        vpc_config = None
        if subnet_ids:
            vpc_config = sagemaker.CfnModel.VpcConfigProperty(
                subnets=list(subnet_ids), security_group_ids=list(security_group_ids))
            # SageMaker attaches ENIs in the subnets on the role's behalf.
            self.add_to_policy(iam.PolicyStatement(
                sid="VpcNetworkInterfaces",
                actions=["ec2:CreateNetworkInterface", "ec2:CreateNetworkInterfacePermission",
                         "ec2:DeleteNetworkInterface", "ec2:DeleteNetworkInterfacePermission",
                         "ec2:DescribeNetworkInterfaces", "ec2:DescribeVpcs", "ec2:DescribeDhcpOptions",
                         "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups"],
                resources=["*"]))

        self.model = sagemaker.CfnModel(
            self, "Model",
            execution_role_arn=self.role.role_arn,
            primary_container=sagemaker.CfnModel.ContainerDefinitionProperty(
                image=image_uri, model_data_url=model_data_url, mode="SingleModel",
                environment=dict(environment)),
            vpc_config=vpc_config,
            enable_network_isolation=network_isolation,
        )
        # The role's policies must be attached before SageMaker validates the image and the archive: the
        # managed one, and the default policy CDK grants (the byoc image pull) add to the role itself.
        self.model.node.add_dependency(self.policy)
        self.model.node.add_dependency(self.role)
        self.model_name = self.model.attr_model_name

    def add_to_policy(self, statement: iam.PolicyStatement) -> None:
        """Grant the container one more statement (the stack calls this for buckets, keys, logs)."""
        self.policy.add_statements(statement)
