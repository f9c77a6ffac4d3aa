"""tests/contract/*.json, the examples both sides read: the endpoint answers each with the same shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import REPO, TINY, start_endpoint, stop_endpoint

EXAMPLES = sorted((REPO / "tests" / "contract").glob("*.json"))
SERVABLE = [p for p in EXAMPLES if json.loads(p.read_text()).get("request") is not None or "request_lines" in json.loads(p.read_text())]


def same_shape(expected, got, path="$"):
    """Keys, list lengths, vector lengths and types; not values (the examples' vectors are random)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict), path
        assert set(got) - {"field"} == set(expected) - {"field"}, f"{path}: {sorted(got)} vs {sorted(expected)}"
        for key in expected:
            if key in got and key != "message":
                same_shape(expected[key], got[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), f"{path}: {got!r:.80} vs {len(expected)} items"
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            same_shape(e, g, f"{path}[{i}]")
    elif isinstance(expected, bool) or expected is None:
        assert got == expected or (expected is None and got is None), path
    elif isinstance(expected, (int, float)):
        assert isinstance(got, (int, float)) and not isinstance(got, bool), path
    elif isinstance(expected, str):
        assert isinstance(got, str) and (len(got) == len(expected) or path.endswith(("task", "model", "type"))), path


@pytest.fixture(scope="module")
def endpoints(endpoint):
    started = {}

    def get(environment: dict | None):
        if not environment:
            return endpoint
        key = tuple(sorted(environment.items()))
        if key not in started:
            started[key] = start_endpoint(TINY, env=environment)
        return started[key]

    yield get
    for ep in started.values():
        stop_endpoint(ep)


@pytest.mark.parametrize("path", SERVABLE, ids=[p.stem for p in SERVABLE])
def test_contract_example(endpoints, path: Path):
    example = json.loads(path.read_text())
    ep = endpoints(example.get("environment"))
    if "request_lines" in example:
        body = "\n".join(example["request_lines"]) + "\n"
    else:
        body = json.dumps(example["request"])
    status, headers, out = ep.request("POST", "/invocations", body, {"Content-Type": example["content_type"], "Accept": example["accept"]})
    assert status == example["status"], out
    assert headers["Content-Type"] == example["accept"]
    if "response_lines" in example:
        same_shape(example["response_lines"], [json.loads(line) for line in out.decode().splitlines()])
    else:
        got = json.loads(out)
        same_shape(example["response"], got)
        if status >= 400:
            assert got["error"].get("field") == example["response"]["error"].get("field")
