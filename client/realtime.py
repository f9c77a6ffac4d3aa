"""``EmbeddingClient``: embeddings from a real-time SageMaker endpoint as numpy arrays.

One call of ``embed`` validates its arguments, splits the texts into requests that stay under
SageMaker's 6 MB limits (request bodies are measured as encoded JSON; responses are estimated),
sends them on a bounded thread pool, retries what is worth retrying, and puts the rows back in
input order.

Wire encodings: ``embedding_type="float"`` and ``"base64"`` both return float32 arrays of shape
(n, d). base64 is only a transport, the same little-endian float32 numbers in about a quarter of the
response bytes, so it lets more texts share one request; ``"binary"`` (int8) and ``"ubinary"``
(uint8) return the packed sign bits, shape (n, ceil(d/8)).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

import botocore.exceptions
import numpy as np
from tqdm.auto import tqdm

from . import aws
from .errors import ClientError, EndpointUnavailable, InvalidArgument, ProtocolError
from .retry import RetryPolicy
from .wire import (
    CONTENT_TYPE,
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    EmbedParams,
    error_from_botocore,
    output_dtype,
    output_width,
    parse_response,
    plan_requests,
    request_body,
    validate_params,
    validate_texts,
)

DEFAULT_TASK = "text-matching"


class EmbeddingClient:
    """Embeddings from a SageMaker real-time endpoint serving jina-embeddings-v3.

    ``runtime_client`` is any boto3 ``sagemaker-runtime`` client (a Stubber's, one pointed at a
    local endpoint with ``endpoint_url``); by default one is made for ``region_name`` or, with
    ``endpoint_url``, for a local endpoint. ``progress=None`` shows a progress bar only for inputs of
    ``progress_threshold`` texts or more that need several requests.
    """

    def __init__(
        self,
        endpoint_name: str,
        *,
        region_name: str | None = None,
        runtime_client=None,
        endpoint_url: str | None = None,
        max_batch_size: int = 128,
        max_concurrency: int = 4,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        retry: RetryPolicy | None = None,
        progress: bool | None = None,
        progress_threshold: int = 1000,
        target_variant: str | None = None,
    ):
        if not endpoint_name or not isinstance(endpoint_name, str):
            raise InvalidArgument(f"endpoint_name must be a non-empty string, got {endpoint_name!r}")
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("max_concurrency", max_concurrency),
            ("max_request_bytes", max_request_bytes),
            ("max_response_bytes", max_response_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
        self.endpoint_name = endpoint_name
        self.max_batch_size = max_batch_size
        self.max_concurrency = max_concurrency
        self.max_request_bytes = max_request_bytes
        self.max_response_bytes = max_response_bytes
        self.retry = retry or RetryPolicy()
        self.progress = progress
        self.progress_threshold = progress_threshold
        self.target_variant = target_variant
        self.runtime = runtime_client or aws.runtime_client(
            region_name=region_name, endpoint_url=endpoint_url, max_pool_connections=max_concurrency
        )

    # ---- public ---------------------------------------------------------------------------------

    def embed(
        self,
        texts: Sequence[str],
        *,
        task: str = DEFAULT_TASK,
        dimensions: int | None = None,
        late_chunking: bool = False,
        normalized: bool = True,
        embedding_type: str = "float",
        truncate: bool = True,
    ) -> np.ndarray:
        """Embed ``texts``; returns an (n, d) array in input order (see the module doc for dtypes).

        With ``late_chunking=True`` the texts are the consecutive chunks of ONE document: they go in
        one request (refused with ``RequestTooLarge`` if it would exceed the limit) and each chunk's
        vector sees the whole document.
        """
        texts = validate_texts(texts)
        params = validate_params(
            task=task,
            dimensions=dimensions,
            late_chunking=late_chunking,
            normalized=normalized,
            embedding_type=embedding_type,
            truncate=truncate,
        )
        if not texts:
            return np.empty((0, output_width(params.dimensions, embedding_type)), dtype=output_dtype(embedding_type))
        ranges = plan_requests(
            texts,
            params,
            max_batch_size=self.max_batch_size,
            max_request_bytes=self.max_request_bytes,
            max_response_bytes=self.max_response_bytes,
        )
        parts: list[np.ndarray | None] = [None] * len(ranges)
        show = self.progress if self.progress is not None else (
            len(ranges) > 1 and len(texts) >= self.progress_threshold
        )
        with tqdm(total=len(texts), unit="text", desc="embedding", disable=not show, file=sys.stderr) as bar:
            if len(ranges) == 1 or self.max_concurrency == 1:
                for k, (start, stop) in enumerate(ranges):
                    parts[k] = self._embed_request(texts[start:stop], params)
                    bar.update(stop - start)
            else:
                pool = ThreadPoolExecutor(min(self.max_concurrency, len(ranges)), thread_name_prefix="jv3-embed")
                try:
                    futures = {
                        pool.submit(self._embed_request, texts[start:stop], params): k
                        for k, (start, stop) in enumerate(ranges)
                    }
                    for future in as_completed(futures):
                        k = futures[future]
                        parts[k] = future.result()
                        bar.update(ranges[k][1] - ranges[k][0])
                finally:
                    # the first error leaves; requests not yet started are dropped, not sent
                    pool.shutdown(wait=True, cancel_futures=True)
        widths = {p.shape[1] for p in parts}
        if len(widths) > 1:
            raise ProtocolError(f"requests of one call came back with different widths {sorted(widths)}")
        return np.concatenate(parts, axis=0)

    def embed_documents(self, texts: Sequence[str], *, dimensions: int | None = None) -> list[list[float]]:
        """LangChain's ``Embeddings.embed_documents``: passages for retrieval, as lists of floats."""
        return self.embed(texts, task="retrieval.passage", dimensions=dimensions).tolist()

    def embed_query(self, text: str, *, dimensions: int | None = None) -> list[float]:
        """LangChain's ``Embeddings.embed_query``: one search query, as a list of floats."""
        if not isinstance(text, str):
            raise InvalidArgument(f"query must be a string, got {type(text).__name__}")
        return self.embed([text], task="retrieval.query", dimensions=dimensions)[0].tolist()

    # ---- one request ----------------------------------------------------------------------------

    def _embed_request(self, texts: Sequence[str], params: EmbedParams) -> np.ndarray:
        body = request_body(texts, params)
        raw = self.retry.call(lambda: self._invoke(body))
        return parse_response(raw, expected=len(texts), embedding_type=params.embedding_type)

    def _invoke(self, body: bytes) -> bytes:
        kwargs = {
            "EndpointName": self.endpoint_name,
            "Body": body,
            "ContentType": CONTENT_TYPE,
            "Accept": CONTENT_TYPE,
        }
        if self.target_variant:
            kwargs["TargetVariant"] = self.target_variant
        try:
            response = self.runtime.invoke_endpoint(**kwargs)
            return response["Body"].read()
        except botocore.exceptions.ClientError as exc:
            raise error_from_botocore(exc) from exc
        except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as exc:
            raise EndpointUnavailable(f"cannot reach endpoint {self.endpoint_name!r}: {exc}") from exc
        except botocore.exceptions.NoCredentialsError as exc:
            raise ClientError(
                "no AWS credentials found; configure them (aws configure, AWS_PROFILE) or pass endpoint_url "
                "for a local endpoint"
            ) from exc
