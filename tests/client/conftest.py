"""Fixtures of the client tests: stubbed runtimes, moto credentials and batch buckets, a retry policy
that never sleeps, and (session-wide) the real local endpoint on loopback."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from jv3.retry import RetryPolicy


@pytest.fixture
def aws_env(monkeypatch):
    """Dummy credentials and a region, so no test can reach a real account."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def batch_aws(aws_env):
    """moto's S3, with the buckets jv3-in and jv3-out, and SageMaker: (s3, sagemaker) clients."""
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        for bucket in ("jv3-in", "jv3-out"):
            s3.create_bucket(Bucket=bucket)
        yield s3, boto3.client("sagemaker", region_name="us-east-1")


@pytest.fixture
def runtime(aws_env):
    """A real boto3 sagemaker-runtime client under a Stubber (activated)."""
    client = boto3.client("sagemaker-runtime", region_name="us-east-1")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


class RecordingSleep:
    def __init__(self):
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def retry(sleeps) -> RetryPolicy:
    return RetryPolicy(max_attempts=4, base_delay=0.1, max_delay=1.0, sleep=sleeps)


@pytest.fixture(scope="session")
def local_endpoint():
    """The teammate's real server (python -m inference.serve) on a free loopback port, ready once
    /ping answers. Long texts are truncated at 256 tokens to keep the 6 MB tests quick on a CPU."""
    from client_support import REPO, TINY

    if not (REPO / "inference" / "serve.py").is_file():
        pytest.skip("inference/serve.py is absent: the local endpoint is not written yet")
    from jv3.local import LocalEndpoint

    endpoint = LocalEndpoint(TINY, env={"JV3_MAX_SEQ_LENGTH": "256", "JV3_LOG_LEVEL": "WARNING"}, cwd=REPO)
    with endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def loopback_runtime(local_endpoint):
    """Plain boto3 sagemaker-runtime speaking HTTP to the local endpoint, dummy credentials."""
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=local_endpoint.url,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
