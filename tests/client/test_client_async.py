"""AsyncEmbeddingClient with moto: the request body staged on S3, invoke_endpoint_async, and
polling of the Output/Failure locations the runtime hands back."""

from __future__ import annotations

import json

import boto3
import numpy as np
import pytest
import requests
from client_support import contract
from moto import mock_aws

from jv3 import AsyncEmbeddingClient, AsyncInferenceError, WaitTimeout

RESULTS_API = "http://motoapi.amazonaws.com/moto-api/static/sagemaker/async-endpoint-results"


@pytest.fixture
def aws(aws_env):
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="jv3-async")
        yield s3, boto3.client("sagemaker-runtime", region_name="us-east-1")


def queue_results(*results):
    """What the endpoint will write for the next invocations (moto's documented test hook)."""
    response = requests.post(RESULTS_API, json={"results": list(results)}, timeout=5)
    assert response.status_code == 201


def make(aws, sleeps, **kw):
    s3, runtime = aws
    return AsyncEmbeddingClient(
        "jv3-async", s3_input_uri="s3://jv3-async/in/", runtime_client=runtime, s3_client=s3, sleep=sleeps, **kw
    )


def test_embed_stages_the_request_invokes_and_reads_the_output(aws, sleeps):
    example = contract("jina-float.json")
    queue_results({"data": json.dumps(example["response"])})
    client = make(aws, sleeps)
    call = dict(example["client_call"])
    vectors = client.embed(call.pop("texts"), **call)
    np.testing.assert_array_equal(vectors, np.asarray(example["decoded"], dtype=np.float32))
    s3 = aws[0]
    staged = s3.list_objects_v2(Bucket="jv3-async", Prefix="in/")["Contents"]
    assert len(staged) == 1 and staged[0]["Key"].endswith(".json")
    body = json.loads(s3.get_object(Bucket="jv3-async", Key=staged[0]["Key"])["Body"].read())
    assert body == example["request"]


def test_large_inputs_become_several_staged_requests_in_order(aws, sleeps):
    rows = [[float(i), 1.0] for i in range(5)]
    queue_results(
        {"data": json.dumps({"data": [{"index": i, "embedding": r} for i, r in enumerate(rows[:3])]})},
        {"data": json.dumps({"data": [{"index": i, "embedding": r} for i, r in enumerate(rows[3:])]})},
    )
    client = make(aws, sleeps, max_batch_size=3)
    invocations = client.submit([f"t{i}" for i in range(5)], dimensions=2)
    assert [i.count for i in invocations] == [3, 2]
    assert len({i.input_location for i in invocations}) == 2
    np.testing.assert_array_equal(client.result(invocations)[:, 0], np.arange(5, dtype=np.float32))


def test_a_failure_object_raises_with_the_parsed_message(aws, sleeps):
    queue_results({"is_failure": True, "data": json.dumps(contract("error-capacity.json")["response"])})
    with pytest.raises(AsyncInferenceError, match="capacity_error: out of GPU memory") as info:
        make(aws, sleeps).embed(["a"])
    assert info.value.failure_location.startswith("s3://")


def test_polling_gives_up_after_the_timeout(aws, sleeps):
    queue_results({"data": "{}"})
    client = make(aws, sleeps, poll_interval=1.0, max_poll_interval=4.0)
    invocations = client.submit(["a"])
    s3 = aws[0]
    bucket, key = invocations[0].output_location[5:].split("/", 1)
    s3.delete_object(Bucket=bucket, Key=key)  # the endpoint has not answered yet
    now = [0.0]
    client._clock = lambda: now[0]
    client._sleep = lambda s: (sleeps(s), now.__setitem__(0, now[0] + s))
    with pytest.raises(WaitTimeout, match="1 of 1 async requests unanswered after 10 s"):
        client.result(invocations, timeout=10)
    assert sleeps.calls[:4] == [1.0, 1.5, 2.25, 3.375] and max(sleeps.calls) == 4.0


def test_the_runtime_errors_of_invoke_endpoint_async_are_those_of_real_time(aws, sleeps):
    from botocore.stub import Stubber

    from jv3 import EndpointNotFound

    _, runtime = aws
    with Stubber(runtime) as stubber:
        stubber.add_client_error("invoke_endpoint_async", "ThrottlingException", "Rate exceeded", 400)
        stubber.add_client_error("invoke_endpoint_async", "ValidationError", "Endpoint jv3-async of account 1 not found.", 400)
        with pytest.raises(EndpointNotFound, match="not found"):
            make(aws, sleeps).submit(["a"])
    assert len(sleeps.calls) == 1  # the throttling was retried, the unknown endpoint was not
