"""A real-time SageMaker endpoint: endpoint config (one variant) and endpoint."""

from __future__ import annotations

from aws_cdk import Names
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sagemaker as sagemaker
from constructs import Construct

# A 570M-parameter model in a ~2 GB archive with vendored wheels: download, unpack, load, warm up.
MODEL_DATA_DOWNLOAD_TIMEOUT_S = 1200
CONTAINER_STARTUP_TIMEOUT_S = 900


def endpoint_name_for(scope: Construct) -> str:
    """A generated, stable endpoint name (stack path + hash), known at synth so the role can name its log group."""
    return Names.unique_resource_name(scope, max_length=63, separator="-")


class RealtimeEndpoint(Construct):
    """``endpoint_config``, ``endpoint``, ``endpoint_name``, ``variant_name``, ``log_group_name``."""

    def __init__(self, scope: Construct, construct_id: str, *, model_name: str, instance_type: str,
                 instance_count: int, volume_key: kms.IKey | None, variant_name: str = "AllTraffic",
                 capture_s3_uri: str | None = None, capture_percent: int = 0,
                 capture_key: kms.IKey | None = None) -> None:
        super().__init__(scope, construct_id)
        self.variant_name = variant_name
        self.endpoint_name = endpoint_name_for(self)
        self.log_group_name = f"/aws/sagemaker/Endpoints/{self.endpoint_name}"

        data_capture = None
        if capture_percent:
            data_capture = sagemaker.CfnEndpointConfig.DataCaptureConfigProperty(
                enable_capture=True, initial_sampling_percentage=capture_percent,
                destination_s3_uri=capture_s3_uri,
                kms_key_id=capture_key.key_arn if capture_key else None,
                capture_options=[sagemaker.CfnEndpointConfig.CaptureOptionProperty(capture_mode="Input"),
                                 sagemaker.CfnEndpointConfig.CaptureOptionProperty(capture_mode="Output")],
                capture_content_type_header=sagemaker.CfnEndpointConfig.CaptureContentTypeHeaderProperty(
                    json_content_types=["application/json", "application/jsonlines"],
                    csv_content_types=["text/csv"]))

        self.endpoint_config = sagemaker.CfnEndpointConfig(
            self, "Config",
            kms_key_id=volume_key.key_arn if volume_key else None,
            data_capture_config=data_capture,
            production_variants=[sagemaker.CfnEndpointConfig.ProductionVariantProperty(
                variant_name=variant_name, model_name=model_name,
                instance_type=instance_type, initial_instance_count=instance_count,
                initial_variant_weight=1.0,
                model_data_download_timeout_in_seconds=MODEL_DATA_DOWNLOAD_TIMEOUT_S,
                container_startup_health_check_timeout_in_seconds=CONTAINER_STARTUP_TIMEOUT_S)],
        )
        self.endpoint = sagemaker.CfnEndpoint(
            self, "Endpoint", endpoint_name=self.endpoint_name,
            endpoint_config_name=self.endpoint_config.attr_endpoint_config_name)
