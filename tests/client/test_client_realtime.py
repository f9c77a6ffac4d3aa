"""EmbeddingClient against a botocore Stubber (error shapes, retries) and an in-process fake
runtime (concurrency and order). The real endpoint over HTTP is in test_loopback.py."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from botocore.stub import ANY
from client_support import body, contract

from jv3 import (
    CapacityError,
    EmbeddingClient,
    EndpointNotFound,
    EndpointUnavailable,
    InvalidArgument,
    InvalidRequestError,
    ModelNotReady,
    PartialFailure,
    RequestTooLarge,
    ServerError,
    ThrottledError,
)
from jv3.retry import RetryPolicy

OK = contract("jina-float.json")


def ok_response(example=OK):
    return {"Body": body(example["response"]), "ContentType": "application/json"}


def expected(example=OK):
    return {
        "EndpointName": "jv3",
        "Body": json.dumps(example["request"], separators=(",", ":"), ensure_ascii=False).encode(),
        "ContentType": "application/json",
        "Accept": "application/json",
    }


def model_error(stubber, status: int, message, *, times: int = 1):
    original = message if isinstance(message, str) else json.dumps(message)
    for _ in range(times):
        stubber.add_client_error(
            "invoke_endpoint",
            service_error_code="ModelError",
            service_message=f"Received client error ({status}) from primary with message \"{original}\"",
            http_status_code=424,
            modeled_fields={
                "OriginalStatusCode": status,
                "OriginalMessage": original,
                "LogStreamArn": "arn:aws:logs:us-east-1:123:log-group:/aws/sagemaker/Endpoints/jv3",
            },
        )


def make(runtime_client, retry=None, **kw):
    return EmbeddingClient("jv3", runtime_client=runtime_client, retry=retry, **kw)


def call(client, example=OK):
    c = dict(example["client_call"])
    return client.embed(c.pop("texts"), **c)


def test_embed_sends_the_contract_request_and_returns_the_decoded_rows(runtime):
    client, stubber = runtime
    stubber.add_response("invoke_endpoint", ok_response(), expected(OK))
    vectors = call(make(client))
    assert vectors.dtype == np.float32 and vectors.shape == (2, 8)
    np.testing.assert_array_equal(vectors, np.asarray(OK["decoded"], dtype=np.float32))


@pytest.mark.parametrize("name", ["jina-base64.json", "jina-binary.json", "jina-ubinary.json", "jina-late-chunking.json"])
def test_every_encoding_and_late_chunking_round_trip_through_boto3(runtime, name):
    example = contract(name)
    client, stubber = runtime
    stubber.add_response("invoke_endpoint", ok_response(example), expected(example))
    vectors = call(make(client), example)
    et = example["client_call"]["embedding_type"]
    want = np.asarray(example["decoded"], dtype={"binary": np.int8, "ubinary": np.uint8}.get(et, np.float32))
    np.testing.assert_array_equal(vectors, want)
    assert vectors.dtype == want.dtype


def test_a_400_model_error_is_typed_parsed_and_not_retried(runtime, retry, sleeps):
    client, stubber = runtime
    error = contract("error-dimensions.json")["response"]
    model_error(stubber, 400, error)  # one response only: a retry would find the stubber empty
    with pytest.raises(InvalidRequestError) as info:
        call(make(client, retry))
    exc = info.value
    assert (exc.status, exc.error_type, exc.field) == (400, "invalid_request", "dimensions")
    assert exc.message == error["error"]["message"]
    assert exc.log_stream_arn.endswith("/Endpoints/jv3")
    assert sleeps.calls == []


def test_a_model_error_whose_body_is_not_json_keeps_the_raw_message(runtime, retry):
    client, stubber = runtime
    model_error(stubber, 500, "Traceback (most recent call last): boom")
    with pytest.raises(ServerError) as info:
        call(make(client, retry))
    assert info.value.status == 500 and info.value.error_type is None
    assert "boom" in info.value.message


@pytest.mark.parametrize("status, cls", [(503, EndpointUnavailable), (507, CapacityError)])
def test_503_and_507_model_errors_are_retried_then_succeed(runtime, retry, sleeps, status, cls):
    client, stubber = runtime
    model_error(stubber, status, contract("error-capacity.json")["response"], times=2)
    stubber.add_response("invoke_endpoint", ok_response(), expected(OK))
    vectors = call(make(client, retry))
    assert vectors.shape == (2, 8)
    assert len(sleeps.calls) == 2
    assert cls.retryable


@pytest.mark.parametrize(
    "code, status, cls",
    [
        ("ThrottlingException", 400, ThrottledError),
        ("ModelNotReadyException", 429, ModelNotReady),
        ("ServiceUnavailable", 503, EndpointUnavailable),
    ],
)
def test_runtime_errors_worth_retrying_are_retried(runtime, retry, sleeps, code, status, cls):
    client, stubber = runtime
    stubber.add_client_error("invoke_endpoint", service_error_code=code, service_message="slow down", http_status_code=status)
    stubber.add_response("invoke_endpoint", ok_response(), expected(OK))
    assert call(make(client, retry)).shape == (2, 8)
    assert len(sleeps.calls) == 1


def test_retries_give_up_after_max_attempts_with_the_last_error(runtime, retry, sleeps):
    client, stubber = runtime
    for _ in range(retry.max_attempts):
        stubber.add_client_error("invoke_endpoint", service_error_code="ThrottlingException",
                                 service_message="Rate exceeded", http_status_code=400)
    with pytest.raises(ThrottledError, match="Rate exceeded"):
        call(make(client, retry))
    assert len(sleeps.calls) == retry.max_attempts - 1


def test_backoff_is_exponential_with_full_jitter_and_capped():
    bounds = []
    policy = RetryPolicy(base_delay=0.5, max_delay=3.0, random=lambda lo, hi: bounds.append((lo, hi)) or hi)
    assert [policy.delay(k) for k in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert all(lo == 0.0 for lo, _ in bounds)  # full jitter: anywhere from zero to the cap


def test_unknown_endpoint_is_endpoint_not_found_and_not_retried(runtime, retry, sleeps):
    client, stubber = runtime
    stubber.add_client_error("invoke_endpoint", service_error_code="ValidationError",
                             service_message="Endpoint jv3 of account 123 not found.", http_status_code=400)
    with pytest.raises(EndpointNotFound, match="not found"):
        call(make(client, retry))
    assert sleeps.calls == []


def test_invalid_arguments_fail_before_any_request(runtime):
    client, _ = runtime  # no responses queued: any request would fail the stubber
    c = make(client)
    with pytest.raises(InvalidArgument, match="unknown task 'query'"):
        c.embed(["a"], task="query")
    with pytest.raises(InvalidArgument, match="dimensions 2048 is out of range"):
        c.embed(["a"], dimensions=2048)
    with pytest.raises(InvalidArgument, match="unknown embedding_type 'int8'"):
        c.embed(["a"], embedding_type="int8")
    with pytest.raises(RequestTooLarge, match="late chunking"):
        make(client, max_request_bytes=1000).embed(["x" * 400] * 3, late_chunking=True)
    with pytest.raises(InvalidArgument, match="max_concurrency must be a positive integer, got 0"):
        make(client, max_concurrency=0)


def test_empty_input_makes_no_request(runtime):
    client, _ = runtime
    assert make(client).embed([], dimensions=16).shape == (0, 16)
    empty = make(client).embed([], dimensions=16, embedding_type="ubinary")
    assert empty.shape == (0, 2) and empty.dtype == np.uint8


def test_embed_query_and_embed_documents_use_the_retrieval_tasks(runtime):
    client, stubber = runtime
    one = {"data": [{"index": 0, "embedding": [0.6, 0.8]}]}
    two = {"data": [{"index": 0, "embedding": [1.0, 0.0]}, {"index": 1, "embedding": [0.0, 1.0]}]}
    stubber.add_response("invoke_endpoint", {"Body": body(two)}, {**expected(), "Body": ANY})
    stubber.add_response("invoke_endpoint", {"Body": body(one)}, {**expected(), "Body": ANY})
    calls = []
    client.meta.events.register("before-parameter-build.sagemaker-runtime.InvokeEndpoint",
                                lambda params, **_: calls.append(json.loads(params["Body"])))
    c = make(client)
    docs = c.embed_documents(["a", "b"])
    query = c.embed_query("q")
    assert docs == [[1.0, 0.0], [0.0, 1.0]] and isinstance(docs[0][0], float)
    assert query == pytest.approx([0.6, 0.8]) and isinstance(query, list)
    assert [c["parameters"]["task"] for c in calls] == ["retrieval.passage", "retrieval.query"]


class FakeRuntime:
    """In-process stand-in for sagemaker-runtime: a deterministic vector per text, answered in a
    scrambled item order, and a record of request sizes and peak concurrency."""

    def __init__(self, fail_on: str | None = None):
        self.lock = threading.Lock()
        self.in_flight = self.peak = 0
        self.sizes: list[int] = []
        self.fail_on = fail_on
        self.release = threading.Barrier(1)

    def invoke_endpoint(self, **kwargs):
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.sizes.append(len(kwargs["Body"]))
        try:
            request = json.loads(kwargs["Body"])
            texts = [item["text"] for item in request["data"]]
            if self.fail_on in texts:
                from botocore.exceptions import ClientError

                raise ClientError({"Error": {"Code": "ModelError", "Message": "x"}, "OriginalStatusCode": 400,
                                   "OriginalMessage": json.dumps({"error": {"type": "invalid_request",
                                                                            "message": "bad text", "code": 400}})},
                                  "InvokeEndpoint")
            items = [{"index": i, "embedding": [float(t.split("-")[1]), float(len(t))]} for i, t in enumerate(texts)]
            return {"Body": body({"data": items[::-1]})}
        finally:
            with self.lock:
                self.in_flight -= 1


def test_large_inputs_are_split_sent_concurrently_and_reassembled_in_order():
    fake = FakeRuntime()
    texts = [f"t-{i}" for i in range(1000)]
    c = EmbeddingClient("jv3", runtime_client=fake, max_batch_size=37, max_concurrency=8)
    vectors = c.embed(texts, dimensions=2)
    np.testing.assert_array_equal(vectors[:, 0], np.arange(1000, dtype=np.float32))
    assert len(fake.sizes) == -(-1000 // 37)


def test_an_error_in_one_request_keeps_the_others_and_names_the_failed_texts():
    fake = FakeRuntime(fail_on="t-500")
    c = EmbeddingClient("jv3", runtime_client=fake, max_batch_size=10, max_concurrency=4, progress=False)
    with pytest.raises(PartialFailure, match="10 of 1000 texts failed") as info:
        c.embed([f"t-{i}" for i in range(1000)], dimensions=2)
    failure = info.value
    assert isinstance(failure.error, InvalidRequestError) and "bad text" in str(failure.error)
    assert failure.failed_indices == list(range(500, 510))
    assert len(fake.sizes) == 100  # the other 99 requests were all sent, once each (a 400 is not retried)
    kept = failure.valid
    np.testing.assert_array_equal(failure.vectors[kept, 0], np.flatnonzero(kept).astype(np.float32))
    assert np.isnan(failure.vectors[~kept]).all()


def test_progress_bar_is_off_for_small_inputs_and_on_for_large(capsys):
    c = EmbeddingClient("jv3", runtime_client=FakeRuntime(), max_batch_size=10, progress_threshold=100)
    c.embed([f"t-{i}" for i in range(50)], dimensions=2)
    assert "embedding" not in capsys.readouterr().err
    c.embed([f"t-{i}" for i in range(200)], dimensions=2)
    assert "embedding" in capsys.readouterr().err
    EmbeddingClient("jv3", runtime_client=FakeRuntime(), progress=False, progress_threshold=1).embed(
        [f"t-{i}" for i in range(200)], dimensions=2
    )
    assert "embedding" not in capsys.readouterr().err
