"""docs/clients.md's examples are the code the client tests run: how they are found and run.

Each example is a ```python block after a ``<!-- example: NAME -->`` marker. ``run_examples`` runs some
of them, one after another, in one fresh interpreter (the clients' imports are slow, and the
SageMaker SDK lives in a virtual environment of its own), with ``JV3_URL`` pointing at the local
endpoint, and returns each example's top-level variables that JSON can carry, or its traceback.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .conftest import REPO

CLIENTS_DOC = REPO / "docs" / "clients.md"
EXAMPLE = re.compile(r"<!-- example: ([\w-]+) -->\s*```python\n(.*?)```", re.S)
# Which test file runs each example; a new example without a test fails test_every_example_is_run.
RUN_BY = {
    "openai": "test_clients_openai.py",
    "litellm": "test_clients_litellm.py",
    "jina-sagemaker": "test_clients_sagemaker.py",
    "jina-sagemaker-batch": "test_clients_sagemaker.py",
    "sagemaker-sdk-v2": "test_clients_sagemaker.py",
    "sagemaker-core": "test_clients_sagemaker.py",
}

# Runs [(name, code), ...] from argv[1]; writes {name: {"vars": {...}} | {"error": traceback}} to argv[2]
# (a file, not stdout: the clients print and log there).
_RUNNER = r"""
import json, sys, traceback

def plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(type(value).__name__)

out = {}
for name, code in json.load(open(sys.argv[1])):
    space = {"__name__": "__example__"}
    try:
        exec(compile(code, f"<example {name}>", "exec"), space)
    except BaseException:
        out[name] = {"error": traceback.format_exc()}
        continue
    kept = {}
    for key, value in space.items():
        if key.startswith("_"):
            continue
        try:
            kept[key] = plain(value)
        except TypeError:
            pass  # modules, clients, responses: not what the tests compare
    out[name] = {"vars": kept}
json.dump(out, open(sys.argv[2], "w"))
"""


def examples() -> dict[str, str]:
    return {name: code for name, code in EXAMPLE.findall(CLIENTS_DOC.read_text())}


def client_env(url: str, **extra: str) -> dict[str, str]:
    """The process environment of an example: the endpoint's URL, dummy AWS credentials and region, and
    no AWS setting of the machine that could send a call elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "JV3_"))}
    env.update(
        JV3_URL=url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        SAGEMAKER_SUPPRESS_V2_WARNING="1",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        **extra,
    )
    return env


def run_examples(named: list[str] | list[tuple[str, str]], url: str, *, python: str = sys.executable,
                 timeout: float = 240) -> dict:  # fmt: skip
    """Run examples (names from docs/clients.md, or (name, code) pairs) in one new interpreter."""
    docs = examples()
    pairs = [(n, docs[n]) if isinstance(n, str) else n for n in named]
    with tempfile.TemporaryDirectory() as tmp:
        source, result = Path(tmp) / "examples.json", Path(tmp) / "result.json"
        source.write_text(json.dumps(pairs))
        done = subprocess.run([python, "-c", _RUNNER, str(source), str(result)], env=client_env(url), cwd=tmp,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if done.returncode != 0 or not result.exists():
            raise AssertionError(f"the example runner failed ({done.returncode}): {done.stderr[-3000:]}")
        return json.loads(result.read_text())


def outcome(results: dict, name: str) -> dict:
    """The variables of example ``name``; its traceback as the failure when it raised."""
    got = results[name]
    assert "error" not in got, f"example {name!r} raised:\n{got['error']}"
    return got["vars"]


def direct(endpoint, texts: list[str], **parameters) -> np.ndarray:
    """The vectors a plain ``POST /invocations`` in Jina's format gets: what every client must match."""
    status, body = endpoint.post_json({"data": list(texts), "parameters": parameters})
    assert status == 200, body
    return np.asarray([item["embedding"] for item in body["data"]], dtype=np.float32)


def assert_vectors(got, expected, tol: float = 1e-5) -> None:
    got = np.asarray(got, dtype=np.float32)
    assert got.shape == np.shape(expected), (got.shape, np.shape(expected))
    np.testing.assert_allclose(got, expected, atol=tol)


def test_every_example_is_run_by_a_client_test():
    names = list(examples())
    assert len(names) == len(set(names)), "two examples share a name"
    assert set(names) == set(RUN_BY), f"docs/clients.md examples {sorted(names)} vs the tests' {sorted(RUN_BY)}"
    for name, test_file in RUN_BY.items():
        assert f'"{name}"' in (Path(__file__).parent / test_file).read_text(), f"{test_file} does not run {name!r}"


def test_examples_compile():
    for name, code in examples().items():
        compile(code, f"<example {name}>", "exec")


def test_the_readme_boto3_example_runs_as_written(endpoint, capsys):
    """README's plain-boto3 example, pointed at this endpoint's port: 32 dimensions of the tiny checkpoint."""
    readme = (REPO / "README.md").read_text()
    (example,) = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:] if "invoke_endpoint(EndpointName" in b]
    code = example.replace("http://127.0.0.1:8080", endpoint.url)
    assert code != example
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the documented example itself
    printed = capsys.readouterr().out
    body = ast.literal_eval(printed.strip())
    assert len(body["data"]) == 1 and len(body["data"][0]["embedding"]) == 32
