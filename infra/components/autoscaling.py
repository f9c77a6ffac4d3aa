"""Application Auto Scaling for SageMaker variants: real-time target tracking and async scale-to-zero."""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_applicationautoscaling as appscaling
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_iam as iam
from constructs import Construct

SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
# Out fast (a new GPU instance takes minutes to come up), in slowly (avoid flapping on bursty traffic).
SCALE_OUT_COOLDOWN = Duration.minutes(5)
SCALE_IN_COOLDOWN = Duration.minutes(15)


SERVICE_LINKED_ROLE = ("aws-service-role/sagemaker.application-autoscaling.amazonaws.com/"
                       "AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint")


def _variant_target(scope: Construct, *, endpoint_name: str, variant_name: str,
                    min_capacity: int, max_capacity: int) -> appscaling.ScalableTarget:
    # Application Auto Scaling acts through its SageMaker service-linked role, which it creates on first
    # registration when RoleARN is left out; naming it here only stops CDK from making an empty role.
    linked_role = iam.Role.from_role_name(scope, "ServiceLinkedRole", SERVICE_LINKED_ROLE)
    target = appscaling.ScalableTarget(
        scope, "Target", service_namespace=appscaling.ServiceNamespace.SAGEMAKER,
        resource_id=f"endpoint/{endpoint_name}/variant/{variant_name}", role=linked_role,
        scalable_dimension=SCALABLE_DIMENSION, min_capacity=min_capacity, max_capacity=max_capacity)
    target.node.default_child.add_property_deletion_override("RoleARN")
    return target


class VariantAutoscaling(Construct):
    """Target tracking on invocations per instance and on accelerator (or CPU) utilisation.

    ``target``, ``invocations_policy``, ``utilization_policy``. Application Auto Scaling follows the
    policy asking for the most instances; ``disable_scale_in`` keeps both from removing any.
    """

    def __init__(self, scope: Construct, construct_id: str, *, endpoint_name: str, variant_name: str,
                 min_capacity: int, max_capacity: int, invocations_per_instance: int,
                 utilization_metric: str, utilization_target: float, disable_scale_in: bool = False) -> None:
        super().__init__(scope, construct_id)
        self.target = _variant_target(self, endpoint_name=endpoint_name, variant_name=variant_name,
                                      min_capacity=min_capacity, max_capacity=max_capacity)
        self.invocations_policy = self.target.scale_to_track_metric(
            "Invocations", target_value=invocations_per_instance,
            predefined_metric=appscaling.PredefinedMetric.SAGEMAKER_VARIANT_INVOCATIONS_PER_INSTANCE,
            scale_in_cooldown=SCALE_IN_COOLDOWN, scale_out_cooldown=SCALE_OUT_COOLDOWN,
            disable_scale_in=disable_scale_in)
        # Instance metrics live in /aws/sagemaker/Endpoints; GPUUtilization sums over the instance's GPUs.
        self.utilization_metric = cloudwatch.Metric(
            namespace="/aws/sagemaker/Endpoints", metric_name=utilization_metric,
            dimensions_map={"EndpointName": endpoint_name, "VariantName": variant_name},
            statistic="Average", period=Duration.minutes(1))
        self.utilization_policy = self.target.scale_to_track_metric(
            utilization_metric, target_value=utilization_target, custom_metric=self.utilization_metric,
            scale_in_cooldown=SCALE_IN_COOLDOWN, scale_out_cooldown=SCALE_OUT_COOLDOWN,
            disable_scale_in=disable_scale_in)


class BacklogAutoscaling(Construct):
    """Scale an async endpoint between 0 and ``max_capacity`` on its request backlog (AWS's recipe).

    Target tracking on ``ApproximateBacklogSizePerInstance`` adds and removes instances, down to zero;
    from zero that metric has no instances to divide by, so a step policy driven by
    ``HasBacklogWithoutCapacity`` adds the first instance. ``target``, ``backlog_policy``,
    ``wake_up_action``, ``wake_up_alarm``.
    """

    def __init__(self, scope: Construct, construct_id: str, *, endpoint_name: str, variant_name: str,
                 max_capacity: int, backlog_per_instance: float = 5.0) -> None:
        super().__init__(scope, construct_id)
        self.target = _variant_target(self, endpoint_name=endpoint_name, variant_name=variant_name,
                                      min_capacity=0, max_capacity=max_capacity)
        backlog = cloudwatch.Metric(namespace="AWS/SageMaker", metric_name="ApproximateBacklogSizePerInstance",
                                    dimensions_map={"EndpointName": endpoint_name},
                                    statistic="Average", period=Duration.minutes(1))
        self.backlog_policy = self.target.scale_to_track_metric(
            "Backlog", target_value=backlog_per_instance, custom_metric=backlog,
            scale_in_cooldown=Duration.minutes(10), scale_out_cooldown=SCALE_OUT_COOLDOWN)

        self.wake_up_action = appscaling.StepScalingAction(
            self, "WakeUp", scaling_target=self.target,
            adjustment_type=appscaling.AdjustmentType.CHANGE_IN_CAPACITY,
            metric_aggregation_type=appscaling.MetricAggregationType.AVERAGE,
            cooldown=SCALE_OUT_COOLDOWN)
        self.wake_up_action.add_adjustment(adjustment=1, lower_bound=0)
        self.wake_up_alarm = cloudwatch.Alarm(
            self, "HasBacklogWithoutCapacity",
            alarm_description="Requests are queued while the async endpoint has no instance: add one",
            metric=cloudwatch.Metric(namespace="AWS/SageMaker", metric_name="HasBacklogWithoutCapacity",
                                     dimensions_map={"EndpointName": endpoint_name},
                                     statistic="Average", period=Duration.minutes(1)),
            threshold=1, evaluation_periods=2, datapoints_to_alarm=2,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.MISSING)
        self.wake_up_alarm.add_alarm_action(cw_actions.ApplicationScalingAction(self.wake_up_action))
