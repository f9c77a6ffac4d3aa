"""The archive as SageMaker runs it, on both runtimes: no network, over HTTP, the stacks' environment.

GIVEN ``python -m model_package --checkpoint fixtures/jina-v3-tiny`` (defaults: real wheels in code/lib)
WHEN the PyTorch inference DLC's entrypoint serves it (TorchServe + the SageMaker toolkit), or the BYOC
Dockerfile's entrypoint does (its ENV, WORKDIR, COPY, ENTRYPOINT and CMD), unpacked at /opt/ml/model,
loopback only (tests/containers/stack.py) THEN every request format and every client mistake is
answered as the local server answers it, nothing asks the network for anything, a setting the model
rejects never leaves a server that stays healthy, and the toolkit configures one worker per GPU.

The stack's virtual environment is built once into ~/.cache/jv3 (about 3 GB, a few minutes); without
Python 3.12, Java or root the tier skips with the reason, unless JV3_REQUIRE_DLC_STACK=1 (CI) makes
that a failure.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from serving.conftest import REPO, TINY, start_endpoint, stop_endpoint

from inference.settings import MAX_RECORDS, MAX_TEXTS
from infra.config import DeploySettings

from . import stack

# the first run builds the DLC stack (about 3 GB of downloads) inside the first test's setup
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _case(name, body, content_type="application/json", accept=None, path="/invocations", method="POST"):
    raw = body if isinstance(body, bytes) else (json.dumps(body) if not isinstance(body, str) else body).encode()
    headers = {"Content-Type": content_type} | ({"Accept": accept} if accept else {})
    return {"name": name, "method": method, "path": path, "headers": headers, "body_b64": base64.b64encode(raw).decode()}


TEXTS = ["Berlin is the capital of Germany.", "Die Katze schläft.", "猫在沙发上睡觉。"]
CASES = [
    _case("jina", {"data": [{"text": t} for t in TEXTS], "parameters": {"task": "retrieval.query"}}),
    _case("jina-strings-dims", {"data": TEXTS, "parameters": {"task": "retrieval.passage", "dimensions": 32}}),
    _case("jina-base64", {"data": TEXTS, "parameters": {"task": "separation", "embedding_type": "base64"}}),
    _case("jina-binary", {"data": TEXTS, "parameters": {"embedding_type": "binary"}}),
    _case("jina-ubinary", {"data": TEXTS, "parameters": {"embedding_type": "ubinary", "dimensions": 16}}),
    _case("jina-late-chunking", {"data": TEXTS, "parameters": {"task": "retrieval.passage", "late_chunking": True}}),
    _case("openai", {"input": TEXTS, "model": "jina-embeddings-v3"}),
    _case("openai-base64", {"input": TEXTS[0], "encoding_format": "base64", "dimensions": 8}),
    _case("tei", {"inputs": TEXTS, "normalize": True}),
    _case("jsonlines", "\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(TEXTS)) + "\n",
          content_type="application/jsonlines", accept="application/jsonlines"),  # fmt: skip
    _case("jsonlines-bad-line", '{"id": 1, "text": "fine"}\n{"id": 2, "text": 7}\n',
          content_type="application/jsonlines", accept="application/jsonlines"),  # fmt: skip
    _case("csv", "id,text\n1,\"Berlin, the capital\"\n2,Paris\n", content_type="text/csv", accept="text/csv"),
    # the client's mistakes: 4xx with a JSON body that names the bad value, on every runtime
    _case("unknown-task", {"data": TEXTS, "parameters": {"task": "retrival.query"}}),
    _case("too-many-dimensions", {"data": TEXTS, "parameters": {"dimensions": 4096}}),
    _case("not-json", b'{"data": ['),
    _case("invalid-utf8-json", b'{"input": "caf\xe9"}'),
    _case("invalid-utf8-csv", b"id,text\n1,caf\xe9\n", content_type="text/csv"),
    _case("unsupported-media", b"hello", content_type="application/x-npy"),
    _case("not-acceptable", {"input": "x"}, accept="image/png"),
    _case("empty-input", {"input": []}),
    _case("parameters-not-object", {"data": TEXTS, "parameters": []}),
    # the work caps (docs/wire-format.md, "Limits"): 413 naming the cap, before any compute, on every runtime
    _case("too-many-texts", {"data": ["x"] * (MAX_TEXTS + 1)}),
    _case("too-many-records", '"x"\n' * (MAX_RECORDS + 1), content_type="application/jsonlines",
          accept="application/jsonlines"),  # fmt: skip
]
OVER_CAP = {"too-many-texts": "JV3_MAX_TEXTS_PER_REQUEST", "too-many-records": "JV3_MAX_RECORDS_PER_REQUEST"}


@pytest.fixture(scope="module")
def venv():
    try:
        return stack.ensure_venv(log=lambda m: print(m, file=sys.stderr))
    except stack.StackUnavailable as exc:
        if os.environ.get("JV3_REQUIRE_DLC_STACK") == "1":
            pytest.fail(f"the DLC serving stack is required here but unavailable: {exc}")
        pytest.skip(f"the DLC serving stack cannot run here: {exc}")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    out = tmp_path_factory.mktemp("dlc") / "model.tar.gz"
    done = subprocess.run([sys.executable, "-m", "model_package", "--checkpoint", str(TINY), "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _environment(instance_type="ml.g5.xlarge", runtime="dlc", **extra) -> dict:
    """What the CDK stacks set on the Model (infra.config), for this instance type and runtime."""
    environ = {"JV3_INSTANCE_TYPE": instance_type, "JV3_RUNTIME": runtime}
    env = DeploySettings.resolve({}, environ).container_environment("realtime")
    return env | extra


@pytest.fixture(scope="module")
def served(venv, archive):
    record = stack.run_dlc(archive, _environment(), CASES, venv=venv)
    print(f"\nDLC stack cold start: first 200 on /ping {record['ping']['first_200_s']} s, "
          f"first vector {record.get('first_vector_s')} s", file=sys.stderr)  # fmt: skip
    return record


@pytest.fixture(scope="module")
def local():
    """The local server's answers to the same requests: the reference the DLC must match."""
    endpoint = start_endpoint(TINY)
    try:
        answers = {}
        for case in CASES:
            status, headers, body = endpoint.request(case["method"], case["path"], base64.b64decode(case["body_b64"]),
                                                     case["headers"])  # fmt: skip
            answers[case["name"]] = (status, {k.lower(): v for k, v in headers.items()}, body)
        return answers
    finally:
        stop_endpoint(endpoint)


def _parse(body: bytes, content_type: str):
    media = content_type.split(";")[0].strip()
    text = body.decode("utf-8")
    if media == "application/jsonlines":
        return [json.loads(line) for line in text.split("\n") if line]
    if media == "text/csv":
        return [line.split(",") for line in text.split("\n") if line]
    return json.loads(text)


def _same(a, b, where="body") -> None:
    """Equal structures; floats within 1e-5 (torch 2.6 here, this machine's torch there); base64 vectors decoded."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, str) and isinstance(b, str) and a != b:
        try:
            x = np.frombuffer(base64.b64decode(a, validate=True), "<f4")
            y = np.frombuffer(base64.b64decode(b, validate=True), "<f4")
        except ValueError:
            try:
                assert abs(float(a) - float(b)) <= 1e-5, where  # CSV cells
            except ValueError:
                raise AssertionError(f"{where}: {a!r} != {b!r}") from None
        else:
            assert np.allclose(x, y, atol=1e-5), where
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= 1e-5, f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_served_healthy_without_any_network_attempt(served):
    assert served["ping"]["healthy"], served["log"][-5000:]
    assert served["dns_queries"] == [], "a host name was looked up (a network attempt): " + ", ".join(served["dns_queries"])
    # code/lib is on sys.path: nothing was pip-installed at start-up
    assert "pip install" not in served["log"] and "Installing collected packages" not in served["log"]


@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_every_request_answers_as_the_local_server(served, local, case):
    got = next(r for r in served["responses"] if r["name"] == case)
    status, headers, body = local[case]
    assert got["status"] == status, base64.b64decode(got.get("body_b64") or b"")[:500]
    assert got["headers"]["content-type"].split(";")[0] == headers["content-type"].split(";")[0]
    _same(_parse(base64.b64decode(got["body_b64"]), got["headers"]["content-type"]), _parse(body, headers["content-type"]))
    if status >= 400:  # a JSON error body naming the problem, never a traceback
        error = json.loads(base64.b64decode(got["body_b64"]))["error"]
        assert error["code"] == status and error["message"] and "Traceback" not in error["message"]


@pytest.mark.parametrize("case", sorted(OVER_CAP))
def test_over_cap_requests_are_413_naming_the_cap_on_the_dlc(served, case):
    """The DLC handler applies the local/BYOC server's work caps (the comparison above checks the body)."""
    got = next(r for r in served["responses"] if r["name"] == case)
    error = json.loads(base64.b64decode(got["body_b64"]))["error"]
    assert got["status"] == 413 and error["type"] == "payload_too_large", error
    assert OVER_CAP[case] in error["message"] and "split" in error["message"]


def test_the_stacks_environment_selects_the_projects_handler_service(served):
    """TorchServe takes TS_DEFAULT_SERVICE_HANDLER over the toolkit's config: invalid UTF-8 is our 400."""
    assert _environment()["TS_DEFAULT_SERVICE_HANDLER"] == "jv3_inference.sagemaker_service"
    bad = next(r for r in served["responses"] if r["name"] == "invalid-utf8-json")
    assert bad["status"] == 400 and b"not valid UTF-8" in base64.b64decode(bad["body_b64"])


def test_toolkit_writes_one_worker_per_gpu(venv):
    """The toolkit's own config writer, given the stacks' environment for a 4-GPU and a 1-GPU instance."""
    script = ("import os, json, sys; os.environ.update(json.loads(sys.argv[1]));"
              "from sagemaker_pytorch_serving_container import torchserve as t;"
              "print(t._generate_ts_config_properties(t.DEFAULT_HANDLER_SERVICE))")  # fmt: skip
    for instance_type, workers in (("ml.g5.12xlarge", 4), ("ml.g5.xlarge", 1), ("ml.c6i.4xlarge", 1)):
        env = _environment(instance_type)
        done = subprocess.run([str(venv / "bin" / "python"), "-c", script, json.dumps(env)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert f'"minWorkers": {workers},' in done.stdout and f'"maxWorkers": {workers},' in done.stdout, instance_type
        assert f"default_workers_per_model={workers}" in done.stdout


def test_served_config_and_worker(served):
    config = served["ts_config"]
    assert '"minWorkers": 1,' in config and '"maxWorkers": 1,' in config
    assert served["log"].count("loaded jina-embeddings-v3 from") == 1


def test_a_body_over_jv3_max_request_bytes_is_the_handlers_413_and_over_torchserves_limit_its_own(venv, archive):
    """GIVEN JV3_MAX_REQUEST_BYTES below TorchServe's max_request_size WHEN bodies of each size arrive THEN
    one over ours is the handler's JSON 413 naming the variable, and one over TorchServe's is refused by
    TorchServe itself with an empty 413 (why the stacks set the two limits equal: docs/wire-format.md)."""
    limits = {"JV3_MAX_REQUEST_BYTES": "100000", "TS_MAX_REQUEST_SIZE": "200000", "SAGEMAKER_TS_MAX_REQUEST_SIZE": "200000"}
    cases = [_case("fits", {"data": ["x" * 1000] * 50}), _case("over-ours", {"data": ["x" * 1000] * 150}),
             _case("over-torchserve", {"data": ["x" * 1000] * 250})]  # fmt: skip
    record = stack.run_dlc(archive, _environment(**limits), cases, venv=venv)
    fits, ours, torchserve = record["responses"]
    assert fits["status"] == 200, base64.b64decode(fits["body_b64"])[:500]
    error = json.loads(base64.b64decode(ours["body_b64"]))["error"]
    assert ours["status"] == 413 and error["type"] == "payload_too_large" and error["field"] == "body"
    size = len(base64.b64decode(cases[1]["body_b64"]))
    assert error["message"].startswith(f"request body of {size} bytes is over the limit of 100000 bytes (JV3_MAX_REQUEST_BYTES")
    assert torchserve["status"] == 413 and base64.b64decode(torchserve["body_b64"]) == b""


def test_a_setting_the_model_rejects_stops_the_server(venv, archive):
    """JV3_DEFAULT_DIMENSIONS=1024 on a 64-dimension checkpoint: the worker's load fails; TorchServe would
    restart it forever while /ping says 200. Instead the server stops: /ping is refused from then on
    (SageMaker's health check fails and the deployment fails), and the log says why."""
    record = stack.run_dlc(archive, _environment(JV3_DEFAULT_DIMENSIONS="1024"), [], venv=venv,
                           ping_timeout_s=60, observe_s=30)  # fmt: skip
    log = record["log"]
    assert "JV3_DEFAULT_DIMENSIONS=1024 exceeds the model's 64 dimensions" in log
    assert "stopping TorchServe" in log
    statuses = [status for _, status in record["observed_pings"]]
    assert None in statuses, record["observed_pings"]
    refused_from = statuses.index(None)
    # once stopped, never healthy again: no restart loop behind a 200
    assert all(status is None for status in statuses[refused_from:]), record["observed_pings"]
    print(f"\nbroken setting: /ping refused from {record['observed_pings'][refused_from][0]} s after the frontend "
          f"first answered", file=sys.stderr)  # fmt: skip


# --- the BYOC image's entrypoint -------------------------------------------------------------------


@pytest.fixture(scope="module")
def byoc(archive):
    try:
        stack.check_tools()
    except stack.StackUnavailable as exc:
        pytest.skip(f"cannot isolate the BYOC entrypoint here: {exc}")
    record = stack.run_byoc(archive, _environment(runtime="byoc"), CASES, ping_timeout_s=180)
    print(f"\nBYOC entrypoint cold start: first 200 on /ping {record['ping']['first_200_s']} s, "
          f"first vector {record.get('first_vector_s')} s", file=sys.stderr)  # fmt: skip
    return record


def test_byoc_entrypoint_serves_from_opt_ml_model_without_network(byoc):
    assert byoc["ping"]["healthy"], byoc["log"][-5000:]
    assert byoc["dns_queries"] == [], ", ".join(byoc["dns_queries"])
    assert "listening on http://0.0.0.0:8080" in byoc["log"]  # `serve`: SageMaker's address and port
    assert "loaded /opt/ml/model" in byoc["log"]
    assert byoc["ping"]["seen"].get("200") == 1  # the first 200 ended the wait; 503s or refusals before it


@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_byoc_answers_as_the_local_server(byoc, local, case):
    got = next(r for r in byoc["responses"] if r["name"] == case)
    status, headers, body = local[case]
    assert got["status"] == status
    _same(_parse(base64.b64decode(got["body_b64"]), got["headers"]["content-type"]), _parse(body, headers["content-type"]))


def test_byoc_with_a_setting_the_model_rejects_is_never_healthy_and_exits(archive):
    try:
        stack.check_tools()
    except stack.StackUnavailable as exc:
        pytest.skip(f"cannot isolate the BYOC entrypoint here: {exc}")
    record = stack.run_byoc(archive, _environment(runtime="byoc", JV3_DEFAULT_DIMENSIONS="1024"), [],
                            ping_timeout_s=90)  # fmt: skip
    assert not record["ping"]["healthy"] and "200" not in record["ping"]["seen"], record["ping"]
    assert record["server_exited"]
    assert "JV3_DEFAULT_DIMENSIONS=1024 exceeds the model's 64 dimensions" in record["log"]


def test_dockerfile_lints_clean():
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    done = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
