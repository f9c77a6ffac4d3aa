"""Client of a jina-embeddings-v3 SageMaker endpoint: what application code installs.

    from jv3 import EmbeddingClient
    vectors = EmbeddingClient("jv3-endpoint").embed(["hello", "world"], task="retrieval.passage")

Only boto3, numpy, typer and tqdm are needed; nothing here imports torch or the CDK. Batch transform
is ``BatchJobs`` (its stages live in ``jv3.batch``); the ``jv3`` command line is ``jv3.cli``;
LangChain ``Embeddings`` are ``jv3.langchain.SageMakerJinaEmbeddings`` (the ``langchain`` extra,
which ``import jv3`` does not need).
"""

from __future__ import annotations

from .async_inference import AsyncEmbeddingClient, AsyncInvocation
from .batch import BatchJobs, JobSettings
from .errors import (
    AsyncInferenceError,
    BadResponse,
    BatchJobError,
    CapacityError,
    ClientError,
    DeadlineExceeded,
    EndpointError,
    EndpointNotFound,
    EndpointTimeout,
    EndpointUnavailable,
    InvalidArgument,
    InvalidRequestError,
    ModelNotReady,
    PartialFailure,
    ProtocolError,
    RequestTooLarge,
    ServerError,
    ThrottledError,
    WaitTimeout,
)
from .lines import split_lines
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
    "BadResponse",
    "BatchJobError",
    "BatchJobs",
    "CapacityError",
    "ClientError",
    "DeadlineExceeded",
    "EmbeddingClient",
    "EndpointError",
    "EndpointNotFound",
    "EndpointTimeout",
    "EndpointUnavailable",
    "InvalidArgument",
    "InvalidRequestError",
    "JobSettings",
    "ModelNotReady",
    "PartialFailure",
    "ProtocolError",
    "RequestTooLarge",
    "RetryPolicy",
    "ServerError",
    "ThrottledError",
    "WaitTimeout",
    "split_lines",
]
