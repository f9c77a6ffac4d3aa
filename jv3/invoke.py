"""The SageMaker runtime calls of both clients: ``invoke_endpoint`` (``EmbeddingClient``) and
``invoke_endpoint_async`` (``AsyncEmbeddingClient``), with every botocore failure turned into an error
of ``jv3.errors`` in one place (``runtime_errors``):

* an answer of the runtime (a container error, throttling, an unknown endpoint) is mapped by
  ``wire.error_from_botocore``;
* no answer in time (botocore's read timeout) is ``EndpointTimeout``;
* no connection is ``EndpointUnavailable`` (both retryable);
* no credentials is a ``ClientError`` that says how to provide them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import botocore.exceptions

from .errors import ClientError, EndpointTimeout, EndpointUnavailable
from .wire import CONTENT_TYPE, error_from_botocore


@contextmanager
def runtime_errors(endpoint_name: str) -> Iterator[None]:
    """Raise the ``jv3.errors`` error of a botocore failure inside the block."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        raise error_from_botocore(exc) from exc
    except botocore.exceptions.ReadTimeoutError as exc:  # an HTTPClientError: before it
        raise EndpointTimeout(f"no answer from endpoint {endpoint_name!r} in time: {exc}") from exc
    except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as exc:
        raise EndpointUnavailable(f"cannot reach endpoint {endpoint_name!r}: {exc}") from exc
    except botocore.exceptions.NoCredentialsError as exc:
        raise ClientError(
            "no AWS credentials found; configure them (aws configure, AWS_PROFILE) or pass endpoint_url "
            "for a local endpoint"
        ) from exc


def invoke(runtime, endpoint_name: str, body: bytes, *, target_variant: str | None = None) -> bytes:
    """One real-time invocation; returns the response body."""
    kwargs = {"EndpointName": endpoint_name, "Body": body, "ContentType": CONTENT_TYPE, "Accept": CONTENT_TYPE}
    if target_variant:
        kwargs["TargetVariant"] = target_variant
    with runtime_errors(endpoint_name):
        return runtime.invoke_endpoint(**kwargs)["Body"].read()


def invoke_async(runtime, endpoint_name: str, input_location: str, *, inference_id: str) -> dict:
    """Queue one asynchronous invocation of the body at ``input_location``; returns the runtime's
    answer (``OutputLocation``, ``FailureLocation``, ``InferenceId``)."""
    with runtime_errors(endpoint_name):
        return runtime.invoke_endpoint_async(
            EndpointName=endpoint_name,
            InputLocation=input_location,
            ContentType=CONTENT_TYPE,
            Accept=CONTENT_TYPE,
            InferenceId=inference_id,
        )
