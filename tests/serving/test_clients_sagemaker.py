"""The SageMaker Python SDK v2, sagemaker-core (SDK v3's ``Endpoint``) and Jina's ``jina-sagemaker``,
all unchanged, against the local endpoint.

GIVEN the local endpoint, and the clients pointed at it by ``AWS_ENDPOINT_URL_SAGEMAKER[_RUNTIME]`` or
``endpoint_url``
WHEN jina-sagemaker connects (DescribeEndpoint) and embeds, its batch helper's CSV is sent as batch
transform sends it, and the SDK's serializer/deserializer pairs call ``invoke_endpoint``
THEN the vectors equal a direct ``POST /invocations``, ids are kept, and a row that cannot be one
text is an error record naming its line instead of a silently wrong vector.

These clients cannot join the project's dev dependencies: SDK v2 requires ``packaging<25`` against the
endpoint's ``packaging==26.4`` (and jina-sagemaker requires SDK v2). They are installed, pinned, into
a virtual environment of their own, built once into ``~/.cache/jv3/clients-<hash of the pins>``
(``$JV3_CLIENTS_VENV`` to choose another place; about 300 MB and two minutes the first time); where
it cannot be built (no PyPI), these tests skip and say why.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .test_clients_docs import assert_vectors, direct, outcome, run_examples

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PACKAGES = ("sagemaker==2.257.7", "jina-sagemaker==0.0.48", "boto3==1.44.8")
V3_ARN = "arn:aws:sagemaker:us-east-1:865070037744:model-package/jina-embeddings-v3-380c5162a0bb3239903a3ca66ce3cb80"


def ensure_clients_venv() -> Path:
    """The cached virtual environment with ``PACKAGES``; built once, under a lock (parallel runs)."""
    digest = hashlib.sha256("\n".join((f"{sys.version_info[:2]}", *PACKAGES)).encode()).hexdigest()[:12]
    venv = Path(os.environ.get("JV3_CLIENTS_VENV") or Path.home() / ".cache" / "jv3" / f"clients-{digest}")
    marker = venv / ".jv3-complete"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text() == "\n".join(PACKAGES):
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
        done = subprocess.run([*pip, "install", *PACKAGES], capture_output=True, text=True, timeout=800)
        if done.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise RuntimeError(done.stderr[-1500:])
        marker.write_text("\n".join(PACKAGES))
    return venv


# What the docs do not show, run in the same interpreter as the docs examples.
CHECKS = [
    ("sdk-csv-list-of-strings", """
from sagemaker.deserializers import JSONLinesDeserializer
from sagemaker.predictor import Predictor
from sagemaker.serializers import CSVSerializer
texts = ["hello", "Berlin, the capital of Germany"]
sent = CSVSerializer().serialize(texts)
quoted = CSVSerializer().serialize([[t] for t in texts])
records = list(Predictor("local", serializer=CSVSerializer(), deserializer=JSONLinesDeserializer()).predict(texts))
"""),
    ("sdk-bad-value-then-alive", """
from botocore.exceptions import ClientError
from sagemaker.deserializers import JSONDeserializer
from sagemaker.predictor import Predictor
from sagemaker.serializers import JSONSerializer
predictor = Predictor("local", serializer=JSONSerializer(), deserializer=JSONDeserializer())
try:
    predictor.predict({"data": ["a"], "parameters": {"dimension": 8}})
    error = None
except ClientError as exc:
    error = exc.response["OriginalMessage"]
    code = exc.response["Error"]["Code"]
alive = len(predictor.predict({"data": ["still alive"]})["data"])
"""),
    ("jina-env-endpoints", """
import os
os.environ["AWS_ENDPOINT_URL_SAGEMAKER"] = os.environ["JV3_URL"]
os.environ["AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"] = os.environ["JV3_URL"]
from jina_sagemaker import Client
client = Client(region_name="us-east-1")
client.connect_to_endpoint("local", arn=ARN)
vectors = [item["embedding"] for item in client.embed(texts=["hello"], dimensions=16, late_chunking=False)]
try:
    Client(region_name="us-east-1").connect_to_endpoint("not_valid", arn=ARN)
    refused = None
except Exception as exc:
    refused = str(exc)
client.delete_endpoint()  # refused by the local endpoint (UnknownOperationException); the client logs and goes on
after_delete = len(client.embed(texts=["still alive"]))
""".replace("ARN", repr(V3_ARN))),
    ("jina-helper-unquoted-comma", """
import csv, json, os, tempfile, urllib.request
from jina_sagemaker.helper import prefix_csv_with_ids
path = os.path.join(tempfile.mkdtemp(), "texts.csv")
with open(path, "w", encoding="utf-8") as f:
    f.write("hello\\nBerlin, the capital of Germany\\n")  # a hand-written CSV: the comma is not quoted
with_ids = prefix_csv_with_ids(path)
with open(with_ids, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
with open(with_ids, "rb") as f:
    request = urllib.request.Request(os.environ["JV3_URL"] + "/invocations", data=f.read(), headers={"Content-Type": "text/csv"})
with urllib.request.urlopen(request) as response:
    records = [json.loads(line) for line in response]
"""),
]  # fmt: skip


@pytest.fixture(scope="module")
def results(endpoint):
    try:
        venv = ensure_clients_venv()
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"cannot build the SageMaker SDK v2 environment ({', '.join(PACKAGES)}): {exc}")
    names = ["jina-sagemaker", "jina-sagemaker-batch", "sagemaker-sdk-v2", "sagemaker-core", *CHECKS]
    return run_examples(names, endpoint.url, python=str(venv / "bin" / "python"), timeout=600)


# ------------------------------------------------------------------------------------- jina-sagemaker


def test_jina_client_connects_and_embeds(results, endpoint):
    got = outcome(results, "jina-sagemaker")
    assert_vectors(got["vectors"], direct(endpoint, got["texts"], task="text-matching"))
    assert_vectors([got["query_vector"]], direct(endpoint, ["Where is Berlin?"], task="retrieval.query", dimensions=32))


def test_jina_client_through_env_endpoints_and_refusals(results, endpoint):
    got = outcome(results, "jina-env-endpoints")
    assert_vectors(got["vectors"], direct(endpoint, ["hello"], dimensions=16))
    assert got["refused"] == "Endpoint not_valid does not exist."  # a ValidationException for the bad name
    assert got["after_delete"] == 1


def test_jina_batch_csv_keeps_ids_and_embeds_texts(results, endpoint):
    got = outcome(results, "jina-sagemaker-batch")
    records, ids = got["records"], got["ids"]
    assert len(ids) == 2 and all(len(i) == 32 for i in ids)
    assert [r["id"] for r in records] == ids and [r["index"] for r in records] == [0, 1]
    assert_vectors([r["embedding"] for r in records], direct(endpoint, got["texts"]))


def test_jina_helper_splits_an_unquoted_comma_and_the_row_is_refused_by_line(results, endpoint):
    got = outcome(results, "jina-helper-unquoted-comma")
    rows, records = got["rows"], got["records"]
    assert len(rows[1]) == 3  # the helper's csv.reader split "Berlin, the capital of Germany"
    assert records[0]["id"] == rows[0][0]
    assert_vectors([records[0]["embedding"]], direct(endpoint, ["hello"]))
    error = records[1]["error"]
    assert records[1]["id"] == rows[1][0] and error["code"] == 400 and error["field"] == "line 2"
    assert "line 2 has 3 fields" in error["message"]


# ------------------------------------------------------------------------------------- SDK v2


def test_sdk_serializer_pairs(results, endpoint):
    got = outcome(results, "sagemaker-sdk-v2")
    texts = got["texts"]
    assert_vectors(got["vectors"], direct(endpoint, texts, task="retrieval.passage", dimensions=32))
    # JSONLinesSerializer + JSONDeserializer: one JSON array of the records
    (record,) = got["records"]
    assert record["id"] == "q1" and record["index"] == 0
    assert_vectors([record["embedding"]], direct(endpoint, ["Where is Berlin?"], task="retrieval.query", dimensions=32))
    # CSVSerializer on one-column rows: quoted, so the comma stays in the text
    assert [r["index"] for r in got["rows"]] == [0, 1]
    assert_vectors([r["embedding"] for r in got["rows"]], direct(endpoint, texts))


def test_sdk_csv_serializer_on_a_list_of_strings_is_refused_by_line_not_cut(results, endpoint):
    got = outcome(results, "sdk-csv-list-of-strings")
    assert got["sent"] == "hello\nBerlin, the capital of Germany"  # unquoted: what the SDK writes
    assert got["quoted"] == 'hello\n"Berlin, the capital of Germany"'
    first, second = got["records"]
    assert_vectors([first["embedding"]], direct(endpoint, ["hello"]))
    assert "embedding" not in second and second["error"]["field"] == "line 2"
    assert "line 2 has 2 fields" in second["error"]["message"] and "quote" in second["error"]["message"]


def test_sdk_bad_value_is_model_error_naming_it_and_the_endpoint_goes_on(results):
    got = outcome(results, "sdk-bad-value-then-alive")
    assert got["code"] == "ModelError" and "unknown parameter(s) 'dimension'" in got["error"]
    assert got["alive"] == 1


# ------------------------------------------------------------------------------------- sagemaker-core / v3


def test_sagemaker_core_endpoint_get_and_invoke(results, endpoint):
    got = outcome(results, "sagemaker-core")
    assert got["status"] == "InService"
    assert_vectors(got["vectors"], direct(endpoint, got["texts"], task="retrieval.passage", dimensions=32))
