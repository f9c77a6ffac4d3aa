"""Alarms (to an SNS topic) and a dashboard for one SageMaker endpoint variant."""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from constructs import Construct

INVOCATION_NAMESPACE = "AWS/SageMaker"
INSTANCE_NAMESPACE = "/aws/sagemaker/Endpoints"


class EndpointMonitoring(Construct):
    """``alarm_topic``, ``alarms`` (name → Alarm), ``dashboard``.

    Alarms: client error rate (4XX), server error rate (5XX), ModelLatency p99, and health: memory,
    disk, and on GPU instances GPU memory. Every alarm notifies ``alarm_topic`` on ALARM and OK.
    """

    def __init__(self, scope: Construct, construct_id: str, *, endpoint_name: str, variant_name: str,
                 topic_key: kms.IKey, gpu: bool, latency_p99_ms: int, alarm_email: str = "",
                 client_error_percent: float = 5.0, server_error_percent: float = 1.0) -> None:
        super().__init__(scope, construct_id)
        dims = {"EndpointName": endpoint_name, "VariantName": variant_name}
        period = Duration.minutes(1)

        def invocation(name: str, statistic: str = "Sum") -> cloudwatch.Metric:
            return cloudwatch.Metric(namespace=INVOCATION_NAMESPACE, metric_name=name, dimensions_map=dims,
                                     statistic=statistic, period=period)

        def instance(name: str, statistic: str = "Average") -> cloudwatch.Metric:
            return cloudwatch.Metric(namespace=INSTANCE_NAMESPACE, metric_name=name, dimensions_map=dims,
                                     statistic=statistic, period=period)

        self.alarm_topic = sns.Topic(self, "AlarmTopic", master_key=topic_key, enforce_ssl=True,
                                     display_name="jina-v3 endpoint alarms")
        if alarm_email:
            self.alarm_topic.add_subscription(subscriptions.EmailSubscription(alarm_email))
        action = cw_actions.SnsAction(self.alarm_topic)

        invocations = invocation("Invocations")

        def error_rate(metric_name: str) -> cloudwatch.MathExpression:
            # No traffic is no error: IF keeps the rate at 0 when nothing was invoked.
            return cloudwatch.MathExpression(
                expression="IF(inv > 0, 100 * FILL(err, 0) / inv, 0)",
                using_metrics={"inv": invocations, "err": invocation(metric_name)},
                label=f"{metric_name} %", period=Duration.minutes(5))

        specs: list[tuple[str, cloudwatch.IMetric, float, int, str]] = [
            ("ClientErrors", error_rate("Invocation4XXErrors"), client_error_percent, 3,
             f"More than {client_error_percent}% of requests rejected as client errors (4XX)"),
            ("ServerErrors", error_rate("Invocation5XXErrors"), server_error_percent, 2,
             f"More than {server_error_percent}% of requests failed in the model (5XX)"),
            ("LatencyP99", invocation("ModelLatency", "p99").with_(period=Duration.minutes(5)),
             latency_p99_ms * 1000, 3,  # ModelLatency is in microseconds
             f"ModelLatency p99 above {latency_p99_ms} ms"),
            ("MemoryHigh", instance("MemoryUtilization").with_(period=Duration.minutes(5)), 90, 3,
             "Host memory above 90%"),
            ("DiskHigh", instance("DiskUtilization").with_(period=Duration.minutes(5)), 85, 3,
             "Disk above 85%"),
        ]
        if gpu:
            specs.append(("GpuMemoryHigh", instance("GPUMemoryUtilization").with_(period=Duration.minutes(5)), 95, 3,
                          "GPU memory above 95%: lower JV3_MAX_BATCH_TOKENS or JV3_TASKS"))

        self.alarms: dict[str, cloudwatch.Alarm] = {}
        for name, metric, threshold, periods, description in specs:
            alarm = cloudwatch.Alarm(
                self, name, metric=metric, threshold=threshold, evaluation_periods=periods,
                datapoints_to_alarm=periods, alarm_description=f"{endpoint_name}: {description}",
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING)
            alarm.add_alarm_action(action)
            alarm.add_ok_action(action)
            self.alarms[name] = alarm

        utilisation = "GPUUtilization" if gpu else "CPUUtilization"
        self.dashboard = cloudwatch.Dashboard(self, "Dashboard", default_interval=Duration.hours(3))
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(title="Invocations and errors", width=12, left=[
                invocations, invocation("Invocation4XXErrors"), invocation("Invocation5XXErrors")]),
            cloudwatch.GraphWidget(title="Latency (ms)", width=12, left=[
                cloudwatch.MathExpression(expression=f"{var} / 1000", using_metrics={var: invocation(name, stat)},
                                          label=f"{name} {stat}")
                for var, name, stat in (("model50", "ModelLatency", "p50"), ("model99", "ModelLatency", "p99"),
                                        ("overhead99", "OverheadLatency", "p99"))]),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(title=f"{utilisation} and memory (%)", width=12, left=[
                instance(utilisation), instance("GPUMemoryUtilization") if gpu else instance("MemoryUtilization"),
                instance("CPUUtilization") if gpu else instance("DiskUtilization")]),
            # Every instance reports CPUUtilization once a minute, so the per-minute sample count is the
            # number of instances in service.
            cloudwatch.GraphWidget(title="Instances in service", width=12, left=[
                instance("CPUUtilization", "SampleCount").with_(label="instances")]),
        )
        self.dashboard.add_widgets(cloudwatch.AlarmStatusWidget(
            title="Alarms", width=24, alarms=list(self.alarms.values())))
