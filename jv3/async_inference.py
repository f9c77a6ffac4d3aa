"""``AsyncEmbeddingClient``: embeddings from a SageMaker asynchronous endpoint.

Asynchronous inference takes its input from S3: each request body is staged as a JSON object under
``s3_input_uri``, ``invoke_endpoint_async`` queues it, and the endpoint writes the response to the
``OutputLocation`` it returns (or an error to ``FailureLocation``). ``embed`` does all three and
polls with growing intervals until every request is answered or ``timeout`` passes. The body is the
same Jina-format JSON as real-time, so the same container limit on request size applies and large
inputs are split the same way; responses go to S3 and have no 6 MB limit.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import aws
from .errors import AsyncInferenceError, InvalidArgument, WaitTimeout
from .invoke import invoke_async
from .retry import RetryPolicy
from .wire import (
    CONTENT_TYPE,
    DEFAULT_TASK,
    MAX_REQUEST_BYTES,
    no_vectors,
    parse_error_body,
    parse_response,
    plan_requests,
    request_body,
    validate_call,
)

_NO_RESPONSE_LIMIT = 1 << 40
# What ``submit`` takes besides the texts: ``embed``'s parameters, which do not include ``truncate``.
_PARAMETERS = ("task", "dimensions", "late_chunking", "normalized", "embedding_type")


@dataclass(frozen=True)
class AsyncInvocation:
    """One queued request: where its input lies and where its answer will appear."""

    inference_id: str
    input_location: str
    output_location: str
    failure_location: str | None
    count: int
    embedding_type: str
    dimensions: int | None = None  # what was asked for: the response is checked against it


class AsyncEmbeddingClient:
    def __init__(
        self,
        endpoint_name: str,
        *,
        s3_input_uri: str,
        region_name: str | None = None,
        runtime_client=None,
        s3_client=None,
        max_batch_size: int = 1024,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        poll_interval: float = 1.0,
        max_poll_interval: float = 15.0,
        timeout: float = 900.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not endpoint_name:
            raise InvalidArgument(f"endpoint_name must be a non-empty string, got {endpoint_name!r}")
        aws.split_s3_uri(s3_input_uri)  # refuse anything but s3://bucket[/prefix] now
        self.input_uri = s3_input_uri
        self.endpoint_name = endpoint_name
        self.max_batch_size = max_batch_size
        self.max_request_bytes = max_request_bytes
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.timeout = timeout
        self.retry = retry or RetryPolicy(sleep=sleep)
        self._sleep = sleep
        self._clock = clock
        self.runtime = runtime_client or aws.runtime_client(region_name=region_name)
        self.s3 = s3_client or aws.client("s3", region_name=region_name)

    def embed(
        self,
        texts: Sequence[str],
        *,
        task: str = DEFAULT_TASK,
        dimensions: int | None = None,
        late_chunking: bool = False,
        normalized: bool = True,
        embedding_type: str = "float",
        timeout: float | None = None,
    ) -> np.ndarray:
        """Stage, invoke and wait; returns the same (n, d) array as ``EmbeddingClient.embed``."""
        invocations = self.submit(
            texts,
            task=task,
            dimensions=dimensions,
            late_chunking=late_chunking,
            normalized=normalized,
            embedding_type=embedding_type,
        )
        if not invocations:
            return no_vectors(dimensions, embedding_type)
        return self.result(invocations, timeout=timeout)

    def submit(self, texts: Sequence[str], **parameters) -> list[AsyncInvocation]:
        """Stage each request body on S3 and queue it; returns handles for ``result``."""
        texts, params = validate_call(texts, parameters, accepted=_PARAMETERS)
        ranges = plan_requests(
            texts,
            params,
            max_batch_size=self.max_batch_size,
            max_request_bytes=self.max_request_bytes,
            max_response_bytes=_NO_RESPONSE_LIMIT,
        )
        invocations = []
        for start, stop in ranges:
            inference_id = uuid.uuid4().hex
            input_location = aws.join_s3_uri(self.input_uri, f"{inference_id}.json")
            aws.put_s3_object(self.s3, input_location, request_body(texts[start:stop], params), CONTENT_TYPE)
            response = self.retry.call(
                lambda loc=input_location, iid=inference_id: invoke_async(
                    self.runtime, self.endpoint_name, loc, inference_id=iid
                )
            )
            invocations.append(
                AsyncInvocation(
                    inference_id=response.get("InferenceId", inference_id),
                    input_location=input_location,
                    output_location=response["OutputLocation"],
                    failure_location=response.get("FailureLocation"),
                    count=stop - start,
                    embedding_type=params.embedding_type,
                    dimensions=params.dimensions,
                )
            )
        return invocations

    def result(self, invocations: Sequence[AsyncInvocation], *, timeout: float | None = None) -> np.ndarray:
        """Poll until every invocation has an output (rows in submission order) or one has failed."""
        deadline = self._clock() + (self.timeout if timeout is None else timeout)
        parts: list[np.ndarray | None] = [None] * len(invocations)
        interval = self.poll_interval
        while True:
            for k, invocation in enumerate(invocations):
                if parts[k] is None:
                    parts[k] = self._poll(invocation)
            if all(p is not None for p in parts):
                return np.concatenate(parts, axis=0)
            if self._clock() >= deadline:
                waiting = sum(p is None for p in parts)
                raise WaitTimeout(
                    f"{waiting} of {len(invocations)} async requests unanswered after "
                    f"{self.timeout if timeout is None else timeout:g} s; first: {invocations[parts.index(None)].output_location}"
                )
            self._sleep(interval)
            interval = min(self.max_poll_interval, interval * 1.5)

    # ---- internals ------------------------------------------------------------------------------

    def _poll(self, invocation: AsyncInvocation) -> np.ndarray | None:
        body = aws.read_s3_object(self.s3, invocation.output_location)
        if body is not None:
            return parse_response(
                body,
                expected=invocation.count,
                embedding_type=invocation.embedding_type,
                dimensions=invocation.dimensions,
            )
        if invocation.failure_location:
            failure = aws.read_s3_object(self.s3, invocation.failure_location)
            if failure is not None:
                message, error_type, _ = parse_error_body(failure)
                raise AsyncInferenceError(
                    f"async request {invocation.inference_id} failed: "
                    f"{error_type + ': ' if error_type else ''}{message}",
                    failure_location=invocation.failure_location,
                )
        return None
