"""Issue 9: the client as LangChain ``Embeddings``, inside a LangChain vector store, against the REAL
local endpoint: documents stored with retrieval.passage vectors, searched with retrieval.query ones,
at the dimensions asked for, sync and async."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

pytest.importorskip("langchain_core")

from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.vectorstores import InMemoryVectorStore  # noqa: E402

from jv3 import EmbeddingClient, InvalidArgument  # noqa: E402
from jv3.langchain import SageMakerJinaEmbeddings  # noqa: E402

DIMS = 32  # the tiny checkpoint is 64 wide: a Matryoshka size below it
TEXTS = [
    "Berlin is the capital of Germany.",
    "The mitochondrion is the powerhouse of the cell.",
    "Paris is known for the Eiffel Tower.",
    "Photosynthesis turns light into chemical energy.",
    "Grüße aus Köln, 机器学习",
]
QUERY = "Which city is the capital of Germany?"


@pytest.fixture
def client(loopback_runtime):
    return EmbeddingClient("local", runtime_client=loopback_runtime)


def cosine(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    return matrix @ vector / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(vector))


def expected_hits(client: EmbeddingClient, k: int) -> tuple[list[str], np.ndarray]:
    """The top ``k`` texts and scores, from vectors the client returns directly."""
    passages = client.embed(TEXTS, task="retrieval.passage", dimensions=DIMS)
    query = client.embed([QUERY], task="retrieval.query", dimensions=DIMS)[0]
    scores = cosine(passages, query)
    order = np.argsort(-scores)[:k]
    return [TEXTS[i] for i in order], scores[order]


@pytest.mark.slow
def test_a_vector_store_holds_passage_vectors_and_searches_with_query_vectors(client):
    # GIVEN the endpoint as LangChain Embeddings in LangChain's in-memory vector store
    embeddings = SageMakerJinaEmbeddings(client=client, dimensions=DIMS)
    store = InMemoryVectorStore(embedding=embeddings)
    # WHEN texts are added and searched
    ids = store.add_texts(TEXTS, metadatas=[{"n": i} for i in range(len(TEXTS))])
    hits = store.similarity_search_with_score(QUERY, k=3)
    # THEN the stored vectors are the client's retrieval.passage vectors at DIMS, bit for bit
    stored = np.array([store.store[i]["vector"] for i in ids], dtype=np.float32)
    direct = client.embed(TEXTS, task="retrieval.passage", dimensions=DIMS)
    assert stored.shape == (len(TEXTS), DIMS)
    np.testing.assert_array_equal(stored, direct)
    assert not np.allclose(stored, client.embed(TEXTS, task="retrieval.query", dimensions=DIMS), atol=1e-4)
    # AND the query is embedded with retrieval.query at DIMS, and the hits are those its vector ranks first
    query = client.embed([QUERY], task="retrieval.query", dimensions=DIMS)[0]
    assert embeddings.embed_query(QUERY) == query.tolist()
    texts, scores = expected_hits(client, 3)
    assert [doc.page_content for doc, _ in hits] == texts
    np.testing.assert_allclose([score for _, score in hits], scores, rtol=1e-5)
    assert [doc.page_content for doc in store.similarity_search(QUERY, k=3)] == texts
    assert hits[0][0].metadata == {"n": TEXTS.index(texts[0])}


class ThreadRecordingClient(EmbeddingClient):
    """The real client, noting the thread of every ``embed`` call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads: list[int] = []

    def embed(self, texts, **kwargs):
        self.threads.append(threading.get_ident())
        return super().embed(texts, **kwargs)


@pytest.mark.slow
def test_the_async_methods_are_real_and_run_off_the_event_loop(client, loopback_runtime):
    assert SageMakerJinaEmbeddings.aembed_query is not Embeddings.aembed_query
    assert SageMakerJinaEmbeddings.aembed_documents is not Embeddings.aembed_documents
    recording = ThreadRecordingClient("local", runtime_client=loopback_runtime)
    embeddings = SageMakerJinaEmbeddings(client=recording, dimensions=DIMS)

    async def scenario():
        store = InMemoryVectorStore(embedding=embeddings)
        ids = await store.aadd_texts(TEXTS)
        hits = await store.asimilarity_search(QUERY, k=2)
        query, documents = await asyncio.gather(embeddings.aembed_query(QUERY), embeddings.aembed_documents(TEXTS[:2]))
        return store, ids, hits, query, documents, threading.get_ident()

    store, ids, hits, query, documents, loop_thread = asyncio.run(scenario())
    assert len(recording.threads) == 4 and loop_thread not in recording.threads
    direct = client.embed(TEXTS, task="retrieval.passage", dimensions=DIMS)
    np.testing.assert_array_equal(np.array([store.store[i]["vector"] for i in ids], dtype=np.float32), direct)
    assert [doc.page_content for doc in hits] == expected_hits(client, 2)[0]
    assert query == client.embed([QUERY], task="retrieval.query", dimensions=DIMS)[0].tolist()
    assert len(documents) == 2 and all(len(v) == DIMS for v in documents)


def test_arguments_are_checked_when_the_embeddings_are_made(aws_env):
    with pytest.raises(InvalidArgument, match="dimensions 0 is out of range"):
        SageMakerJinaEmbeddings("jv3", dimensions=0, endpoint_url="http://127.0.0.1:9")
    with pytest.raises(InvalidArgument, match="pass an endpoint name or an EmbeddingClient"):
        SageMakerJinaEmbeddings()
    built = SageMakerJinaEmbeddings("jv3", dimensions=64, endpoint_url="http://127.0.0.1:9", timeout=3)
    assert isinstance(built, Embeddings) and built.client.timeout == 3 and built.dimensions == 64
    with pytest.raises(InvalidArgument, match="are for a new EmbeddingClient"):
        SageMakerJinaEmbeddings(client=built.client, timeout=3)


@pytest.mark.slow
def test_the_readme_example_runs_against_the_local_endpoint(local_endpoint, client):
    from client_support import REPO

    readme = (REPO / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    (example,) = [b for b in blocks if "jv3.langchain" in b]
    # the same code, pointed at the local endpoint
    code = example.replace('"my-endpoint", dimensions=32', f'"local", endpoint_url={local_endpoint.url!r}, dimensions={DIMS}')
    assert code != example
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    store = namespace["store"]
    texts = [entry["text"] for entry in store.store.values()]
    stored = np.array([entry["vector"] for entry in store.store.values()], dtype=np.float32)
    np.testing.assert_array_equal(stored, client.embed(texts, task="retrieval.passage", dimensions=DIMS))
    assert store.similarity_search("Which city is the capital of Germany?", k=1)[0].page_content in texts
