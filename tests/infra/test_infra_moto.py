"""The synthesised SageMaker and Application Auto Scaling properties, sent through boto3 to moto.

botocore validates every parameter name and type against the real API models, so a property CDK
accepted but SageMaker would not (wrong casing, wrong nesting) fails here without an AWS account.
"""

from __future__ import annotations

import copy

import boto3
import pytest
from infra_support import only, resources

moto = pytest.importorskip("moto")
REGION = "us-east-1"
# moto 5 rejects ml.g5 instance types in create_endpoint_config; the property shapes are what is tested.
MOTO_INSTANCE = "ml.m5.xlarge"


@pytest.fixture
def aws(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(name, value)
    with moto.mock_aws():
        yield


def _concrete(value, replacements):
    """Replace CloudFormation intrinsics with plausible literals (what CloudFormation would pass)."""
    if isinstance(value, dict):
        if len(value) == 1 and next(iter(value)).startswith(("Fn::", "Ref")):
            return replacements.get(next(iter(value)), "arn:aws:kms:us-east-1:123456789012:key/abc")
        return {k: _concrete(v, replacements) for k, v in value.items()}
    if isinstance(value, list):
        return [_concrete(v, replacements) for v in value]
    return value


def test_model_endpoint_config_and_endpoint_are_valid_sagemaker_calls(aws, full_template, async_template):
    sm = boto3.client("sagemaker", region_name=REGION)
    iam = boto3.client("iam", region_name=REGION)
    role_arn = iam.create_role(RoleName="jv3", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    for index, template in enumerate((full_template, async_template)):
        model_props = _concrete(next(iter(resources(template, "AWS::SageMaker::Model").values()))["Properties"], {})
        container = model_props["PrimaryContainer"]
        container["ModelDataUrl"] = "s3://bucket/model.tar.gz"
        name = f"jv3-{index}"
        sm.create_model(ModelName=name, ExecutionRoleArn=role_arn, PrimaryContainer=container,
                        VpcConfig=model_props["VpcConfig"],
                        EnableNetworkIsolation=model_props["EnableNetworkIsolation"])
        config = copy.deepcopy(only(template, "AWS::SageMaker::EndpointConfig")["Properties"])
        config.pop("Tags", None)
        config = _concrete(config, {})
        for variant in config["ProductionVariants"]:
            variant.update(ModelName=name, InstanceType=MOTO_INSTANCE)
        if "AsyncInferenceConfig" in config:
            output = config["AsyncInferenceConfig"]["OutputConfig"]
            output["S3OutputPath"], output["S3FailurePath"] = "s3://b/async/results/", "s3://b/async/failures/"
            notification = output.get("NotificationConfig", {})
            for key in ("SuccessTopic", "ErrorTopic"):
                if key in notification:
                    notification[key] = f"arn:aws:sns:us-east-1:123456789012:{key}"
        if "DataCaptureConfig" in config:
            config["DataCaptureConfig"]["DestinationS3Uri"] = "s3://b/capture/"
        sm.create_endpoint_config(EndpointConfigName=f"{name}-config", **config)
        sm.create_endpoint(EndpointName=f"{name}-endpoint", EndpointConfigName=f"{name}-config")
        described = sm.describe_endpoint_config(EndpointConfigName=f"{name}-config")
        assert described["ProductionVariants"][0]["ModelName"] == name
    assert len(sm.list_endpoints()["Endpoints"]) == 2


def test_scaling_policies_are_valid_application_autoscaling_calls(aws, default_template, async_template):
    client = boto3.client("application-autoscaling", region_name=REGION)
    for template in (default_template, async_template):
        target = only(template, "AWS::ApplicationAutoScaling::ScalableTarget")["Properties"]
        resource_id = "endpoint/jv3/variant/AllTraffic"
        client.register_scalable_target(ServiceNamespace=target["ServiceNamespace"], ResourceId=resource_id,
                                        ScalableDimension=target["ScalableDimension"],
                                        MinCapacity=target["MinCapacity"], MaxCapacity=target["MaxCapacity"])
        for logical_id, policy in resources(template, "AWS::ApplicationAutoScaling::ScalingPolicy").items():
            props = _concrete(policy["Properties"], {})
            kwargs = {k: props[k] for k in ("TargetTrackingScalingPolicyConfiguration",
                                             "StepScalingPolicyConfiguration") if k in props}
            for spec in kwargs.get("TargetTrackingScalingPolicyConfiguration", {}).get(
                    "CustomizedMetricSpecification", {}).get("Dimensions", []):
                spec["Value"] = "jv3" if spec["Name"] == "EndpointName" else "AllTraffic"
            client.put_scaling_policy(PolicyName=logical_id, ServiceNamespace="sagemaker", ResourceId=resource_id,
                                      ScalableDimension=target["ScalableDimension"], PolicyType=props["PolicyType"],
                                      **kwargs)
        policies = client.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
        assert {p["PolicyType"] for p in policies} >= {"TargetTrackingScaling"}
        client.deregister_scalable_target(ServiceNamespace="sagemaker", ResourceId=resource_id,
                                          ScalableDimension=target["ScalableDimension"])
