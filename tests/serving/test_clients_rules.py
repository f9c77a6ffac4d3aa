"""One set of rules for every client (docs/clients.md, docs/wire-format.md): unknown keys, Accept for
records, CSV rows that cannot be one text, and the control-plane call clients make before invoking.

In process where the parser alone decides; over HTTP where the server does, each bad request
followed by a good one on the same endpoint.
"""

from __future__ import annotations

import json
import threading
import uuid

import boto3
import numpy as np
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from inference import protocol
from inference.errors import JV3Error
from inference.request import EmbedResult
from inference.serve import make_server

from .parsing import parse, refused
from .test_clients_docs import assert_vectors, direct

JSON_CT = {"Content-Type": "application/json"}
JSONL_CT = {"Content-Type": "application/jsonlines"}
CSV_CT = {"Content-Type": "text/csv"}


def texts_or_errors(invocation) -> list:
    return [r.message if isinstance(r, JV3Error) else r.texts[0] for r in invocation.requests]


def alive(endpoint) -> None:
    assert endpoint.post_json({"data": ["still alive"]})[0] == 200


# ------------------------------------------------------------------------------------ 1. unknown keys


@pytest.mark.parametrize(
    "body,field,words",
    [
        ('{"input": "a", "dimension": 8}', "dimension", "unknown key(s) 'dimension' in an OpenAI request"),
        ('{"input": "a", "encoding": "base64"}', "encoding", "unknown key(s) 'encoding'"),
        ('{"inputs": "a", "normalise": false}', "normalise", "unknown key(s) 'normalise' in a TEI request"),
        ('{"inputs": "a", "prompt_name": "query"}', "prompt_name", "unknown key(s) 'prompt_name'"),
        ('{"inputs": "a", "encoding_format": "base64"}', "encoding_format", "not available in the TEI format"),
        ('{"data": ["a"], "task": "retrieval.query"}', "task", "belongs inside 'parameters'"),
        ('{"data": ["a"], "parameter": {"task": "retrieval.query"}}', "parameter", "did you mean 'parameters'?"),
        ('{"data": ["a"], "input": ["b"]}', "input", "another format's key"),
        ('{"data": ["a"], "encoding_format": "base64"}', "encoding_format", "another format's key"),
        ('{"data": [{"text": "a", "image": "x.png"}]}', "data[0].image", "unknown key(s) 'image' in data[0]"),
        ('{"data": ["a"], "parameters": {"dimension": 8}}', "parameters.dimension", "unknown parameter(s) 'dimension'"),
        ('{"input": "a", "user": 5}', "user", "'user' must be a string"),
        ('{"inputs": "a", "model": 5}', "model", "'model' must be a string"),
        ('{"data": ["a"], "model": ["x"]}', "model", "'model' must be a string"),
    ],
)  # fmt: skip
def test_unknown_keys_are_refused_by_name_in_every_json_format(body, field, words):
    error = refused(body)
    assert error.status == 400 and error.field == field and words in error.message, error.message


@pytest.mark.parametrize(
    "body",
    [
        '{"input": "a", "model": "jina-embeddings-v3", "user": "u-1", "encoding_format": "float"}',
        '{"inputs": "a", "model": "x", "user": "u-1", "encoding_format": "float", "truncate": true}',
        '{"inputs": "a", "encoding_format": null}',
        '{"data": ["a"], "model": "jina-embeddings-v3", "user": "u-1"}',
        '{"data": [{"text": "a", "id": 1}], "request_id": "caller metadata beside data"}',
        '{"input": "a", "task": "retrieval.query", "late_chunking": false, "dimensions": 8}',
    ],
)
def test_harmless_keys_clients_send_are_accepted(body):
    assert texts_or_errors(parse(body)) == ["a"]


def test_unknown_key_over_http_is_400_naming_it_and_the_endpoint_goes_on(endpoint):
    for body in ({"input": "a", "dimension": 8}, {"inputs": ["a"], "normalise": False}, {"data": ["a"], "task": "x"}):
        status, out = endpoint.post_json(body)
        key = [k for k in body if k not in ("input", "inputs", "data")][0]
        assert status == 400 and out["error"]["field"] == key and repr(key) in out["error"]["message"], out
        alive(endpoint)


# ------------------------------------------------------------------------------------ 2. Accept for records


JSONL_BODY = '{"text": "hello", "id": "a"}\n"world"\n{"id": "no text"}\n'


@pytest.mark.parametrize("content_type,body", [(JSONL_CT, JSONL_BODY), (CSV_CT, "id,text\na,hello\nb,world\nc\n")])
def test_records_asking_for_json_get_one_json_array_of_the_same_records(endpoint, content_type, body):
    status, headers, out = endpoint.request("POST", "/invocations", body, {**content_type, "Accept": "application/json"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    array = json.loads(out)  # one document: json.loads of JSON Lines would fail with "Extra data"
    status, headers, lines = endpoint.request("POST", "/invocations", body, {**content_type, "Accept": "application/jsonlines"})
    assert headers["Content-Type"] == "application/jsonlines"
    assert array == [json.loads(line) for line in lines.decode().splitlines()]
    assert [r["index"] for r in array] == [0, 1, 2] and "error" in array[2] and array[0]["id"] == "a"
    assert_vectors([array[0]["embedding"], array[1]["embedding"]], direct(endpoint, ["hello", "world"]))


@pytest.mark.parametrize("accept", [None, "*/*", "application/*", "application/jsonlines, application/json;q=0.5"])
def test_records_without_an_explicit_json_accept_answer_records(endpoint, accept):
    headers = {**JSONL_CT, **({"Accept": accept} if accept else {})}
    status, response_headers, out = endpoint.request("POST", "/invocations", JSONL_BODY, headers)
    assert status == 200 and response_headers["Content-Type"] == "application/jsonlines"
    assert len(out.decode().splitlines()) == 3


def test_where_the_toolkit_fills_in_accept_records_still_answer_records():
    """The DLC handler's ``accept`` may be the toolkit's default for a missing header: records stay records."""
    invocation = parse(JSONL_BODY.encode(), "application/jsonlines")
    assert protocol.negotiate("application/json", invocation) == protocol.JSONLINES
    assert protocol.negotiate("application/json", invocation, as_sent=True) == protocol.JSON
    assert protocol.negotiate(None, invocation, as_sent=True) == protocol.JSONLINES


def test_records_as_a_json_array_are_strict_json_with_errors_in_place():
    invocation = parse(JSONL_BODY.encode(), "application/jsonlines")
    results = [EmbedResult(np.full((1, 4), 0.5, np.float32), [2], "float") for _ in invocation.pending()]
    invocation.complete(results)
    payload, media = protocol.write_response(invocation, protocol.JSON, model="m", default_task="text-matching")
    records = json.loads(payload)
    assert media == protocol.JSON and [r["index"] for r in records] == [0, 1, 2]
    assert records[0] == {"id": "a", "index": 0, "embedding": [0.5] * 4, "tokens": 2}
    assert records[2]["error"]["field"] == "text"


# ------------------------------------------------------------------------------------ 3. CSV rows


JINA_ID = uuid.UUID(int=7).hex


@pytest.mark.parametrize(
    "body,expected,ids",
    [
        # what the SageMaker SDK's CSVSerializer writes for ["hello", "Berlin, the capital"]: unquoted
        ("hello\nBerlin, the capital\n", ["hello", "line 2 has 2 fields"], [None, None]),
        # ... and for [["hello"], ["Berlin, the capital"]]: csv.writer quotes it
        ('hello\n"Berlin, the capital"\n', ["hello", "Berlin, the capital"], [None, None]),
        # jina-sagemaker's prefix_csv_with_ids: QUOTE_ALL, \r\n, a uuid4().hex id, no header
        (f'"{JINA_ID}","Berlin, the capital"\r\n"{JINA_ID[::-1]}","b"\r\n', ["Berlin, the capital", "b"], [JINA_ID, JINA_ID[::-1]]),
        # its sample file, unquoted, and a hyphenated UUID
        (f"{JINA_ID},How is the weather today?\n{uuid.UUID(int=9)},c\n", ["How is the weather today?", "c"], [JINA_ID, str(uuid.UUID(int=9))]),
        # the helper splits an unquoted comma into a third field: refused by line, its id kept
        (f'"{JINA_ID}","Berlin"," the capital"\r\n', ["line 1 has 3 fields"], [JINA_ID]),
        # a first row that starts with a UUID is a record even when its text is "text"
        (f"{JINA_ID},text\n", ["text"], [JINA_ID]),
        # two fields without a UUID: not guessed at
        ("1,hello\n", ["line 1 has 2 fields; without a header a row is one text"], [None]),
        # under a header: a field more than the header has is refused, the id kept
        ("id,text\n1,Berlin, the capital\n2,b\n", ["line 2 has 3 fields but the header has 2", "b"], ["1", "2"]),
        ("text,id\nhello,7\n", ["hello"], ["7"]),
    ],
)  # fmt: skip
def test_csv_rows_are_one_text_or_an_error_naming_their_line(body, expected, ids):
    invocation = parse(body.encode(), "text/csv")
    got = texts_or_errors(invocation)
    assert len(got) == len(expected)
    for text, want in zip(got, expected, strict=True):
        assert text == want or (want.startswith("line ") and want in text), (text, want)
    assert invocation.meta["ids"] == ids


def test_csv_row_error_over_http_and_as_csv_output(endpoint):
    status, _, out = endpoint.request("POST", "/invocations", "hello\nBerlin, the capital\n", CSV_CT)
    first, second = [json.loads(line) for line in out.decode().splitlines()]
    assert status == 200 and "embedding" in first and second["error"]["field"] == "line 2"
    status, _, out = endpoint.request("POST", "/invocations", "hello\nBerlin, the capital\n", {**CSV_CT, "Accept": "text/csv"})
    error = json.loads(out)["error"]
    assert status == 400 and error["field"] == "line 2" and "2 fields" in error["message"]
    alive(endpoint)


# ------------------------------------------------------------------------------------ 4. control plane


def control_client(port: int):
    return boto3.client(
        "sagemaker", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1}, read_timeout=30),
    )  # fmt: skip


def test_describe_endpoint_is_in_service(endpoint):
    answer = control_client(endpoint.port).describe_endpoint(EndpointName="my-local-endpoint")
    assert answer["EndpointName"] == "my-local-endpoint" and answer["EndpointStatus"] == "InService"
    assert answer["EndpointArn"].endswith(":endpoint/my-local-endpoint")
    assert answer["ProductionVariants"][0]["VariantName"] == "AllTraffic"
    assert answer["CreationTime"] <= answer["LastModifiedTime"]  # botocore parsed both as datetimes
    control_client(endpoint.port).get_waiter("endpoint_in_service").wait(EndpointName="local")


@pytest.mark.parametrize(
    "call,code,words",
    [
        (lambda c: c.delete_endpoint(EndpointName="local"), "UnknownOperationException", "SageMaker.DeleteEndpoint"),
        (lambda c: c.list_endpoints(), "UnknownOperationException", "SageMaker.ListEndpoints"),
        (lambda c: c.describe_endpoint(EndpointName="not_valid"), "ValidationException", "'not_valid'"),
        (lambda c: c.describe_endpoint(EndpointName="-x"), "ValidationException", "EndpointName must be"),
    ],
)  # fmt: skip
def test_other_control_plane_calls_are_refused_by_name(endpoint, call, code, words):
    with pytest.raises(ClientError) as caught:
        call(control_client(endpoint.port))
    error = caught.value.response["Error"]
    assert error["Code"] == code and words in error["Message"], error
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    alive(endpoint)


@pytest.mark.parametrize(
    "body,code",
    [(b"{not json", "SerializationException"), (b"[]", "ValidationException"), (b'{"EndpointName": 5}', "ValidationException"),
     (b"x" * (65 * 1024), "ValidationException"), (b"[" * 60_000, "SerializationException"),
     (b'{"EndpointName": "' + b"-" * 60_000 + b'!"}', "ValidationException")],
)  # fmt: skip
def test_malformed_control_plane_bodies_are_400(endpoint, body, code):
    headers = {"X-Amz-Target": "SageMaker.DescribeEndpoint", "Content-Type": "application/x-amz-json-1.1"}
    status, response_headers, out = endpoint.request("POST", "/", body, headers)
    assert status == 400 and json.loads(out)["__type"] == code and response_headers["x-amzn-ErrorType"] == code
    alive(endpoint)


def test_post_root_without_a_target_is_still_404(endpoint):
    status, _, out = endpoint.request("POST", "/", b"{}", JSON_CT)
    assert status == 404 and "no route POST /" in json.loads(out)["error"]["message"]


def test_while_loading_describe_says_creating_and_openai_route_503():
    """A server with no engine yet (the model still loading): no compute needed, so in process."""
    import http.client

    server = make_server(None, port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert control_client(port).describe_endpoint(EndpointName="local")["EndpointStatus"] == "Creating"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/embeddings", b'{"input": "a"}', JSON_CT)
        response = conn.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == 503 and error["code"] == "loading" and error["type"] == "server_error"
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
