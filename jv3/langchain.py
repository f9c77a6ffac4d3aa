"""jina-embeddings-v3 on SageMaker as LangChain ``Embeddings`` (``pip install 'jina-v3-sagemaker[langchain]'``).

    from langchain_core.vectorstores import InMemoryVectorStore
    from jv3.langchain import SageMakerJinaEmbeddings

    embeddings = SageMakerJinaEmbeddings("my-endpoint", dimensions=256)
    store = InMemoryVectorStore(embeddings)
    store.add_texts(["Berlin is the capital of Germany.", "Paris is the capital of France."])
    store.similarity_search("capital of Germany", k=1)

Documents are embedded with the ``retrieval.passage`` adapter and queries with ``retrieval.query``
(jina-embeddings-v3's asymmetric retrieval pair), both at ``dimensions`` (Matryoshka; None: the
model's full size), through one ``EmbeddingClient``: its request splitting, retries, typed errors and
``PartialFailure`` apply unchanged. The async methods run the blocking client on a thread (the
event loop's default executor, or ``executor``), so they never block the loop.

Only this module needs ``langchain-core``; ``import jv3`` does not.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import Executor

try:
    from langchain_core.embeddings import Embeddings
except ImportError as exc:  # pragma: no cover - exercised by the import-boundary test
    raise ImportError(
        "jv3.langchain needs langchain-core: pip install 'jina-v3-sagemaker[langchain]' (or langchain-core)"
    ) from exc

from .errors import InvalidArgument
from .realtime import EmbeddingClient
from .wire import check_dimensions


class SageMakerJinaEmbeddings(Embeddings):
    """LangChain ``Embeddings`` over a jina-embeddings-v3 SageMaker endpoint.

    Pass an endpoint name (and any ``EmbeddingClient`` keyword: ``region_name``, ``endpoint_url``,
    ``runtime_client``, ``timeout``, ``deadline``, ...) or a ready ``client``. ``dimensions`` applies
    to documents and queries alike, so that they can be compared.
    """

    def __init__(
        self,
        endpoint_name: str | None = None,
        *,
        client: EmbeddingClient | None = None,
        dimensions: int | None = None,
        executor: Executor | None = None,
        **client_options,
    ):
        if (endpoint_name is None) == (client is None):
            raise InvalidArgument("pass an endpoint name or an EmbeddingClient (client=...), not both or neither")
        if client is not None and client_options:
            raise InvalidArgument(f"options {sorted(client_options)} are for a new EmbeddingClient, not client=")
        self.client = client if client is not None else EmbeddingClient(endpoint_name, **client_options)
        self.dimensions = check_dimensions(dimensions)
        self.executor = executor

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Passages to search, as ``retrieval.passage`` vectors (lists of floats, input order)."""
        return self.client.embed_documents(texts, dimensions=self.dimensions)

    def embed_query(self, text: str) -> list[float]:
        """One search query, as a ``retrieval.query`` vector."""
        return self.client.embed_query(text, dimensions=self.dimensions)

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await self._in_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await self._in_thread(self.embed_query, text)

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(endpoint_name={self.client.endpoint_name!r}, dimensions={self.dimensions!r})"

