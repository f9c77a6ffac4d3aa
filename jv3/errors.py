"""The one exception tree of the client. Catch ``ClientError`` to catch everything raised here.

    ClientError                     base of every error this package raises
    ├── InvalidArgument             refused locally, before any request (also a ValueError)
    │   └── RequestTooLarge         one text, or one late-chunking document, over the request limit
    ├── EndpointError               the endpoint or the SageMaker runtime answered with an error;
    │   │                           carries ``status``, ``message``, ``error_type``, ``field``
    │   ├── InvalidRequestError     4xx from the container: the request itself is wrong (not retried)
    │   ├── EndpointNotFound        no such endpoint (ValidationError from the runtime API)
    │   ├── ThrottledError          ThrottlingException: too many requests            (retried)
    │   ├── EndpointUnavailable     503 / ServiceUnavailable / connection failures     (retried)
    │   │   ├── ModelNotReady       ModelNotReadyException: the endpoint is starting   (retried)
    │   │   └── EndpointTimeout     no answer in time: the container's 503 "timeout", the runtime's
    │   │                           "timed out", or the client's read timeout (also a TimeoutError;
    │   │                           ``EmbeddingClient`` splits the request instead of re-sending it)
    │   ├── CapacityError           507 from the container: out of memory              (retried)
    │   ├── ServerError             500 from the container or the runtime: a bug on the serving side
    │   └── ProtocolError           a response that does not follow docs/wire-format.md
    │       └── BadResponse         a response that parses but is wrong: count, index, size, NaN/Inf
    ├── PartialFailure              some texts of one ``embed`` failed; carries the vectors of the
    │                               others and the failed positions, so nothing is lost
    ├── DeadlineExceeded            ``embed`` ran out of its ``deadline`` (also a TimeoutError)
    ├── AsyncInferenceError         an async invocation wrote a failure object
    ├── BatchJobError               a transform job failed or stopped, or its outputs are incomplete
    └── WaitTimeout                 polling gave up (also a TimeoutError)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ClientError(Exception):
    """Base of every error raised by ``client``."""


class InvalidArgument(ClientError, ValueError):
    """An argument was refused locally; the message names the bad value and the valid ones."""


class RequestTooLarge(InvalidArgument):
    """A request that cannot be split further would exceed the request size limit."""


class EndpointError(ClientError):
    """The endpoint (or the SageMaker runtime in front of it) answered with an error.

    ``status`` is the container's HTTP status where there is one (``OriginalStatusCode`` of a
    ``ModelError``), else the runtime's; ``error_type``, ``message`` and ``field`` come from the
    ``{"error": {...}}`` body of docs/wire-format.md when the body follows it.
    """

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        field: str | None = None,
        log_stream_arn: str | None = None,
    ):
        detail = f"{error_type}: {message}" if error_type else message
        super().__init__(f"{detail} (status {status})" if status is not None else detail)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.field = field
        self.log_stream_arn = log_stream_arn


class InvalidRequestError(EndpointError):
    """The container refused the request (4xx); sending it again cannot help."""


class EndpointNotFound(EndpointError):
    """The runtime knows no endpoint of that name (in that region)."""


class ThrottledError(EndpointError):
    retryable = True


class EndpointUnavailable(EndpointError):
    retryable = True


class ModelNotReady(EndpointUnavailable):
    retryable = True


class EndpointTimeout(EndpointUnavailable, TimeoutError):
    """No answer in time: the container's 503 ``timeout`` error, the runtime's "timed out", or the
    client's own read timeout. Sending the same payload again would most likely time out again, so
    ``EmbeddingClient`` retries it split in halves (down to one text) instead."""

    retryable = True


class CapacityError(EndpointError):
    retryable = True


class ServerError(EndpointError):
    """A 500 from the container or an internal failure of the runtime."""


class ProtocolError(EndpointError):
    """The response does not follow the wire format (wrong count, missing fields, mixed sizes)."""


class BadResponse(ProtocolError):
    """A response the client refuses rather than return: not the JSON of docs/wire-format.md, or a
    count of vectors other than the count of texts sent, an ``index`` that is not a permutation,
    vectors of a size other than the one requested (or of mixed sizes), NaN or infinite values.
    The message names what was wrong."""


class PartialFailure(ClientError):
    """Some texts of one ``embed`` call were embedded and others were not; nothing is thrown away.

    ``vectors`` is the (n, d) result in input order; the rows at ``failed_indices`` (sorted input
    positions) are NaN for float types and 0 for binary ones, and ``valid`` is False there.
    ``error`` is the error of the first failed text; ``errors`` lists ``(start, stop, error)`` for
    each failed run of positions. Embed ``[texts[i] for i in failed_indices]`` again to fill them.
    """

    def __init__(
        self,
        error: BaseException,
        vectors,
        failed_indices: Sequence[int],
        errors: Sequence[tuple[int, int, BaseException]] = (),
    ):
        self.error = error
        self.vectors = vectors
        self.failed_indices = sorted(failed_indices)
        self.errors = list(errors) or [(self.failed_indices[0], self.failed_indices[-1] + 1, error)]
        n = len(vectors)
        shown = ", ".join(map(str, self.failed_indices[:8])) + (", ..." if len(self.failed_indices) > 8 else "")
        super().__init__(
            f"{len(self.failed_indices)} of {n} texts failed (positions {shown}): {type(error).__name__}: {error}; "
            "the other vectors are in .vectors, the failed positions in .failed_indices"
        )

    @property
    def valid(self):
        """Boolean mask over the input: True where ``vectors`` holds a real embedding."""
        mask = np.ones(len(self.vectors), dtype=bool)
        mask[self.failed_indices] = False
        return mask


class DeadlineExceeded(ClientError, TimeoutError):
    """``embed`` did not finish within its ``deadline``; requests still in flight were abandoned."""


class AsyncInferenceError(ClientError):
    """An asynchronous invocation failed; ``failure_location`` holds the endpoint's error object."""

    def __init__(self, message: str, *, failure_location: str | None = None, status: int | None = None):
        super().__init__(message)
        self.failure_location = failure_location
        self.status = status


class BatchJobError(ClientError):
    """A batch transform job failed, stopped, or left parts without complete outputs."""


class WaitTimeout(ClientError, TimeoutError):
    """Polling for a result, a job or a server gave up after its timeout."""


__all__ = [
    "AsyncInferenceError",
    "BadResponse",
    "BatchJobError",
    "CapacityError",
    "ClientError",
    "DeadlineExceeded",
    "EndpointError",
    "EndpointNotFound",
    "EndpointTimeout",
    "EndpointUnavailable",
    "InvalidArgument",
    "InvalidRequestError",
    "ModelNotReady",
    "PartialFailure",
    "ProtocolError",
    "RequestTooLarge",
    "ServerError",
    "ThrottledError",
    "WaitTimeout",
]
