"""The main stack: model, real-time endpoint with autoscaling and alarms, batch-transform buckets and model."""

from __future__ import annotations

from aws_cdk import Annotations, CfnOutput, Duration, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

from ..components.artifact import ModelArtifactSource
from ..components.autoscaling import VariantAutoscaling
from ..components.batch import BatchTransformStorage
from ..components.endpoint import RealtimeEndpoint
from ..components.image import ContainerImage
from ..components.model import EmbeddingModel
from ..components.monitoring import EndpointMonitoring
from ..components.storage import AccessLogBucket, SecureBucket
from ..config import PLACEHOLDER_ARTIFACT, DeploySettings
from . import nag
from .grants import allow_cloudwatch_alarms, grant_key_use, grant_logs

TRANSFORM_LOG_GROUP = "/aws/sagemaker/TransformJobs"


class EmbeddingStack(Stack):
    """Attributes: ``key``, ``artifact``, ``image``, ``model``, ``endpoint``, ``autoscaling``, ``access_logs``,
    ``capture_bucket`` (None when capture is off), ``batch``, ``batch_model``, ``monitoring``."""

    def __init__(self, scope: Construct, construct_id: str, *, settings: DeploySettings, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        s = settings
        if s.artifact.is_placeholder:
            Annotations.of(self).add_warning_v2(
                "jv3:placeholder-artifact",
                f"JV3_MODEL_ARTIFACT is not set: the models point at {PLACEHOLDER_ARTIFACT}, fine for synth, "
                "not for deploy")

        # --- encryption and the archive ------------------------------------------------------------
        self.key = kms.Key(self, "Key", enable_key_rotation=True, removal_policy=RemovalPolicy.RETAIN,
                           description="jina-v3: endpoint volumes, batch buckets, captures, alarm topic")
        allow_cloudwatch_alarms(self.key)
        self.artifact = ModelArtifactSource(self, "Artifact", artifact=s.artifact)
        self.image = ContainerImage(self, "Image", settings=s)  # JV3_RUNTIME: one image for both models
        model_props = dict(
            image_uri=self.image.image_uri,
            model_data_url=self.artifact.model_data_url, subnet_ids=s.subnet_ids,
            security_group_ids=s.security_group_ids, network_isolation=s.network_isolation)

        # --- real-time -----------------------------------------------------------------------------
        self.model = EmbeddingModel(self, "Model", environment=s.container_environment("realtime"), **model_props)
        self.access_logs = AccessLogBucket(self, "AccessLogs").bucket
        self.capture_bucket = None
        capture_uri = None
        if s.data_capture_percent:
            self.capture_bucket = SecureBucket(self, "Capture", key=self.key, access_logs=self.access_logs,
                                               log_prefix="capture", expiration=Duration.days(30)).bucket
            capture_uri = f"s3://{self.capture_bucket.bucket_name}/capture/"
        self.endpoint = RealtimeEndpoint(
            self, "Realtime", model_name=self.model.model_name, instance_type=s.instance_type,
            instance_count=s.instance_count, volume_key=self.key if s.volume_kms_supported else None,
            capture_s3_uri=capture_uri, capture_percent=s.data_capture_percent, capture_key=self.key)
        self.autoscaling = VariantAutoscaling(
            self, "Autoscaling", endpoint_name=self.endpoint.endpoint.attr_endpoint_name,
            variant_name=self.endpoint.variant_name, min_capacity=s.min_instances, max_capacity=s.max_instances,
            invocations_per_instance=s.invocations_per_instance,
            utilization_metric="GPUUtilization" if s.is_gpu else "CPUUtilization",
            # GPUUtilization is 0-100 per GPU, summed over the instance's GPUs
            utilization_target=s.gpu_utilization * max(s.gpu_count, 1) if s.is_gpu else s.gpu_utilization,
            disable_scale_in=s.disable_scale_in)

        # --- batch transform -----------------------------------------------------------------------
        self.batch = BatchTransformStorage(self, "Batch", key=self.key, access_logs=self.access_logs)
        self.batch_model = EmbeddingModel(self, "BatchModel", environment=s.container_environment("batch"),
                                          **model_props)

        # --- operations ----------------------------------------------------------------------------
        self.monitoring = EndpointMonitoring(
            self, "Monitoring", endpoint_name=self.endpoint.endpoint.attr_endpoint_name,
            variant_name=self.endpoint.variant_name, topic_key=self.key, gpu=s.is_gpu,
            latency_p99_ms=s.latency_p99_ms, alarm_email=s.alarm_email)

        # --- grants --------------------------------------------------------------------------------
        realtime, batch = self.model, self.batch_model
        for model in (realtime, batch):
            self.image.grant_pull(model)
            model.add_to_policy(self.artifact.read_statement())
        grant_logs(realtime, self.endpoint.log_group_name)
        grant_logs(batch, TRANSFORM_LOG_GROUP)
        if self.capture_bucket is not None:
            realtime.add_to_policy(iam.PolicyStatement(
                sid="WriteCaptures", actions=["s3:PutObject"],
                resources=[self.capture_bucket.arn_for_objects("capture/*")]))
            grant_key_use(realtime, self.key)
        batch.add_to_policy(iam.PolicyStatement(
            sid="ListCorpora", actions=["s3:ListBucket"], resources=[self.batch.input_bucket.bucket_arn]))
        batch.add_to_policy(iam.PolicyStatement(
            sid="ReadCorpora", actions=["s3:GetObject"], resources=[self.batch.input_bucket.arn_for_objects("*")]))
        batch.add_to_policy(iam.PolicyStatement(
            sid="WriteEmbeddings", actions=["s3:AbortMultipartUpload", "s3:PutObject"],
            resources=[self.batch.output_bucket.arn_for_objects("*")]))
        grant_key_use(batch, self.key)

        # --- outputs (the client reads them with cloudformation describe-stacks) -------------------
        outputs = {
            "EndpointName": (self.endpoint.endpoint.attr_endpoint_name, "real-time endpoint for invoke_endpoint"),
            "VariantName": (self.endpoint.variant_name, "production variant of the endpoint"),
            "ModelName": (self.model.model_name, "model behind the real-time endpoint"),
            "BatchModelName": (self.batch_model.model_name, "model to name in CreateTransformJob"),
            "BatchInputBucket": (self.batch.input_bucket.bucket_name, "bucket for transform-job corpora"),
            "BatchOutputBucket": (self.batch.output_bucket.bucket_name, "bucket for transform-job embeddings"),
            "TransformRoleArn": (batch.role.role_arn,
                                 "execution role of BatchModelName: reads BatchInputBucket, writes BatchOutputBucket"),
            "KmsKeyArn": (self.key.key_arn, "key for TransformOutput.KmsKeyId and objects in the buckets"),
            "AlarmTopicArn": (self.monitoring.alarm_topic.topic_arn, "SNS topic of the endpoint alarms"),
            "DashboardName": (self.monitoring.dashboard.dashboard_name, "CloudWatch dashboard of the endpoint"),
            "ImageUri": (self.image.image_uri, f"container image of both models (JV3_RUNTIME={s.runtime})"),
            "ModelDataUrl": (self.artifact.model_data_url, "model.tar.gz both models load"),
        }
        if self.capture_bucket is not None:
            outputs["CaptureBucket"] = (self.capture_bucket.bucket_name, "data capture destination")
        for name, (value, description) in outputs.items():
            CfnOutput(self, name, value=value, description=description)

        # --- cdk-nag: what remains is explained here -----------------------------------------------
        for model in (realtime, batch):
            nag.acknowledge_wildcards(model.policy)
            nag.acknowledge_image_pull_grant(model, self.image)
        nag.acknowledge_access_log_bucket(self.access_logs)
        nag.acknowledge_data_buckets([b for b in (self.batch.input_bucket, self.batch.output_bucket,
                                                  self.capture_bucket) if b is not None])
        if not s.volume_kms_supported:
            nag.acknowledge_instance_storage(self.endpoint.endpoint_config, s.instance_type)
