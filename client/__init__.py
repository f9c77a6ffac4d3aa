"""Client of a jina-embeddings-v3 SageMaker endpoint: what application code installs.

    from client import EmbeddingClient
    vectors = EmbeddingClient("jv3-endpoint").embed(["hello", "world"], task="retrieval.passage")

Only boto3, numpy, typer and tqdm are needed; nothing here imports torch or the CDK. Batch transform
helpers live in ``client.batch``; the ``jv3`` command line in ``client.cli``.
"""

from __future__ import annotations

from .async_inference import AsyncEmbeddingClient, AsyncInvocation
from .errors import (
    AsyncInferenceError,
    BatchJobError,
    CapacityError,
    ClientError,
    EndpointError,
    EndpointNotFound,
    EndpointUnavailable,
    InvalidArgument,
    InvalidRequestError,
    ModelNotReady,
    ProtocolError,
    RequestTooLarge,
    ServerError,
    ThrottledError,
    WaitTimeout,
)
from .realtime import EmbeddingClient
from .retry import RetryPolicy
from .wire import EMBEDDING_TYPES, MAX_REQUEST_BYTES, TASKS

__all__ = [
    "EMBEDDING_TYPES",
    "MAX_REQUEST_BYTES",
    "TASKS",
    "AsyncEmbeddingClient",
    "AsyncInferenceError",
    "AsyncInvocation",
    "BatchJobError",
    "CapacityError",
    "ClientError",
    "EmbeddingClient",
    "EndpointError",
    "EndpointNotFound",
    "EndpointUnavailable",
    "InvalidArgument",
    "InvalidRequestError",
    "ModelNotReady",
    "ProtocolError",
    "RequestTooLarge",
    "RetryPolicy",
    "ServerError",
    "ThrottledError",
    "WaitTimeout",
]
