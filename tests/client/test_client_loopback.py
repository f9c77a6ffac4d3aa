"""The client against the REAL local endpoint over HTTP: boto3 sagemaker-runtime with endpoint_url,
the jv3 CLI, and `jv3 batch local` (which starts its own server)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from client_support import REPO, TINY
from typer.testing import CliRunner

from jv3 import EmbeddingClient, InvalidRequestError, wire
from jv3.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture
def sent(loopback_runtime):
    """Sizes of the request bodies boto3 sends during one test."""
    sizes: list[int] = []

    def record(params, **_):
        sizes.append(len(params["Body"]))

    loopback_runtime.meta.events.register("before-parameter-build.sagemaker-runtime.InvokeEndpoint", record)
    yield sizes
    loopback_runtime.meta.events.unregister("before-parameter-build.sagemaker-runtime.InvokeEndpoint", record)


def test_inputs_over_6_mb_are_split_kept_in_order_and_equal_one_by_one(loopback_runtime, sent):
    # GIVEN ~6.7 MB of texts (multi-byte, so bytes ≠ characters)
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz ")
    # distinct openings (the tiny model reads only the first 256 tokens), then ~9 kB of filler
    texts = ["".join(rng.choice(letters, 120)) + " Grüße aus Köln" * 600 for _ in range(700)]
    assert sum(wire.item_bytes(t) for t in texts) > 6_000_000
    client = EmbeddingClient("local", runtime_client=loopback_runtime, max_batch_size=10_000, max_concurrency=2)
    # WHEN they are embedded in one call
    vectors = client.embed(texts, task="retrieval.passage", dimensions=64)
    # THEN several requests went out, each under the limit, and the rows are in input order
    assert len(sent) >= 2 and max(sent) <= wire.MAX_REQUEST_BYTES
    assert vectors.shape == (700, 64)
    sample = [0, 1, 350, 698, 699]
    one_by_one = np.concatenate([client.embed([texts[i]], task="retrieval.passage", dimensions=64) for i in sample])
    assert cosine_rows(vectors[sample], one_by_one).min() > 0.99999
    assert cosine_rows(vectors[:-1], vectors[1:]).max() < 1 - 1e-7  # rows differ: no row was duplicated


@pytest.mark.parametrize("task", wire.TASKS)
def test_every_task_and_encoding(loopback_runtime, task):
    client = EmbeddingClient("local", runtime_client=loopback_runtime)
    texts = ["hello world", "Grüße", "机器学习", ""]
    floats = client.embed(texts, task=task, dimensions=32)
    assert floats.dtype == np.float32 and floats.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(floats, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(client.embed(texts, task=task, dimensions=32, embedding_type="base64"), floats)
    ubinary = client.embed(texts, task=task, dimensions=32, embedding_type="ubinary")
    binary = client.embed(texts, task=task, dimensions=32, embedding_type="binary")
    np.testing.assert_array_equal(ubinary, np.packbits(floats > 0, axis=1))
    np.testing.assert_array_equal(binary, (ubinary.astype(np.int16) - 128).astype(np.int8))
    assert (ubinary.dtype, binary.dtype, binary.shape) == (np.uint8, np.int8, (4, 4))
    raw = client.embed(texts[:2], task=task, normalized=False)
    assert raw.shape == (2, 64) and not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_tasks_select_different_adapters(loopback_runtime):
    client = EmbeddingClient("local", runtime_client=loopback_runtime)
    by_task = {task: client.embed(["the same text"], task=task)[0] for task in wire.TASKS}
    assert len({v.tobytes() for v in by_task.values()}) == len(wire.TASKS)
    assert client.embed_query("the same text") == pytest.approx(by_task["retrieval.query"].tolist(), abs=1e-6)


def test_late_chunking_embeds_chunks_in_the_context_of_the_document(loopback_runtime):
    client = EmbeddingClient("local", runtime_client=loopback_runtime, max_batch_size=1)
    chunks = ["Berlin is the capital of Germany.", "Its population is 3.85 million.", "It is also a state."]
    late = client.embed(chunks, task="retrieval.passage", late_chunking=True)
    alone = client.embed(chunks, task="retrieval.passage")
    assert late.shape == alone.shape == (3, 64)
    assert not np.allclose(late, alone, atol=1e-4)  # each chunk saw its neighbours


def test_a_container_400_reaches_the_caller_typed_with_its_field(loopback_runtime):
    client = EmbeddingClient("local", runtime_client=loopback_runtime)
    with pytest.raises(InvalidRequestError) as info:
        client.embed(["hello"], dimensions=1000)  # valid for the real model, not for this 64-wide one
    assert (info.value.status, info.value.error_type, info.value.field) == (400, "invalid_request", "dimensions")
    assert "1000" in info.value.message


def test_cli_embed_against_the_local_endpoint(local_endpoint, loopback_runtime):
    result = runner.invoke(app, ["embed", "--endpoint-url", local_endpoint.url, "-d", "16", "-t", "separation",
                                 "hello", "world"])
    assert result.exit_code == 0, result.output
    expected = EmbeddingClient("local", runtime_client=loopback_runtime).embed(["hello", "world"], task="separation",
                                                                               dimensions=16)
    np.testing.assert_allclose(json.loads(result.stdout), expected, atol=1e-6)


def test_batch_local_rehearses_a_job_with_malformed_lines(tmp_path, loopback_runtime):
    # GIVEN 3,000 JSON Lines records, a few of them malformed
    bad = {100: "not json {", 555: '{"id": "doc-555"}', 1200: "", 2500: '{"text": 5, "id": "doc-2500"}'}
    lines = [bad.get(i, json.dumps({"text": f"document number {i}", "id": f"doc-{i}"})) for i in range(2999)]
    lines.append('"a bare string"')
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    out_dir = tmp_path / "out"
    # WHEN the job is rehearsed with small mini-batches
    result = runner.invoke(app, ["batch", "local", "--model-dir", str(TINY), "--input", str(corpus), "--output",
                                 str(out_dir), "--task", "retrieval.passage", "--dimensions", "16",
                                 "--max-payload-mb", "0.02", "--max-concurrent", "2", "--no-progress"],
                           env={"PYTHONPATH": str(REPO)})
    assert result.exit_code == 0, result.output
    # THEN there is one output line per input line, ids kept, errors as records, nothing else written
    assert sorted(p.name for p in out_dir.iterdir()) == ["corpus.jsonl.out"]
    records = [json.loads(line) for line in (out_dir / "corpus.jsonl.out").read_text().splitlines()]
    assert len(records) == 3000
    errors = {i for i, r in enumerate(records) if "error" in r}
    assert errors == set(bad)
    assert records[555]["id"] == "doc-555" and records[2500]["id"] == "doc-2500"
    assert all(records[i]["error"]["code"] == 400 for i in bad)
    good = [i for i in range(2999) if i not in bad]
    assert [records[i]["id"] for i in good] == [f"doc-{i}" for i in good]
    assert records[2999]["id"] == 2999 and len(records[2999]["embedding"]) == 16
    # AND the vectors are those of the real-time path with the job's task and size
    sample = [0, 1, 1500, 2998]
    online = EmbeddingClient("local", runtime_client=loopback_runtime).embed(
        [f"document number {i}" for i in sample], task="retrieval.passage", dimensions=16)
    assert cosine_rows(np.array([records[i]["embedding"] for i in sample]), online).min() > 0.99999
    assert "records:  3,000 (4 errors)" in result.stdout and "per million documents" in result.stdout
