"""LiteLLM, unchanged, against the local endpoint through the SageMaker runtime API.

GIVEN the local endpoint and ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME`` pointing at it
WHEN ``litellm.embedding(model="sagemaker/openai/local" | "sagemaker/local", ...)`` is called
THEN the OpenAI route carries dimensions and task, the TEI route carries task, and the vectors equal
a direct ``POST /invocations``; a bad value comes back as LiteLLM's error naming it, and the endpoint
still answers.

LiteLLM takes about 10 s to import here, so all its calls run in one interpreter.
"""

from __future__ import annotations

import importlib.util

import pytest

from .test_clients_docs import assert_vectors, direct, outcome, run_examples

pytestmark = pytest.mark.skipif(importlib.util.find_spec("litellm") is None, reason="litellm is not installed (dev dependency)")

# What the docs do not show, run in the same interpreter as the docs example.
CHECKS = [
    ("tei-task-only", """
import litellm
answer = litellm.embedding(model="sagemaker/local", input=["Where is Berlin?"], task="retrieval.query")
vector = answer.data[0]["embedding"]
"""),
    ("tei-dimensions-refused-by-litellm", """
import litellm
try:
    litellm.embedding(model="sagemaker/local", input=["a"], dimensions=8)
    refused = None
except Exception as exc:
    refused = type(exc).__name__ + ": " + str(exc)
"""),
    ("openai-route-bad-value", """
import litellm
try:
    litellm.embedding(model="sagemaker/openai/local", input=["a"], dimensions=999)
    error = None
except Exception as exc:
    error = str(exc)
answer = litellm.embedding(model="sagemaker/openai/local", input=["still alive"])
alive = len(answer.data)
"""),
    ("tei-route-unknown-key", """
import litellm
try:
    litellm.embedding(model="sagemaker/local", input=["a"], dimension=8)
    error = None
except Exception as exc:
    error = str(exc)
"""),
    ("openai-route-base64", """
import litellm
answer = litellm.embedding(model="sagemaker/openai/local", input=["hello"], encoding_format="base64")
packed = answer.data[0]["embedding"]
"""),
]  # fmt: skip


@pytest.fixture(scope="module")
def results(endpoint):
    return run_examples(["litellm", *CHECKS], endpoint.url, timeout=280)


def test_docs_example_both_routes(results, endpoint):
    got = outcome(results, "litellm")
    texts = got["texts"]
    assert_vectors(got["vectors"], direct(endpoint, texts, task="retrieval.passage", dimensions=32))
    assert_vectors(got["tei_vectors"], direct(endpoint, texts, task="retrieval.passage"))


def test_tei_route_carries_task(results, endpoint):
    got = outcome(results, "tei-task-only")
    assert_vectors([got["vector"]], direct(endpoint, ["Where is Berlin?"], task="retrieval.query"))


def test_tei_route_dimensions_is_refused_by_litellm_not_dropped(results):
    assert "UnsupportedParamsError" in outcome(results, "tei-dimensions-refused-by-litellm")["refused"]


def test_bad_values_come_back_naming_them_and_the_endpoint_goes_on(results):
    got = outcome(results, "openai-route-bad-value")
    assert "dimensions 999 is out of range" in got["error"] and got["alive"] == 1
    assert "unknown key(s) 'dimension'" in outcome(results, "tei-route-unknown-key")["error"]


def test_openai_route_base64_is_float32_le(results, endpoint):
    import base64

    import numpy as np

    packed = outcome(results, "openai-route-base64")["packed"]
    assert_vectors([np.frombuffer(base64.b64decode(packed), "<f4")], direct(endpoint, ["hello"]))
