"""The official ``openai`` client, unchanged, against ``POST /v1/embeddings`` of the local endpoint.

GIVEN the local endpoint serving the tiny checkpoint (64 dimensions)
WHEN ``OpenAI(base_url=<endpoint>/v1).embeddings.create(...)`` is called: float, base64, dimensions, task
THEN the vectors equal those of a direct ``POST /invocations``, and every bad value is a 4xx in
OpenAI's error shape naming it, after which the endpoint still answers.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from .test_clients_docs import assert_vectors, direct, outcome, run_examples

openai = pytest.importorskip("openai")

TEXTS = ["Berlin, the capital of Germany", "Paris is in France"]
JSON_CT = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client(endpoint):
    return openai.OpenAI(base_url=f"{endpoint.url}/v1", api_key="unused", max_retries=0, timeout=60)


def still_serves(client) -> None:
    assert len(client.embeddings.create(model="m", input="still alive").data) == 1


def test_float_vectors_equal_a_direct_request(client, endpoint):
    answer = client.embeddings.create(model="jina-embeddings-v3", input=TEXTS, encoding_format="float")
    assert answer.object == "list" and [d.index for d in answer.data] == [0, 1]
    assert answer.model == "jina-embeddings-v3" and answer.usage.prompt_tokens == answer.usage.total_tokens > 0
    assert_vectors([d.embedding for d in answer.data], direct(endpoint, TEXTS))


def test_base64_default_is_decoded_by_the_client(client, endpoint):
    """Without encoding_format the client asks for base64 and decodes it itself: the same vectors."""
    answer = client.embeddings.create(model="jina-embeddings-v3", input=TEXTS)
    assert_vectors([d.embedding for d in answer.data], direct(endpoint, TEXTS))


def test_base64_asked_for_is_little_endian_float32(client, endpoint):
    """Asked for explicitly, the client hands base64 over as it came: OpenAI's layout, float32 LE."""
    answer = client.embeddings.create(model="jina-embeddings-v3", input=TEXTS, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in answer.data]
    assert_vectors(decoded, direct(endpoint, TEXTS))


def test_dimensions_and_task_reach_the_engine(client, endpoint):
    answer = client.embeddings.create(
        model="jina-embeddings-v3", input="Where is Berlin?", dimensions=16, extra_body={"task": "retrieval.query"}
    )
    expected = direct(endpoint, ["Where is Berlin?"], task="retrieval.query", dimensions=16)
    assert_vectors([answer.data[0].embedding], expected)
    # the task changes the vector: the extension is not silently dropped
    assert not np.allclose(expected, direct(endpoint, ["Where is Berlin?"], dimensions=16), atol=1e-4)


def test_late_chunking_extension(client, endpoint):
    chunks = ["The cat sat.", "It was happy."]
    answer = client.embeddings.create(model="m", input=chunks, encoding_format="float",
                                      extra_body={"late_chunking": True, "task": "retrieval.passage"})  # fmt: skip
    assert_vectors([d.embedding for d in answer.data], direct(endpoint, chunks, late_chunking=True, task="retrieval.passage"))


@pytest.mark.parametrize(
    "kwargs,param,words",
    [
        ({"input": "a", "dimensions": 999}, "dimensions", "dimensions 999 is out of range"),
        ({"input": "a", "extra_body": {"task": "retrival.query"}}, "task", "unknown task 'retrival.query'"),
        ({"input": "a", "extra_body": {"dimension": 8}}, "dimension", "unknown key(s) 'dimension'"),
        ({"input": [[1, 2, 3]]}, "input", "token ids"),
        ({"input": [1, 2, 3]}, "input", "token ids"),
        ({"input": []}, "texts", "no texts"),
        ({"input": "a", "user": 7}, "user", "'user' must be a string"),
        ({"input": "a", "extra_body": {"late_chunking": "yes"}}, "late_chunking", "late_chunking must be true or false"),
    ],
)  # fmt: skip
def test_bad_values_are_400_in_openai_shape_and_the_endpoint_goes_on(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="jina-embeddings-v3", encoding_format="float", **kwargs)
    err = caught.value
    assert err.status_code == 400 and err.type == "invalid_request_error" and err.param == param
    assert words in err.message, err.message
    still_serves(client)


# The same route over raw HTTP: what the client cannot send, answered in OpenAI's shape.
RAW = [
    ("jina body", b'{"data": ["a"]}', JSON_CT, 400, "input", "expected an OpenAI embeddings request"),
    ("not json", b'{"input": [', JSON_CT, 400, "body", "not valid JSON"),
    ("empty", b"", JSON_CT, 400, "body", "empty request body"),
    ("csv", b"a\n", {"Content-Type": "text/csv"}, 415, "content_type", "send application/json"),
    ("accept", b'{"input": "a"}', {**JSON_CT, "Accept": "text/csv"}, 406, "accept", "cannot answer with 'text/csv'"),
    ("bad q", b'{"input": "a"}', {**JSON_CT, "Accept": "application/json;q=2"}, 400, "accept", "q=2"),
    ("array", b'["a"]', JSON_CT, 400, "input", "got list"),
    ("nan", b'{"input": "a", "dimensions": NaN}', JSON_CT, 400, "body", "NaN is not a JSON value"),
    ("utf-8", b'{"input": "caf\xc3"}', JSON_CT, 400, "body", "not valid UTF-8"),
]


@pytest.mark.parametrize("name,body,headers,status,param,words", RAW, ids=[r[0] for r in RAW])
def test_raw_bad_requests_are_openai_errors(endpoint, client, name, body, headers, status, param, words):
    got, response_headers, out = endpoint.request("POST", "/v1/embeddings", body, headers)
    assert got == status and response_headers["Content-Type"] == "application/json", out
    error = json.loads(out)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["type"] == "invalid_request_error" and words in error["message"], error
    still_serves(client)


def test_no_accept_and_wildcards_answer_json(endpoint):
    for accept in (None, "*/*", "application/*", "text/html, application/json;q=0.1"):
        headers = {**JSON_CT, **({"Accept": accept} if accept else {})}
        status, response_headers, out = endpoint.request("POST", "/v1/embeddings", b'{"input": "a"}', headers)
        assert status == 200 and response_headers["Content-Type"] == "application/json", (accept, out)
        assert json.loads(out)["object"] == "list"


def test_other_routes_still_404(endpoint):
    status, _, out = endpoint.request("POST", "/v1/chat/completions", b"{}", JSON_CT)
    assert status == 404 and "POST /v1/embeddings" in json.loads(out)["error"]["message"]


def test_docs_example(endpoint):
    got = outcome(run_examples(["openai"], endpoint.url), "openai")
    texts = got["texts"]
    assert_vectors(got["vectors"], direct(endpoint, texts))
    assert_vectors(got["packed_vectors"], direct(endpoint, texts))
    assert_vectors([got["query_vector"]], direct(endpoint, ["Where is Berlin?"], task="retrieval.query", dimensions=32))
