"""The async stack: the same model behind an asynchronous endpoint that scales to zero."""

from __future__ import annotations

from aws_cdk import Annotations, CfnOutput, Duration, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from ..components.artifact import ModelArtifactSource
from ..components.async_endpoint import AsyncEndpoint
from ..components.autoscaling import BacklogAutoscaling
from ..components.image import ContainerImage
from ..components.model import EmbeddingModel
from ..components.monitoring import EndpointMonitoring
from ..components.storage import AccessLogBucket, SecureBucket
from ..config import DeploySettings
from . import nag
from .grants import allow_cloudwatch_alarms, grant_key_use, grant_logs

REQUESTS_PREFIX = "async/requests/"


class AsyncEmbeddingStack(Stack):
    """Self-contained (own key, role, bucket), so it deploys and is destroyed independently of the main stack.

    Attributes: ``key``, ``artifact``, ``image``, ``model``, ``bucket``, ``endpoint``, ``autoscaling``, ``monitoring``.
    """

    def __init__(self, scope: Construct, construct_id: str, *, settings: DeploySettings, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        s = settings
        if s.artifact.is_placeholder:
            Annotations.of(self).add_warning_v2("jv3:placeholder-artifact",
                                                "JV3_MODEL_ARTIFACT is not set: fine for synth, not for deploy")
        self.key = kms.Key(self, "Key", enable_key_rotation=True, removal_policy=RemovalPolicy.RETAIN,
                           description="jina-v3 async: requests, results, topics, endpoint volume")
        allow_cloudwatch_alarms(self.key)
        self.artifact = ModelArtifactSource(self, "Artifact", artifact=s.artifact)
        self.image = ContainerImage(self, "Image", settings=s)  # JV3_RUNTIME, as in the main stack
        self.model = EmbeddingModel(
            self, "Model", image_uri=self.image.image_uri,
            model_data_url=self.artifact.model_data_url, environment=s.container_environment("async"),
            subnet_ids=s.subnet_ids, security_group_ids=s.security_group_ids, network_isolation=s.network_isolation)
        access_logs = AccessLogBucket(self, "AccessLogs").bucket
        self.bucket = SecureBucket(
            self, "Data", key=self.key, access_logs=access_logs, log_prefix="async",
            extra_rules=[s3.LifecycleRule(id="expire-requests", prefix=REQUESTS_PREFIX,
                                          expiration=Duration.days(7))],
            expiration=Duration.days(30), infrequent_access_after_days=None).bucket
        self.endpoint = AsyncEndpoint(
            self, "Async", model_name=self.model.model_name, instance_type=s.instance_type,
            volume_key=self.key if s.volume_kms_supported else None, output_key=self.key,
            output_bucket_name=self.bucket.bucket_name, notifications=s.async_notifications)
        self.autoscaling = BacklogAutoscaling(
            self, "Autoscaling", endpoint_name=self.endpoint.endpoint.attr_endpoint_name,
            variant_name=self.endpoint.variant_name, max_capacity=s.async_max_instances)
        self.monitoring = EndpointMonitoring(
            self, "Monitoring", endpoint_name=self.endpoint.endpoint.attr_endpoint_name,
            variant_name=self.endpoint.variant_name, topic_key=self.key, gpu=s.is_gpu,
            latency_p99_ms=s.latency_p99_ms * 30, alarm_email=s.alarm_email)

        model = self.model
        self.image.grant_pull(model)
        model.add_to_policy(self.artifact.read_statement())
        grant_logs(model, self.endpoint.log_group_name)
        grant_key_use(model, self.key)
        model.add_to_policy(iam.PolicyStatement(
            sid="ReadRequests", actions=["s3:GetObject"],
            resources=[self.bucket.arn_for_objects(f"{REQUESTS_PREFIX}*")]))
        model.add_to_policy(iam.PolicyStatement(
            sid="WriteResults", actions=["s3:AbortMultipartUpload", "s3:PutObject"],
            resources=[self.bucket.arn_for_objects("async/results/*"),
                       self.bucket.arn_for_objects("async/failures/*")]))
        topics = [t for t in (self.endpoint.success_topic, self.endpoint.error_topic) if t is not None]
        if topics:
            model.add_to_policy(iam.PolicyStatement(
                sid="Notify", actions=["sns:Publish"], resources=[t.topic_arn for t in topics]))

        outputs = {
            "AsyncEndpointName": (self.endpoint.endpoint.attr_endpoint_name, "endpoint for invoke_endpoint_async"),
            "AsyncModelName": (self.model.model_name, "model behind the async endpoint"),
            "AsyncBucket": (self.bucket.bucket_name, "bucket of async requests and results"),
            "AsyncInputPrefix": (f"s3://{self.bucket.bucket_name}/{REQUESTS_PREFIX}",
                                 "upload request bodies here, pass the object URI as InputLocation"),
            "AsyncOutputPath": (self.endpoint.output_s3_uri, "where results land"),
            "AsyncFailurePath": (self.endpoint.failure_s3_uri, "where failures land"),
            "KmsKeyArn": (self.key.key_arn, "key of the async bucket and topics"),
            "AlarmTopicArn": (self.monitoring.alarm_topic.topic_arn, "SNS topic of the async endpoint alarms"),
        }
        if self.endpoint.success_topic is not None and self.endpoint.error_topic is not None:
            outputs["AsyncSuccessTopicArn"] = (self.endpoint.success_topic.topic_arn, "SNS topic: result ready")
            outputs["AsyncErrorTopicArn"] = (self.endpoint.error_topic.topic_arn, "SNS topic: request failed")
        for name, (value, description) in outputs.items():
            CfnOutput(self, name, value=value, description=description)

        nag.acknowledge_wildcards(model.policy)
        nag.acknowledge_image_pull_grant(model, self.image)
        nag.acknowledge_access_log_bucket(access_logs)
        nag.acknowledge_data_buckets([self.bucket])
        if not s.volume_kms_supported:
            nag.acknowledge_instance_storage(self.endpoint.endpoint_config, s.instance_type)
