"""``EmbeddingClient``: embeddings from a real-time SageMaker endpoint as numpy arrays.

One call of ``embed`` validates its arguments, splits the texts into requests that stay under
SageMaker's 6 MB limits (request bodies are measured as encoded JSON; responses are estimated),
sends them on a bounded thread pool, retries what is worth retrying, and puts the rows back in
input order.

Nothing silently wrong, nothing lost:

* every response is checked (``wire.parse_response``): as many vectors as texts sent, the size
  ``dimensions`` asks for (else one size for all), finite values, ``index`` a permutation; a
  violation is ``BadResponse``, never returned;
* a request that fails does not discard the others: only it is retried (``retry``), and if it
  still fails ``embed`` raises ``PartialFailure`` carrying the vectors that succeeded and the
  positions of the texts that failed (the error itself when no text succeeded);
* a request that times out is split in halves (down to one text) rather than sent again as it was;
* ``timeout`` bounds each attempt (botocore's connect and read timeouts, on the client this class
  builds) and ``deadline`` the whole call: past it, ``embed`` raises ``DeadlineExceeded`` (or
  ``PartialFailure`` with it) instead of waiting on a hung endpoint.

Wire encodings: ``embedding_type="float"`` and ``"base64"`` both return float32 arrays of shape
(n, d). base64 is only a transport, the same little-endian float32 numbers in about a quarter of the
response bytes, so it lets more texts share one request; ``"binary"`` (int8) and ``"ubinary"``
(uint8) return the packed sign bits, shape (n, ceil(d/8)).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from . import aws
from .dispatch import Abandoned, dispatch
from .errors import BadResponse, EndpointTimeout, InvalidArgument, PartialFailure
from .invoke import invoke
from .retry import RetryPolicy
from .wire import (
    DEFAULT_TASK,
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    EmbedParams,
    no_vectors,
    output_dtype,
    output_width,
    parse_response,
    plan_requests,
    request_body,
    validate_call,
)


class EmbeddingClient:
    """Embeddings from a SageMaker real-time endpoint serving jina-embeddings-v3.

    ``runtime_client`` is any boto3 ``sagemaker-runtime`` client (a Stubber's, one pointed at a
    local endpoint with ``endpoint_url``); by default one is made for ``region_name`` or, with
    ``endpoint_url``, for a local endpoint. ``progress=None`` shows a progress bar only for inputs of
    ``progress_threshold`` texts or more that need several requests.

    ``timeout`` (seconds) bounds each attempt of each request: it is botocore's ``read_timeout`` and
    ``connect_timeout`` of the client built here (default 70 s and 10 s; an injected
    ``runtime_client`` keeps its own). A request that times out is split, not re-sent. ``deadline``
    (seconds) bounds a whole ``embed`` call, retries and backoff included; None waits as long as the
    retries take. After ``retry.max_attempts × max_concurrency`` timeouts in a row with no answer in
    between, the endpoint is taken to be hung and the rest of the call is not sent.
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
        timeout: float | None = None,
        deadline: float | None = None,
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
        for name, value in (("timeout", timeout), ("deadline", deadline)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf
            ):
                raise InvalidArgument(f"{name} must be a positive number of seconds or None, got {value!r}")
        self.endpoint_name = endpoint_name
        self.max_batch_size = max_batch_size
        self.max_concurrency = max_concurrency
        self.max_request_bytes = max_request_bytes
        self.max_response_bytes = max_response_bytes
        self.retry = retry or RetryPolicy()
        self.progress = progress
        self.progress_threshold = progress_threshold
        self.target_variant = target_variant
        self.timeout = timeout
        self.deadline = deadline
        timeouts = {"read_timeout": timeout, "connect_timeout": timeout} if timeout is not None else {}
        self.runtime = runtime_client or aws.runtime_client(
            region_name=region_name, endpoint_url=endpoint_url, max_pool_connections=max_concurrency, **timeouts
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
        one request (refused with ``RequestTooLarge`` if it would exceed the limit, never split) and
        each chunk's vector sees the whole document.

        Raises ``PartialFailure`` when some texts were embedded and others failed (``.vectors``,
        ``.failed_indices``, ``.error``), the error itself when none was, ``BadResponse`` for an
        answer that is wrong, ``DeadlineExceeded`` past ``deadline``.
        """
        texts, params = validate_call(
            texts,
            {
                "task": task,
                "dimensions": dimensions,
                "late_chunking": late_chunking,
                "normalized": normalized,
                "embedding_type": embedding_type,
                "truncate": truncate,
            },
        )
        if not texts:
            return no_vectors(params.dimensions, embedding_type)
        ranges = plan_requests(
            texts,
            params,
            max_batch_size=self.max_batch_size,
            max_request_bytes=self.max_request_bytes,
            max_response_bytes=self.max_response_bytes,
        )
        show = self.progress if self.progress is not None else (
            len(ranges) > 1 and len(texts) >= self.progress_threshold
        )

        def send(start: int, stop: int, stopped: threading.Event, deadline_at: float | None) -> np.ndarray:
            return self._embed_request(texts[start:stop], params, stopped=stopped, deadline_at=deadline_at)

        with tqdm(total=len(texts), unit="text", desc="embedding", disable=not show, file=sys.stderr) as bar:
            outcome = dispatch(
                send,
                ranges,
                workers=self.max_concurrency,
                split_timeouts=not params.late_chunking,
                max_timeouts_in_a_row=self.retry.max_attempts * self.max_concurrency,
                deadline=self.deadline,
                on_done=bar.update,
            )
        return _assemble(len(texts), params, outcome.done, outcome.failed)

    def embed_documents(self, texts: Sequence[str], *, dimensions: int | None = None) -> list[list[float]]:
        """Passages for retrieval (task ``retrieval.passage``), as lists of floats: LangChain's
        ``embed_documents`` (``jv3.langchain`` wraps this client as LangChain ``Embeddings``)."""
        return self.embed(texts, task="retrieval.passage", dimensions=dimensions).tolist()

    def embed_query(self, text: str, *, dimensions: int | None = None) -> list[float]:
        """One search query (task ``retrieval.query``), as a list of floats: LangChain's ``embed_query``."""
        if not isinstance(text, str):
            raise InvalidArgument(f"query must be a string, got {type(text).__name__}")
        return self.embed([text], task="retrieval.query", dimensions=dimensions)[0].tolist()

    # ---- one request ----------------------------------------------------------------------------

    def _embed_request(
        self,
        texts: Sequence[str],
        params: EmbedParams,
        *,
        stopped: threading.Event | None = None,
        deadline_at: float | None = None,
    ) -> np.ndarray:
        body = request_body(texts, params)

        def attempt() -> bytes:
            if stopped is not None and stopped.is_set():
                raise Abandoned()
            return invoke(self.runtime, self.endpoint_name, body, target_variant=self.target_variant)

        # a timeout is not re-sent as it was: dispatch splits it (or fails it, at one text)
        raw = self.retry.call(
            attempt,
            retry_if=lambda exc: exc.retryable and not isinstance(exc, EndpointTimeout),
            deadline=deadline_at,
            clock=time.monotonic,
        )
        return parse_response(
            raw, expected=len(texts), embedding_type=params.embedding_type, dimensions=params.dimensions
        )

def _assemble(
    n: int,
    params: EmbedParams,
    done: Sequence[tuple[int, int, np.ndarray]],
    failed: Sequence[tuple[int, int, BaseException]],
) -> np.ndarray:
    """The (n, d) result from the answered ranges, or the error that says what is missing."""
    widths = sorted({rows.shape[1] for _, _, rows in done})
    if len(widths) > 1:
        raise BadResponse(f"requests of one call came back with different widths {widths}")
    dtype = output_dtype(params.embedding_type)
    width = widths[0] if widths else output_width(params.dimensions, params.embedding_type)
    vectors = np.full((n, width), np.nan if dtype.kind == "f" else 0, dtype=dtype)
    for start, stop, rows in done:
        vectors[start:stop] = rows
    if not failed:
        return vectors
    failed = sorted(failed, key=lambda f: f[0])
    first = failed[0][2]
    if not done:
        raise first  # nothing succeeded: nothing to keep, the typed error says what went wrong
    indices = [i for start, stop, _ in failed for i in range(start, stop)]
    raise PartialFailure(first, vectors, indices, errors=failed) from first
