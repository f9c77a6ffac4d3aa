"""An asynchronous SageMaker endpoint: requests and results in S3, optional SNS notifications."""

from __future__ import annotations

from aws_cdk import aws_kms as kms
from aws_cdk import aws_sagemaker as sagemaker
from aws_cdk import aws_sns as sns
from constructs import Construct

from .endpoint import CONTAINER_STARTUP_TIMEOUT_S, MODEL_DATA_DOWNLOAD_TIMEOUT_S, endpoint_name_for


class AsyncEndpoint(Construct):
    """``endpoint_config``, ``endpoint``, ``endpoint_name``, ``variant_name``, ``log_group_name``,
    ``success_topic``/``error_topic`` (None without notifications), ``output_s3_uri``, ``failure_s3_uri``.

    The endpoint starts with one instance (SageMaker requires it); ``BacklogAutoscaling`` takes it to zero.
    """

    def __init__(self, scope: Construct, construct_id: str, *, model_name: str, instance_type: str,
                 volume_key: kms.IKey | None, output_key: kms.IKey, output_bucket_name: str,
                 notifications: bool, max_concurrent_invocations_per_instance: int = 4,
                 variant_name: str = "AllTraffic") -> None:
        super().__init__(scope, construct_id)
        self.variant_name = variant_name
        self.endpoint_name = endpoint_name_for(self)
        self.log_group_name = f"/aws/sagemaker/Endpoints/{self.endpoint_name}"
        self.output_s3_uri = f"s3://{output_bucket_name}/async/results/"
        self.failure_s3_uri = f"s3://{output_bucket_name}/async/failures/"

        self.success_topic: sns.Topic | None = None
        self.error_topic: sns.Topic | None = None
        notification = None
        if notifications:
            self.success_topic = sns.Topic(self, "Success", master_key=output_key, enforce_ssl=True,
                                           display_name="jina-v3 async inference succeeded")
            self.error_topic = sns.Topic(self, "Error", master_key=output_key, enforce_ssl=True,
                                         display_name="jina-v3 async inference failed")
            notification = sagemaker.CfnEndpointConfig.AsyncInferenceNotificationConfigProperty(
                success_topic=self.success_topic.topic_arn, error_topic=self.error_topic.topic_arn,
                include_inference_response_in=["SUCCESS_NOTIFICATION_TOPIC"])

        self.endpoint_config = sagemaker.CfnEndpointConfig(
            self, "Config",
            kms_key_id=volume_key.key_arn if volume_key else None,
            async_inference_config=sagemaker.CfnEndpointConfig.AsyncInferenceConfigProperty(
                output_config=sagemaker.CfnEndpointConfig.AsyncInferenceOutputConfigProperty(
                    s3_output_path=self.output_s3_uri, s3_failure_path=self.failure_s3_uri,
                    kms_key_id=output_key.key_arn, notification_config=notification),
                client_config=sagemaker.CfnEndpointConfig.AsyncInferenceClientConfigProperty(
                    max_concurrent_invocations_per_instance=max_concurrent_invocations_per_instance)),
            production_variants=[sagemaker.CfnEndpointConfig.ProductionVariantProperty(
                variant_name=variant_name, model_name=model_name, instance_type=instance_type,
                initial_instance_count=1, initial_variant_weight=1.0,
                model_data_download_timeout_in_seconds=MODEL_DATA_DOWNLOAD_TIMEOUT_S,
                container_startup_health_check_timeout_in_seconds=CONTAINER_STARTUP_TIMEOUT_S)],
        )
        self.endpoint = sagemaker.CfnEndpoint(
            self, "Endpoint", endpoint_name=self.endpoint_name,
            endpoint_config_name=self.endpoint_config.attr_endpoint_config_name)
